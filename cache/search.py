"""Searching a cache under a bucket policy: per-bucket faiss indexes, built on demand from memory-mapped rows."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from cache.store import CacheData
from pipeline.policies import BucketPolicy

FLAT = -1  # bucket key of the whole gallery


@dataclass
class Hits:
    rows: np.ndarray  # gallery rows, best first
    scores: np.ndarray
    candidates: int  # how many gallery items were compared
    buckets: list[int]  # bucket keys searched (FLAT for the whole gallery)
    note: str | None = None


def _faiss():
    import faiss

    return faiss


class BucketTable:
    """Which gallery rows are in which bucket, for gallery soft assignment to M classes (CSR layout)."""

    def __init__(self, bucket_columns: np.ndarray):
        keys = np.asarray(bucket_columns, dtype=np.int64)
        rows = np.repeat(np.arange(len(keys)), keys.shape[1])
        flat = keys.reshape(-1)
        order = np.argsort(flat, kind="stable")
        self.keys, starts = np.unique(flat[order], return_index=True)
        self.offsets = np.append(starts, len(flat))
        self.rows = rows[order]

    def rows_of(self, key: int) -> np.ndarray:
        i = np.searchsorted(self.keys, key)
        if i == len(self.keys) or self.keys[i] != key:
            return np.zeros(0, dtype=np.int64)
        return self.rows[self.offsets[i]:self.offsets[i + 1]]

    def sizes(self) -> dict[int, int]:
        return dict(zip(self.keys.tolist(), np.diff(self.offsets).tolist()))


class Searcher:
    """Top-k search of one cache; indexes are built lazily and kept in a small LRU."""

    def __init__(self, data: CacheData, index_cache_size: int = 64):
        self.data = data
        self.embeddings = data.columns["embeddings"]
        self._tables: dict[int, BucketTable] = {}
        self._indexes: OrderedDict[tuple[int, int], tuple[np.ndarray, object]] = OrderedDict()
        self._index_cache_size = index_cache_size

    def table(self, gallery_classes: int) -> BucketTable:
        """Bucket membership: the folder label's class (`--bucket-by label`), else the top-M classes."""
        if gallery_classes not in self._tables:
            if self.data.manifest.get("bucket_by") == "label":
                columns = np.asarray(self.data.columns["label_classes"])[:, None]
            else:
                columns = np.asarray(self.data.columns["classes"][:, :gallery_classes])
            self._tables[gallery_classes] = BucketTable(columns)
        return self._tables[gallery_classes]

    def _index(self, key: int, gallery_classes: int) -> tuple[np.ndarray, object]:
        cache_key = (key, gallery_classes)
        if cache_key in self._indexes:
            self._indexes.move_to_end(cache_key)
            return self._indexes[cache_key]
        if key == FLAT:
            rows = np.arange(len(self.embeddings))
            vectors = np.ascontiguousarray(self.embeddings, dtype=np.float32)
        else:
            rows = self.table(gallery_classes).rows_of(key)
            vectors = np.ascontiguousarray(self.embeddings[rows], dtype=np.float32)
        index = _faiss().IndexFlatIP(vectors.shape[1])
        index.add(vectors)
        self._indexes[cache_key] = (rows, index)
        if len(self._indexes) > self._index_cache_size:
            self._indexes.popitem(last=False)
        return rows, index

    def _search_buckets(self, query: np.ndarray, keys: list[int], gallery_classes: int, k: int) -> Hits:
        found_rows, found_scores, candidates = [], [], 0
        for key in keys:
            rows, index = self._index(key, gallery_classes)
            candidates += len(rows)
            scores, local = index.search(query[None].astype(np.float32), min(k, len(rows)))
            keep = local[0] >= 0
            found_rows.append(rows[local[0][keep]])
            found_scores.append(scores[0][keep])
        rows, scores = np.concatenate(found_rows), np.concatenate(found_scores)
        rows, first = np.unique(rows, return_index=True)  # soft assignment can find an image twice
        scores = scores[first]
        order = np.argsort(-scores, kind="stable")[:k]
        return Hits(rows[order], scores[order], candidates, keys)

    def _fused(self, query: np.ndarray, classes: np.ndarray, probs: np.ndarray, keys: list[int],
               gallery_classes: int, weight: float, k: int) -> Hits:
        table = self.table(gallery_classes)
        rows = np.unique(np.concatenate([table.rows_of(key) for key in keys]))
        similarity = np.asarray(self.embeddings[rows], dtype=np.float32) @ query.astype(np.float32)
        scores = similarity + weight * class_agreement(classes, probs, self.data.columns["classes"][rows],
                                                       self.data.columns["probs"][rows])
        order = np.argsort(-scores, kind="stable")[:k]
        return Hits(rows[order], scores[order], len(rows), keys)

    def search(self, query: np.ndarray, policy: BucketPolicy, k: int,
               classes: np.ndarray | None = None, probs: np.ndarray | None = None) -> Hits:
        """The k best gallery rows for one L2-normalised query embedding under `policy`."""
        if len(self.embeddings) == 0:
            return Hits(np.zeros(0, np.int64), np.zeros(0, np.float32), 0, [])
        if not policy.uses_buckets:
            return self._search_buckets(query, [FLAT], 1, k)
        if classes is None:
            raise ValueError(f"bucket policy {policy} needs a classifier; use flat")
        table = self.table(policy.gallery_classes)
        keys = [int(c) for c in classes[:policy.query_classes] if len(table.rows_of(int(c)))]
        if not keys:
            hits = self._search_buckets(query, [FLAT], 1, k)
            hits.note = "the predicted classes' buckets are empty: searched the whole gallery"
            return hits
        if policy.kind == "fused":
            weight = policy.weight if policy.weight is not None else self.data.manifest.get("fused_weight") or 0.5
            return self._fused(query, classes, probs, keys, policy.gallery_classes, weight, k)
        return self._search_buckets(query, keys, policy.gallery_classes, k)


def class_agreement(query_classes: np.ndarray, query_probs: np.ndarray,
                    gallery_classes: np.ndarray, gallery_probs: np.ndarray) -> np.ndarray:
    """p_q . p_g over the stored top-k classes of each side (the rest of the mass is ignored)."""
    gallery_classes = np.asarray(gallery_classes)
    match = gallery_classes[:, :, None] == np.asarray(query_classes)[None, None, :]
    return np.einsum("gij,gi,j->g", match, np.asarray(gallery_probs, np.float32),
                     np.asarray(query_probs, np.float32))

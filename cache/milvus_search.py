"""Searching a cache's rows in Milvus: Searcher's contract and policies, with Milvus finding the rows.

Buckets become a filter expression on the collection (cache/milvus.py's layout): `bucket in [...]` for top-1
buckets, `ARRAY_CONTAINS_ANY(classes, [...])` for soft ones (`classes[i] == key` terms when +soft:M keeps fewer
classes than the collection stores). Which buckets a query searches, the fallback to the whole gallery, and the whole
re-ranking pipeline stay Searcher's (cache/search.py), so both backends give the same answers.
"""
from __future__ import annotations

import numpy as np

from lookalike.cache.metrics import rank_by_score
from lookalike.cache.milvus import MAX_LIMIT, METRIC, MilvusTarget, milvus_errors, open_collection
from lookalike.cache.search import RERANK_IVF_POOL, WHOLE_GALLERY, Hits, Searcher
from lookalike.cache.store import CacheData
from lookalike.models.errors import UserError


def bucket_filter(keys: list[int], gallery_classes: int, bucket_by: str, stored_classes: int) -> str:
    """The filter expression selecting the rows of buckets `keys` under `gallery_classes` soft buckets: the
    membership rule of cache/buckets.py (`bucket_keys`) written for Milvus ('' for the whole gallery)."""
    if WHOLE_GALLERY in keys:
        return ""
    listed = "[" + ", ".join(str(int(key)) for key in keys) + "]"
    if gallery_classes == 1 or bucket_by == "label":
        return f"bucket in {listed}"
    if gallery_classes >= stored_classes:
        return f"ARRAY_CONTAINS_ANY(classes, {listed})"
    return " or ".join(f"classes[{i}] == {int(key)}" for i in range(gallery_classes) for key in keys)


class MilvusSearcher(Searcher):
    """A Searcher whose nearest rows and re-ranking candidates come from a Milvus collection exported from this very
    cache generation (checked when it opens: pipeline, dimension, generation, a finished export).

    Re-ranking scores the candidates from the local cache's stored rows, as Searcher does: the embeddings, and for
    +dba the DBA column the build stored for `auto` (another K is made locally, up to EXACT_MAX_ROWS images). They
    are the very float32 rows faiss re-ranks, so the answers agree, and the collection needs no second vector field
    nor a vector fetch per query. The query machine keeps the cache folder memory-mapped and reads only candidates'
    rows; Milvus holds the vectors it searches.
    """

    reads_index = False  # Milvus finds the rows: the local gallery index is neither opened nor checked

    def __init__(self, data: CacheData, target: MilvusTarget):
        super().__init__(data)
        self.target = target
        self.client = open_collection(target, data)
        self.stored_classes = data.columns["classes"].shape[1]

    def _rows_in(self, keys: list[int], gallery_classes: int) -> int:
        """How many rows the buckets hold (counted once per bucket, as Searcher counts its candidates)."""
        if WHOLE_GALLERY in keys:
            return len(self.data)
        table = self.table(gallery_classes)
        return sum(len(table.rows_of(key)) for key in keys)

    def _found(self, query: np.ndarray, keys: list[int], gallery_classes: int,
               limit: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows, cosines) of the `limit` nearest rows of the buckets, in the order Searcher ranks them."""
        expression = bucket_filter(keys, gallery_classes, self.data.manifest.bucket_by, self.stored_classes)
        with milvus_errors(self.target, "searching"):
            [hits] = self.client.search(self.target.collection, data=[np.asarray(query, np.float32).tolist()],
                                        anns_field="vector", filter=expression, limit=limit, output_fields=["row"],
                                        search_params={"metric_type": METRIC})
        found = sorted((int(hit.id), hit.distance) for hit in hits)
        rows, scores = np.array([row for row, _ in found], np.int64), np.array([s for _, s in found], np.float32)
        order = rank_by_score(scores)  # equal scores in row order, as the local search ranks them
        return rows[order], scores[order]

    def nearest(self, query: np.ndarray, keys: list[int], gallery_classes: int, k: int) -> Hits:
        rows, scores = self._found(query, keys, gallery_classes, min(k, MAX_LIMIT))
        return Hits(rows, scores, self._rows_in(keys, gallery_classes), keys)

    def candidate_rows(self, query: np.ndarray, keys: list[int], gallery_classes: int, k: int,
                       white: bool = False) -> np.ndarray:
        """Every row of the buckets when Milvus can return them all (MAX_LIMIT; Searcher takes every row of a bucket
        up to EXACT_MAX_ROWS), else the max(RERANK_IVF_POOL, 2 * k) nearest of them (at most MAX_LIMIT); ascending,
        each once. The collection holds the stored embeddings: a `white` policy's pool would be found in the wrong
        space, so it is refused above MAX_LIMIT rows."""
        rows = self._rows_in(keys, gallery_classes)
        if white and rows > MAX_LIMIT:
            raise UserError(f"+white: Milvus holds the stored embeddings, not the whitened ones; above {MAX_LIMIT:,} "
                            "images search this cache with faiss (without --milvus)")
        pool = rows if rows <= MAX_LIMIT else min(MAX_LIMIT, max(RERANK_IVF_POOL, 2 * k))
        return np.unique(self._found(query, keys, gallery_classes, pool)[0])

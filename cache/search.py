"""Searching a cache under a bucket policy: exact per-bucket search over memory-mapped rows, IVF above a measured size."""
from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np

from lookalike.cache import rerank, reranking
from lookalike.cache.buckets import BucketTable, as_slice, bucket_keys, class_agreement
from lookalike.cache.metrics import rank_by_score
from lookalike.cache.policies import MAX_RERANK_K, BucketPolicy, parse_policy
from lookalike.cache.columns import DBA_COLUMN, WHITE_COLUMN
from lookalike.cache.indexes import (EXACT_MAX_ROWS, CompressedSearch, GalleryIndex, ivf_file, ivf_lists, make_index,
                                    open_gallery_index, write_index)
from lookalike.cache.mapped import release_pages
from lookalike.cache.paths import refuse_unsafe_paths
from lookalike.cache.manifest import CacheError
from lookalike.cache.store import CacheData
from lookalike.cache.whitening import whiten
from lookalike.models.errors import UserError
from lookalike.models.machine import background_thread, give_back_freed_memory

WHOLE_GALLERY = -1  # the bucket key that stands for the whole gallery (flat search)


@dataclass
class Hits:
    rows: np.ndarray  # gallery rows, best first
    scores: np.ndarray  # cosine similarity of each row to the query
    candidates: int  # how many gallery items were compared
    buckets: list[int]  # bucket keys searched (WHOLE_GALLERY for the whole gallery)
    note: str | None = None
    rank_scores: np.ndarray | None = None  # what the rows were ranked by, when not `scores` (fused)


# Exact inner-product search scans a bucket's rows; above EXACT_MAX_ROWS (cache/indexes.py) an IVF index answers
# instead. Measured (BENCHMARKS.md, Speed, dim 512, 2 cores): one exact query costs 1.2 ms at 10^4 rows and 16 ms at
# 10^5 (~0.17 ms per 1,000 rows), so exact stays under the 5 ms search budget up to ~30,000 rows; the IVF
# answers in ~2 ms at 10^6 and costs ~17 s per 10^6 rows to build, once per cache generation (it is saved).
# A cache built with a gallery index (build-cache --index) searches through it above INDEXED_MIN_ROWS rows: a smaller
# bucket is scanned exactly, as fast and exact.
INDEXED_MIN_ROWS = 1_024
# DBA matrices of policies other than the cache's own (one 12 MiB for 2,402 images of 1,280 dimensions), kept least
# recently used first; the one in use is kept whatever its size. Bounds what distinct policies from a client can hold.
DBA_CACHE_BYTES = 64 << 20
IVF_NPROBE = 16  # recall@5 1.000 on the clustered synthetic set (0.988 at nprobe 1): margin for real data
SCAN_CHUNK_ROWS = 65_536  # exact scans of a memory-mapped matrix read it in slices this size, never whole
CACHED_BYTES = 512 << 20  # bucket vectors kept in RAM between queries (LRU), at most
# Rows a re-ranked or fused search for k results takes from an indexed bucket: max(this, 2 k). A pool of k lost rows
# re-ranking ranks high: tiny-imagenet-20's 10,000 training photos, large-gallery path, `flat+white+dba:5+qe:10` to
# depth R = 499: validation MAP@R 0.613 with k, 0.654 with 2 k (0.656 with 4 k; exact, every row: 0.652).
RERANK_IVF_POOL = 256
TIMED_ROWS = 256  # gallery rows whose k-NN pass is timed to estimate a whole DBA preparation


@lru_cache(maxsize=1)
def preparation_thread() -> ThreadPoolExecutor:
    """The process's one thread for per-policy preparation, made at the first (every searcher shares it: a server
    that opens each new cache generation adds no thread)."""
    return ThreadPoolExecutor(1, "lookalike-prepare", initializer=background_thread)


class PreparationBusy(RuntimeError):
    """Another query is preparing a policy's DBA matrix right now: under a preparation budget (a server) this one is
    refused, to be sent again shortly, rather than queued behind it."""


class Scored(NamedTuple):
    """A re-ranked search's candidates as scored for its policy."""

    query: np.ndarray  # the query in the space they are ranked in (whitened with +white)
    vectors: np.ndarray  # what the candidates are ranked against (whitened and/or DBA vectors)
    cosine: np.ndarray  # the query's cosine to those vectors
    bonus: np.ndarray  # the class term added to it
    stored: np.ndarray  # the candidates' stored embeddings (the space an index searches)
    plain: np.ndarray  # the query's cosine to them (copies first, the scores reported)


def rerank_pool(query: np.ndarray, policy: BucketPolicy, k: int, candidates: Callable[[np.ndarray], np.ndarray],
                scored: Callable[[np.ndarray], Scored],
                every_row: Callable[[np.ndarray], bool]) -> tuple[np.ndarray, Scored, np.ndarray, np.ndarray]:
    """A re-ranked search, written once for the search and for `auto`'s validation through it: the rows
    `candidates(query)` gives (ascending, each once), scored by `scored(rows)`, ranked by the re-ranking pipeline (cache/reranking.py).
    With +qe, rows an index proposed (a pool of the nearest: not `every_row`) are joined by those it proposes for the
    query expanded in the stored space by the same best candidates, a second search (only the rows it adds are
    scored). (rows, their Scored, what each was ranked by, the best k positions)."""
    rows = candidates(query)
    found = scored(rows)
    if policy.qe and not every_row(rows):
        expanded = reranking.expanded(reranking.FixedGallery(found.stored), query[None], found.plain[None],
                                      (found.cosine + found.bonus)[None], policy.qe)[0]
        more = np.setdiff1d(candidates(expanded), rows, assume_unique=True)  # each gives every row once
        if len(more):
            rows, found = _joined(rows, found, more, scored(more))
    ranking, order = reranking.rerank(reranking.FixedGallery(found.vectors), found.query[None], found.cosine[None],
                                      found.bonus[None], policy.qe, policy.krecip, found.plain[None], k)
    return rows, found, ranking[0], order[0]


def _joined(rows: np.ndarray, found: Scored, more: np.ndarray, more_found: Scored) -> tuple[np.ndarray, Scored]:
    """Two sets of scored rows as one, in row order (as np.union1d orders them): each part written once to its
    places."""
    joined = np.concatenate([rows, more])
    order = np.argsort(joined, kind="stable")
    places = np.empty(len(joined), np.int64)
    places[order] = np.arange(len(joined))
    first, second = places[:len(rows)], places[len(rows):]

    def merged(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        out = np.empty((len(joined), *a.shape[1:]), a.dtype)
        out[first], out[second] = a, b
        return out

    return joined[order], Scored(found.query, *(merged(a, b) for a, b in zip(found[1:], more_found[1:])))


class ExactIndex:
    """Exact inner product over some gallery rows; the whole gallery is scanned in slices, not copied."""

    def __init__(self, rows: np.ndarray, vectors: np.ndarray):
        self.rows = rows
        self.vectors = vectors  # a bucket's rows gathered (float32), or the memory-mapped matrix itself
        self.nbytes = vectors.nbytes if not isinstance(vectors, np.memmap) else 0

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores, positions in this index's rows), best first. faiss, not numpy: numpy's threaded
        sgemv was 80x slower here when another process held a core (BENCHMARKS.md, Speed)."""
        import faiss

        k = min(k, len(self.rows))
        query = np.ascontiguousarray(query[None], np.float32)
        found, found_scores = [], []
        for start in range(0, len(self.vectors), SCAN_CHUNK_ROWS):
            # a plain float32 ndarray: a view of float32 rows, a copy of a float16 slice (faiss.contrib.torch_utils,
            # once imported, rejects memmaps)
            scores, local = faiss.knn(query, np.asarray(self.vectors[start:start + SCAN_CHUNK_ROWS], np.float32), k,
                                      metric=faiss.METRIC_INNER_PRODUCT)
            keep = local[0] >= 0
            found.append(local[0][keep] + start)
            found_scores.append(scores[0][keep])
        release_pages(self.vectors)
        if len(found) == 1:
            return found_scores[0], found[0]
        positions, scores = np.concatenate(found), np.concatenate(found_scores)
        best = rank_by_score(scores, k)
        return scores[best], positions[best]


class IVFIndex:
    """An approximate faiss IndexIVFFlat over a large bucket (or the whole gallery)."""

    def __init__(self, rows: np.ndarray, index, nprobe: int = IVF_NPROBE):
        self.rows = rows
        self.index = index
        self.index.nprobe = min(nprobe, index.nlist)
        self.nbytes = 0  # memory-mapped from its file when saved; else kept in memory whatever its size (Searcher._ivf)
        self.saved = False

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        scores, local = self.index.search(np.ascontiguousarray(query[None], np.float32), min(k, len(self.rows)))
        keep = local[0] >= 0
        return scores[0][keep], local[0][keep]


class Searcher:
    """Top-k search of one cache; indexes are built (or loaded) lazily and kept in a small LRU.

    A bucket's rows are read from the memory-mapped matrix when it is searched, so a query process
    holds the models and the buckets it searched, not the gallery. Buckets (or a flat search) above
    `exact_max_rows` use an IVF index, saved next to the cache generation and memory-mapped back.
    """

    reads_index = True  # whether searches read the generation's gallery index (build-cache --index)

    def __init__(self, data: CacheData, index_cache_size: int = 64, exact_max_rows: int | None = None,
                 nprobe: int = IVF_NPROBE, gallery_index: GalleryIndex | None = None):
        self.data = data
        self.embeddings = data.columns["embeddings"]
        self._tables: dict[int, BucketTable] = {}
        self._dba: OrderedDict[tuple[tuple[int, float], bool], np.ndarray] = OrderedDict()  # by (K, a), +white
        self._indexes: OrderedDict[tuple[int, int, bool], ExactIndex | IVFIndex] = OrderedDict()
        self._index_cache_size = index_cache_size
        self.exact_max_rows = exact_max_rows or data.manifest.exact_max_rows or EXACT_MAX_ROWS
        self.nprobe = nprobe
        # from build-cache --index (a backend that finds rows elsewhere never reads it); given: one a build made for
        # the rows it has not published yet (auto's validation searches through it)
        self.gallery_index = gallery_index or (open_gallery_index(data.generation, *self.embeddings.shape)
                                               if self.reads_index else None)
        # Safe from several threads: the caches above are read and changed under `_mutex`, which is never held
        # while anything is computed; an index is made by one thread (its own lock: other buckets go on).
        self._mutex = threading.Lock()
        self._making: dict[tuple[int, int], threading.Lock] = {}
        self._preparing = threading.Lock()  # one DBA preparation at a time, on the background thread
        self.prepare_budget_s: float | None = None  # set: refuse a DBA estimated to take longer, and never queue
        self._knn_seconds_per_row: float | None = None

    def table(self, gallery_classes: int) -> BucketTable:
        """Bucket membership: the folder label's class (`--bucket-by label`), else the top-M classes."""
        with self._mutex:
            table = self._tables.get(gallery_classes)
        if table is None:
            table = BucketTable(bucket_keys(self.data.columns, self.data.manifest.bucket_by, gallery_classes))
            with self._mutex:
                table = self._tables.setdefault(gallery_classes, table)
        return table

    def _index_file(self, key: int, gallery_classes: int, white: bool) -> Path | None:
        """Where an IVF index of this cache generation is saved: beside its memory-mapped embeddings."""
        filename = getattr(self.embeddings, "filename", None)
        if not isinstance(self.embeddings, np.memmap) or not filename:
            return None  # an in-memory cache (during a build): nothing to save next to
        return Path(filename).parent / ivf_file("flat" if key == WHOLE_GALLERY else f"bucket-{key}-m{gallery_classes}",
                                                white)

    def _ivf(self, rows: np.ndarray, key: int, gallery_classes: int, white: bool) -> IVFIndex:
        import faiss

        path = self._index_file(key, gallery_classes, white)
        vectors = self._space(white)
        if path is not None and path.is_file():
            try:
                index = IVFIndex(rows, faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC), self.nprobe)
                if (index.index.ntotal, index.index.d) == (len(rows), vectors.shape[1]):
                    index.saved = True
                    return index
            except RuntimeError:
                pass  # unreadable (cut short): build it again; one of other rows or dimensions too
        index = IVFIndex(rows, make_index(vectors, f"IVF{ivf_lists(len(rows))},Flat",
                                          None if key == WHOLE_GALLERY else rows), self.nprobe)
        release_pages(vectors)
        # Unsaved (an in-memory cache, or one that cannot be written), it stays in memory, not counted against
        # CACHED_BYTES: evicted by the next bucket's exact scan, it was made again for the next flat search, seconds
        # each at 10^5 rows (auto's validation at 10^6 rows made it over and over, for minutes)
        if path is not None:
            try:
                write_index(path, index.index)
                index = IVFIndex(rows, faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC), self.nprobe)
                index.saved = True
            except (OSError, RuntimeError):
                pass  # a read-only cache: keep the index in memory
        return index

    def _cached(self, cache: OrderedDict, key):
        """cache[key] marked most recently used, or None; under the mutex."""
        with self._mutex:
            if key not in cache:
                return None
            cache.move_to_end(key)
            return cache[key]

    def index(self, key: int, gallery_classes: int, white: bool = False) -> ExactIndex | IVFIndex | CompressedSearch:
        """The index over bucket `key` (WHOLE_GALLERY: every row) under `gallery_classes` soft buckets, of the stored
        embeddings or (`white`) of their whitened copy, made once."""
        cache_key = (key, gallery_classes, white)
        index = self._cached(self._indexes, cache_key)
        if index is not None:
            return index
        with self._mutex:
            making = self._making.setdefault(cache_key, threading.Lock())
        with making:
            index = self._cached(self._indexes, cache_key) or self._new_index(key, gallery_classes, white)
            with self._mutex:
                self._indexes[cache_key] = index
                self._evict(cache_key)
        return index

    def _evict(self, kept: tuple) -> None:
        """Least recently used indexes out (under the mutex) until at most index_cache_size remain and those holding
        bytes (gathered buckets) hold at most CACHED_BYTES; `kept`, just made, stays."""
        while len(self._indexes) > self._index_cache_size:
            self._indexes.popitem(last=False)
        held = [key for key, index in self._indexes.items() if index.nbytes and key != kept]
        while held and sum(index.nbytes for index in self._indexes.values()) > CACHED_BYTES:
            del self._indexes[held.pop(0)]

    def _new_index(self, key: int, gallery_classes: int, white: bool) -> ExactIndex | IVFIndex | CompressedSearch:
        """The gallery index (build-cache --index: of the stored embeddings) over more than INDEXED_MIN_ROWS rows,
        else an IVF index above exact_max_rows, else an exact scan."""
        rows = np.arange(len(self.embeddings)) if key == WHOLE_GALLERY else self.table(gallery_classes).rows_of(key)
        if self.gallery_index is not None and not white and len(rows) > INDEXED_MIN_ROWS:
            return CompressedSearch(self.gallery_index, self.embeddings, rows, whole=key == WHOLE_GALLERY)
        space = self._space(white)
        if len(rows) > self.exact_max_rows:
            index = self._ivf(rows, key, gallery_classes, white)
        elif key == WHOLE_GALLERY:
            vectors = space
            if not isinstance(vectors, np.memmap):  # a mapped matrix (float32 or float16) is scanned in slices
                vectors = np.asarray(vectors, np.float32)
            index = ExactIndex(rows, vectors)
        else:  # a top-1 bucket of a grouped cache is one contiguous block: a sequential read
            block = as_slice(rows)
            index = ExactIndex(rows, np.array(space[block if block else rows], dtype=np.float32))
            release_pages(space)
        return index

    def nearest(self, query: np.ndarray, keys: list[int], gallery_classes: int, k: int) -> Hits:
        """The k nearest rows of buckets `keys` by cosine (no re-ranking). With `candidate_rows`, the part a search
        backend supplies: another backend (cache/milvus_search.py) overrides these two and keeps the rest."""
        found_rows, found_scores, candidates = [], [], 0
        query = np.asarray(query, np.float32)
        for key in keys:
            index = self.index(key, gallery_classes)
            candidates += len(index.rows)
            scores, local = index.search(query, k)
            found_rows.append(index.rows[local])
            found_scores.append(scores)
        rows, scores = np.concatenate(found_rows), np.concatenate(found_scores)
        rows, first = np.unique(rows, return_index=True)  # soft assignment can find an image twice
        scores = scores[first]
        order = rank_by_score(scores, k)
        self._check_finite(query, rows[order], scores[order])
        return Hits(rows[order], scores[order], candidates, keys)

    def _check_finite(self, query: np.ndarray, rows: np.ndarray, scores: np.ndarray) -> None:
        """CacheError naming the first of `rows` whose score against a finite query is not finite: its stored vector
        is not (a cache above CHECKED_AT_OPEN_BYTES was not read whole when it opened: cache/columns.py)."""
        bad = np.flatnonzero(~np.isfinite(scores))
        if len(bad) and np.isfinite(query).all():
            row = int(rows[bad[0]])
            raise CacheError(f"{self.data.root}: row {row} ({str(self.data.columns['paths'][row])[:80]!r}) is not "
                             "finite; the cache is corrupt: rebuild with build-cache --rebuild")

    def candidate_rows(self, query: np.ndarray, keys: list[int], gallery_classes: int, k: int,
                       white: bool = False) -> np.ndarray:
        """The rows a re-ranked search for k results scores: every row of an exact bucket (or of the whole gallery),
        the max(RERANK_IVF_POOL, 2 * k) nearest of an indexed one, in the whitened space for a `white` policy (the rows
        it ranks high can lie far from the query in the stored one); ascending, each once."""
        pool = max(RERANK_IVF_POOL, 2 * k)
        if white:
            query = whiten(query, self._whitening())
        found = []
        for key in keys:
            index = self.index(key, gallery_classes, white)
            found.append(index.rows if isinstance(index, ExactIndex) else index.rows[index.search(query, pool)[1]])
        return np.sort(found[0]) if len(found) == 1 else np.unique(np.concatenate(found))  # soft buckets share rows

    def _whitening(self) -> np.ndarray:
        """The cache's learned whitening; UserError when it stores none."""
        if self.data.whitening is None:
            raise UserError("+white: this cache stores no learned whitening (build-cache stores it when `auto`, "
                            "validated on the gallery's labels, adopts it)")
        return self.data.whitening

    def _space(self, white: bool) -> np.ndarray:
        """The stored vectors a policy ranks in: the embeddings, or with +white their whitened copy."""
        if not white:
            return self.embeddings
        self._whitening()
        return self.data.columns[WHITE_COLUMN]

    def _matrix(self, dba: tuple[int, float] | None, white: bool = False) -> np.ndarray:
        """The vectors candidates are scored against: the embeddings (whitened with +white), or their DBA (stored at
        build time for the cache's own choice; made here once for another on a gallery up to exact_max_rows)."""
        space = self._space(white)
        if dba is None:
            return space
        if self.data.manifest.dba == list(dba) and parse_policy(self.data.manifest.default_policy).white == white:
            return self.data.columns[DBA_COLUMN]
        matrix = self._cached(self._dba, (dba, white))
        if matrix is not None:
            return matrix
        stored = f"DBA {self.data.manifest.dba}" if self.data.manifest.dba else "no DBA"
        if len(self.embeddings) > self.exact_max_rows:
            raise UserError(f"+dba:{dba[0]}: this cache stores {stored}; above {self.exact_max_rows:,} images "
                            "another DBA needs a rebuild with it as the cache's choice")
        if not self._preparing.acquire(blocking=self.prepare_budget_s is None):
            raise PreparationBusy(f"+dba:{dba[0]}: another query is preparing a DBA matrix; send this one again in "
                                  "a moment")
        try:
            matrix = self._cached(self._dba, (dba, white))  # made by the query this one waited for
            if matrix is None:
                self._within_budget(dba[0], stored)
                matrix = self._in_background(rerank.dba, np.asarray(space, np.float32), *dba)
            with self._mutex:
                self._dba[(dba, white)] = matrix
                while len(self._dba) > 1 and sum(m.nbytes for m in self._dba.values()) > DBA_CACHE_BYTES:
                    self._dba.popitem(last=False)  # least recently used first: distinct policies never pile up
            give_back_freed_memory()  # the k-NN pass's and the evicted matrix's memory
        finally:
            self._preparing.release()
        return matrix

    def _in_background(self, work, *args):
        """work(*args) on the preparation thread, one core and a lower priority (background_thread): it
        takes the CPU that queries leave idle (a normal query's p95 beside a client sending new DBA policies:
        BENCHMARKS.md, Serving)."""
        return preparation_thread().submit(work, *args).result()

    def _within_budget(self, k: int, stored: str) -> None:
        """UserError when a DBA of `k` would take longer than `prepare_budget_s` on this gallery. The estimate is
        the time of one k-NN pass over the gallery for TIMED_ROWS rows (timed once), scaled to every row: that pass
        is what a DBA costs."""
        if self.prepare_budget_s is None:
            return
        if self._knn_seconds_per_row is None:
            vectors = np.asarray(self.embeddings, np.float32)
            timed = vectors[:TIMED_ROWS]
            start = time.perf_counter()
            rerank.nearest(vectors, timed, MAX_RERANK_K + 1)
            self._knn_seconds_per_row = (time.perf_counter() - start) / len(timed)
        seconds = self._knn_seconds_per_row * (len(self.embeddings) + k)
        if seconds > self.prepare_budget_s:
            raise UserError(f"+dba:{k}: preparing it for {len(self.embeddings):,} images would take about "
                            f"{seconds:.1f} s, over the {self.prepare_budget_s:g} s allowed per query; this cache "
                            f"stores {stored}")

    def _scored(self, query: np.ndarray, classes: np.ndarray | None, probs: np.ndarray | None, rows: np.ndarray,
                policy: BucketPolicy) -> Scored:
        """Candidate `rows` scored for a re-ranked `policy`."""
        block = as_slice(rows)  # the whole gallery, or a top-1 bucket: a view, not a gather
        matrix = self._matrix(policy.dba, policy.white)
        vectors = np.asarray(matrix[block] if block else matrix[rows], np.float32)  # a view of float32 rows
        weight = self.data.manifest.weight_for(policy.weight) if policy.kind == "fused" else (policy.weight or 0.0)
        bonus = np.zeros(len(rows), np.float32)
        if weight:
            if classes is None:
                raise UserError(f"bucket policy {policy} ranks by class agreement and needs a classifier")
            columns = self.data.columns
            bonus = weight * class_agreement(classes, probs, columns["classes"][rows], columns["probs"][rows])[0]
        ranked_query = whiten(query, self._whitening()) if policy.white else query
        stored = vectors if matrix is self.embeddings else np.asarray(
            self.embeddings[block] if block else self.embeddings[rows], np.float32)
        cosine, plain = vectors @ ranked_query, stored @ query
        self._check_finite(query, rows, cosine + plain)
        return Scored(ranked_query, vectors, cosine, bonus, stored, plain)

    def _every_row(self, rows: np.ndarray, keys: list[int], gallery_classes: int) -> bool:
        """Whether candidate_rows' `rows` are every row of the buckets, not a pool that an index proposed."""
        if WHOLE_GALLERY in keys:
            return len(rows) == len(self.embeddings)
        table = self.table(gallery_classes)
        return len(rows) == len(np.unique(np.concatenate([table.rows_of(key) for key in keys])))

    def _reranked(self, query: np.ndarray, classes: np.ndarray | None, probs: np.ndarray | None, keys: list[int],
                  policy: BucketPolicy, k: int) -> Hits:
        """The candidates ranked by the re-ranking pipeline (rerank_pool). `scores` stay the cosine to the stored
        embeddings; `rank_scores` is what was ranked by."""
        query = np.asarray(query, np.float32)
        gallery_classes = policy.gallery_classes
        rows, scored, ranking, best = rerank_pool(
            query, policy, k, lambda q: self.candidate_rows(q, keys, gallery_classes, k, policy.white),
            lambda r: self._scored(query, classes, probs, r, policy),
            lambda r: self._every_row(r, keys, gallery_classes))
        release_pages(self._matrix(policy.dba, policy.white))
        release_pages(self.embeddings)
        return Hits(rows[best], scored.plain[best], len(rows), keys, rank_scores=ranking[best])

    def search(self, query: np.ndarray, policy: BucketPolicy, k: int,
               classes: np.ndarray | None = None, probs: np.ndarray | None = None) -> Hits:
        """The k best gallery rows for one L2-normalised query embedding under `policy`; CacheError when a row
        found names a path outside the gallery (a large cache's paths are not all read when it opens)."""
        hits = self._search(query, policy, k, classes, probs)
        refuse_unsafe_paths(str(self.data.root), self.data.columns["paths"], hits.rows)
        return hits

    def _search(self, query: np.ndarray, policy: BucketPolicy, k: int, classes: np.ndarray | None,
                probs: np.ndarray | None) -> Hits:
        if len(self.embeddings) == 0:
            return Hits(np.zeros(0, np.int64), np.zeros(0, np.float32), 0, [])
        if not policy.uses_buckets:
            if policy.reranks:
                return self._reranked(query, classes, probs, [WHOLE_GALLERY], policy, k)
            return self.nearest(query, [WHOLE_GALLERY], 1, k)
        if classes is None:
            raise UserError(f"bucket policy {policy} needs a classifier; use flat")
        table = self.table(policy.gallery_classes)
        keys = [int(c) for c in classes[:policy.classes_used(probs)] if len(table.rows_of(int(c)))]
        if not keys:
            hits = self.nearest(query, [WHOLE_GALLERY], 1, k)
            hits.note = "the predicted classes' buckets are empty: searched the whole gallery"
            return hits
        if policy.reranks:
            return self._reranked(query, classes, probs, keys, policy, k)
        return self.nearest(query, keys, policy.gallery_classes, k)

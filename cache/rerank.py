"""Re-ranking on stored vectors: database-side augmentation (DBA), alpha query expansion (aQE) and k-reciprocal
re-ranking over a candidate pool. Pure numpy (faiss for neighbour lists) on L2-normalised float32 rows; sums of rows
are scaled back to unit length by the one L2 normalisation (models/outputs.unit_rows).

DBA replaces each gallery vector by a weighted mean of its nearest gallery vectors once (build time); aQE moves
the query towards its nearest gallery vectors and searches again (one extra search per query); k-reciprocal
re-ranking rescores a query's top candidates by how much their neighbourhoods overlap with the query's.
Leave-one-out validation on the gallery must not let the held-out row shape what it is scored against:
`dba(held_out=...)` and `LeaveOneOutDBA` give exactly the augmented gallery without that row's influence.
"""
from __future__ import annotations

import threading
from collections.abc import Callable
from functools import cached_property

import numpy as np

from lookalike.cache.indexes import (EXACT_MAX_ROWS, Truth, ivf_lists, knn_probes, knn_rows, lists_of_rows,
                                     make_index)
from lookalike.cache.metrics import rank_by_score
from lookalike.models.outputs import unit_rows

POOL = 100  # k-reciprocal re-ranks a query's best this many rows (faces MAP@R 0.745/0.771/0.780 at 20/50/100)
POOL_OFFSET = 10.0  # re-ranked pool scores are lifted above every row outside the pool, which keep their order
# A gallery image at this cosine (to its stored embedding) or above is a copy of the query: it ranks above every
# image that is not, whatever re-ranking says. A user who looks for "this photo in my gallery" expects it first.
EXACT_COPY_COSINE = 0.999
COPY_OFFSET = 1000.0  # above any re-ranked score (cosine + class bonus, or POOL_OFFSET + k-reciprocal + bonus)


def nearest(vectors: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, rows) of the k most similar rows of `vectors` for each query, best first (exact IP)."""
    import faiss

    k = min(k, len(vectors))
    return faiss.knn(np.ascontiguousarray(queries, np.float32), np.ascontiguousarray(vectors, np.float32), k,
                     metric=faiss.METRIC_INNER_PRODUCT)


def _weights(similarities: np.ndarray, alpha: float) -> np.ndarray:
    """Neighbour weights max(s, 0)^alpha (alpha 0: uniform)."""
    return np.maximum(similarities, 0.0) ** np.float32(alpha) if alpha else np.ones_like(similarities)


def nearest_others(vectors: np.ndarray, depth: int, exact_max_rows: int = EXACT_MAX_ROWS, index=None,
                   truth: Truth | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Each row's `depth` nearest *other* rows (its own row removed even when a duplicate ties with it): exact up to
    `exact_max_rows` rows, from an approximate k-NN graph above (KnnGraph, through `index` when given: an IVF,Flat
    index of `vectors`; tuned on `truth`, the gallery index's, when given)."""
    if len(vectors) > exact_max_rows:
        return KnnGraph(vectors, depth, index, truth).find(np.arange(len(vectors)))
    return _others(*nearest(vectors, vectors, depth + 1), np.arange(len(vectors)))


def _others(sims: np.ndarray, ids: np.ndarray, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The neighbour lists (sims, ids) of `rows` without each row itself: dropped where found, else the last column,
    so every row keeps one column fewer, best first."""
    own = ids == rows[:, None]
    drop = np.where(own.any(axis=1), own.argmax(axis=1), ids.shape[1] - 1)
    keep = np.ones(ids.shape, bool)
    keep[np.arange(len(ids)), drop] = False
    shape = (len(ids), ids.shape[1] - 1)
    return sims[keep].reshape(shape), ids[keep].reshape(shape)


class MadeOnce:
    """Rows of a matrix too large to make whole, each made when first read and kept: the parts a validation through
    the search path reads (its candidates' k-NN lists and DBA vectors: 19 % of the rows of a 10^6-row synthetic
    gallery). `make(rows)`, given with each read and not kept (an owner passing its own method makes no reference
    cycle, which held a whole validation's indexes until the garbage collector ran), gives the values of the arrays
    `shapes` describes (each row's shape, dtype) for those rows. They are stored one after another, as made, in blocks
    each twice the size of the one before: made rows never move (arrays grown by copying spent a tenth of a 10^6-row
    validation's queries in copies, under the lock readers waited on), and a block is allocated when the rows reach it
    (written into a gallery-sized matrix at scattered rows, they held whole 2 MB pages: 22 GB at 10^6 rows).
    Thread-safe: rows are read outside the lock."""

    FIRST_BLOCK = 1024  # rows

    def __init__(self, count: int, shapes: list[tuple[tuple, type]]):
        self._slot = np.full(count, -1, np.int64)  # where each row's values are, -1: not made
        self._shapes = shapes
        self._blocks: list[list[np.ndarray]] = []  # per block, one array per shape
        self._starts = [0]  # the first slot of each block, then the end of the last
        self._size = 0
        self._lock = threading.Lock()

    def __call__(self, rows: np.ndarray, make: Callable[[np.ndarray], tuple]) -> tuple[np.ndarray, ...]:
        self.make(rows, make)
        slots, blocks = self._slot[rows], self._blocks  # made rows are in blocks already listed, and never move
        block = np.searchsorted(np.asarray(self._starts), slots, side="right") - 1
        out = tuple(np.empty((len(rows), *shape), dtype) for shape, dtype in self._shapes)
        for number in np.unique(block):
            inside = np.flatnonzero(block == number)
            at = slots[inside] - self._starts[number]
            for values, stored in zip(out, blocks[number]):
                values[inside] = stored[at]
        return out

    def make(self, rows: np.ndarray, make: Callable[[np.ndarray], tuple]) -> None:
        """Make those of `rows` not made yet (outside the lock: two threads may make a row twice, alike, and never wait
        for each other's work)."""
        absent = self._slot[rows] < 0
        if not absent.any():
            return
        missing = np.unique(rows[absent])
        made = make(missing)
        with self._lock:
            fresh = self._slot[missing] < 0
            missing, made = missing[fresh], [part[fresh] for part in made]
            start, end = self._size, self._size + len(missing)
            while self._starts[-1] < end:
                rows_in_block = self.FIRST_BLOCK << len(self._blocks)
                self._blocks.append([np.empty((rows_in_block, *shape), dtype) for shape, dtype in self._shapes])
                self._starts.append(self._starts[-1] + rows_in_block)
            for number, (first, last) in enumerate(zip(self._starts, self._starts[1:])):
                if first < end and last > start:
                    lo, hi = max(first, start), min(last, end)
                    for stored, part in zip(self._blocks[number], made):
                        stored[lo - first:hi - first] = part[lo - start:hi - start]
            self._slot[missing] = np.arange(start, end)
            self._size = end


class KnnGraph:
    """Each row's `depth` nearest other rows through an IVF,Flat index of them (`index`: the one searches use, else
    made here), probed to recall@depth RECALL_TARGET (on the Truth of `vectors` the gallery index was tuned on, when
    given): a k-NN graph of any size in O(rows x probed rows), where an exact pass costs O(rows^2). Every row's at
    once (`find`: the build's DBA), or each row's when first asked for, kept (MadeOnce: a validation reads the lists
    of the rows its pools hold, not every row's)."""

    def __init__(self, vectors: np.ndarray, depth: int, index=None, truth: Truth | None = None):
        self.vectors = vectors
        self.index = index if index is not None else make_index(vectors, f"IVF{ivf_lists(len(vectors))},Flat")
        self.depth = min(depth, len(vectors) - 1)
        self._row_lists = lists_of_rows(self.index)
        self._probes = knn_probes(self.index, vectors, self.depth + 1, self._row_lists, truth=truth)
        self._lists = MadeOnce(len(vectors), [((self.depth,), np.float32), ((self.depth,), np.int64)])

    def find(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(sims, ids) of `rows`' nearest other rows, best first, found now and not kept."""
        found = knn_rows(self.index, self.vectors, rows, self.depth + 1, self._probes, self._row_lists)
        return _others(*found, rows)

    def __call__(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(sims, ids) of `rows`' nearest other rows, best first, each found once."""
        return self._lists(rows, self.find)

    def make(self, rows: np.ndarray) -> None:
        """Find the lists of `rows` now."""
        self._lists.make(rows, self.find)


def _mixed(own: np.ndarray, weights: np.ndarray, vectors: np.ndarray, ids: np.ndarray) -> np.ndarray:
    """own + sum_i weights_i * vectors[ids_i] per row: a sparse [rows x gallery] weight matrix times the vectors
    (scipy's loop reads each neighbour row once and builds no [rows, dim] temporary per neighbour: 5x faster than
    numpy column by column at 200,000 rows of 19 neighbours)."""
    import scipy.sparse

    starts = np.arange(0, ids.size + 1, max(1, ids.shape[1]))
    weights = scipy.sparse.csr_matrix((np.asarray(weights, np.float32).reshape(-1), ids.reshape(-1), starts),
                                      shape=(len(ids), len(vectors)))
    return np.asarray(own, np.float32) + np.asarray(weights @ vectors, np.float32)


def _augment(vectors: np.ndarray, own: np.ndarray, sims: np.ndarray, ids: np.ndarray, alpha: float) -> np.ndarray:
    """unit_rows(own + sum_i w_i * vectors[ids_i]) per row (the own row has similarity 1, so weight 1)."""
    return unit_rows(_mixed(own, _weights(sims, alpha), vectors, ids), in_place=True)


def _augment_without(vectors: np.ndarray, own: np.ndarray, sims: np.ndarray, ids: np.ndarray, k: int, alpha: float,
                     held_out: int) -> np.ndarray:
    """_augment over the first k-1 neighbours of each row that are not `held_out` (the next one takes its place)."""
    keep = ids != held_out
    keep &= np.cumsum(keep, axis=1) <= k - 1
    return unit_rows(_mixed(own, _weights(sims, alpha) * keep, vectors, ids), in_place=True)


def dba(vectors: np.ndarray, k: int, alpha: float = 0.0, held_out: int | None = None,
        exact_max_rows: int = EXACT_MAX_ROWS, index=None, truth: Truth | None = None) -> np.ndarray:
    """Database-side augmentation: each row becomes the normalised mean of its k nearest rows, itself included,
    weighted by similarity^alpha (k=1: unchanged); the nearest from an approximate k-NN graph above `exact_max_rows`
    rows (through `index`, an IVF,Flat index of `vectors`, and tuned on `truth`, when given). A `held_out` row
    contributes to no other row's vector (the gallery that row is scored against in leave-one-out validation)."""
    vectors = np.asarray(vectors, np.float32)
    if k <= 1 or len(vectors) < 2:
        return vectors.copy()
    extra = 1 if held_out is not None else 0
    sims, ids = nearest_others(vectors, min(k - 1 + extra, len(vectors) - 1), exact_max_rows, index, truth)
    if held_out is not None:
        return _augment_without(vectors, vectors, sims, ids, k, alpha, held_out)
    return _augment(vectors, vectors, sims, ids, alpha)


class LeaveOneOutDBA:
    """DBA of a gallery from which any one row can be held out exactly and cheaply: `augmented` is dba(vectors,
    k, alpha); holding out row q changes only the rows that had q among their k-1 nearest others (about k-1 rows),
    which are recomputed with their next neighbour instead. Equal to dba(vectors, k, alpha, held_out=q).
    `neighbours` (nearest_others of at least k columns, or a KnnGraph) lets several of them share one k-NN pass; over
    a gallery too large for a score matrix, a KnnGraph finds the lists of the rows read and rows_of makes only
    those rows' vectors (each once)."""

    def __init__(self, vectors: np.ndarray, k: int, alpha: float = 0.0,
                 neighbours: tuple[np.ndarray, np.ndarray] | KnnGraph | None = None):
        self.vectors = np.asarray(vectors, np.float32)
        self.k, self.alpha = k, alpha
        if k > 1 and not isinstance(neighbours, KnnGraph):
            sims, ids = neighbours or nearest_others(self.vectors, min(k, len(vectors) - 1))
            neighbours = lambda rows: (sims[rows], ids[rows])
        self._neighbours = neighbours
        self._rows = MadeOnce(len(self.vectors), [(self.vectors.shape[1:], np.float32)])
        self._changed: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # without(), memoised per held-out row

    def _lists(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(sims, ids) of the k-1 used and one spare nearest others of `rows` (the spare replaces a held-out one)."""
        sims, ids = self._neighbours(rows)
        depth = min(self.k, len(self.vectors) - 1)
        return sims[:, :depth], ids[:, :depth].astype(np.int64)

    def _augment_rows(self, rows: np.ndarray) -> tuple[np.ndarray]:
        if self.k <= 1:
            return (self.vectors[rows],)
        sims, ids = self._lists(rows)
        return (_augment(self.vectors, self.vectors[rows], sims[:, :self.k - 1], ids[:, :self.k - 1], self.alpha),)

    @cached_property
    def augmented(self) -> np.ndarray:
        """dba(vectors, k, alpha) of every row."""
        return self._rows(np.arange(len(self.vectors)), self._augment_rows)[0]

    @cached_property
    def _users(self) -> tuple[np.ndarray, np.ndarray]:
        """(rows listing q among their k-1 used neighbours grouped by q ascending, where each q's group starts)."""
        used = self._lists(np.arange(len(self.vectors)))[1][:, :self.k - 1] if self.k > 1 else np.zeros((0, 0), int)
        rows = np.repeat(np.arange(len(self.vectors)), used.shape[1])
        order = np.argsort(used.reshape(-1), kind="stable")
        return rows[order], np.searchsorted(used.reshape(-1)[order], np.arange(len(self.vectors) + 1))

    def without(self, row: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows, their augmented vectors) that differ when `row` is held out."""
        if row not in self._changed:
            users, starts = self._users
            users = users[starts[row]:starts[row + 1]]
            self._changed[row] = users, self._held_out_of(users, row)
        return self._changed[row]

    def prepare(self, rows: np.ndarray) -> None:
        """Make the vectors of `rows` (and their k-NN lists) now, in one batch, for rows_of to read."""
        self._rows.make(rows, self._augment_rows)

    def neighbours_of(self, rows: np.ndarray) -> None:
        """Find the k-NN lists of `rows` now, in one batch (a KnnGraph finds them once for every DBA sharing it)."""
        if isinstance(self._neighbours, KnnGraph):
            self._neighbours.make(rows)

    def _held_out_of(self, rows: np.ndarray, held_out: int) -> np.ndarray:
        """The augmented vectors of `rows` (each listing `held_out` among its k-1 used neighbours) without it: the next
        neighbour takes its place."""
        if len(rows) == 0:
            return np.zeros((0, self.vectors.shape[1]), np.float32)
        return _augment_without(self.vectors, self.vectors[rows], *self._lists(rows), self.k, self.alpha, held_out)

    def similarities(self, queries: np.ndarray, held_out: np.ndarray) -> np.ndarray:
        """queries @ augmented.T where row i is scored against the gallery without held_out[i]'s influence."""
        scores = np.asarray(queries, np.float32) @ self.augmented.T
        for i, row in enumerate(held_out):
            users, vectors = self.without(int(row))
            scores[i, users] = vectors @ queries[i]
        return scores

    def rows_of(self, rows: np.ndarray, held_out: int) -> np.ndarray:
        """The augmented vectors of `rows` as seen when `held_out` is held out (from `rows`' own lists: no other row's
        list is read)."""
        out = self._rows(rows, self._augment_rows)[0]
        if self.k > 1:
            changed = np.flatnonzero((self._lists(rows)[1][:, :self.k - 1] == held_out).any(axis=1))
            out[changed] = self._held_out_of(rows[changed], held_out)
        return out


def alpha_qe(query: np.ndarray, neighbours: np.ndarray, sims: np.ndarray, alpha: float, k: int) -> np.ndarray:
    """alpha query expansion (Radenovic et al.): unit_rows(q + sum over the k best neighbours of
    max(s, 0)^alpha * n). query [d] or [m, d]; neighbours [k', d] or [m, k', d], best first; sims alike."""
    query, neighbours, sims = np.asarray(query, np.float32), np.asarray(neighbours, np.float32), np.asarray(sims)
    weights = _weights(sims[..., :k].astype(np.float32), alpha)
    return unit_rows(query + np.einsum("...k,...kd->...d", weights, neighbours[..., :k, :]))


def k_reciprocal(query: np.ndarray, pool: np.ndarray, k1: int = 20, k2: int = 6, lam: float = 0.3) -> np.ndarray:
    """k-reciprocal re-ranking (Zhong et al. 2017) of a candidate pool for one query: a score per pool row, higher
    is better, from the Jaccard distance of k-reciprocal neighbourhoods (expanded, then averaged over k2
    neighbours) mixed with the original distance by `lam`. Everything comes from the query and the pool alone,
    so rows outside the pool (a held-out row) have no influence. Batched: query [..., d] and pool [..., n, d]
    give scores [..., n], each batch row exactly as alone."""
    query, pool = np.asarray(query, np.float32), np.asarray(pool, np.float32)
    points = np.concatenate([query[..., None, :], pool], axis=-2)
    n = points.shape[-2]
    distance = np.maximum(2.0 - 2.0 * (points @ np.swapaxes(points, -1, -2)), 0.0)
    ranks = rank_by_score(-distance)  # ascending distance, ties in pool order
    position = np.empty_like(ranks)
    np.put_along_axis(position, ranks, np.broadcast_to(np.arange(n), ranks.shape), axis=-1)
    own = np.eye(n, dtype=bool)

    def reciprocal(k: int) -> np.ndarray:
        near = (position <= k) | own  # a point is its own neighbour, also among exact duplicates
        return near & np.swapaxes(near, -1, -2)

    full, half = reciprocal(min(k1, n - 1)), reciprocal(min(round(k1 / 2), n - 1))
    full_f, half_f = full.astype(np.float32), half.astype(np.float32)
    # Expansion: add a member's half-size set when two thirds of it already lies in the full set.
    overlap = half_f @ np.swapaxes(full_f, -1, -2)  # [j, i] = |half_j & full_i| (BLAS, not int loops)
    adds = full & (np.swapaxes(overlap, -1, -2) > (2.0 / 3.0) * half.sum(axis=-1)[..., None, :])
    expanded = full | ((adds.astype(np.float32) @ half_f) > 0)
    weights = np.where(expanded, np.exp(-distance), np.float32(0.0))
    weights /= np.maximum(weights.sum(axis=-1, keepdims=True), 1e-12)
    if k2 > 1:  # each point's weights averaged over its k2 nearest points' (as a product: BLAS, not a gather)
        weights = ((position < k2).astype(np.float32) @ weights) / np.float32(min(k2, n))
    shared = np.minimum(weights[..., :1, :], weights[..., 1:, :]).sum(axis=-1)
    jaccard = 1.0 - shared / (2.0 - shared)
    original = distance[..., 0, 1:] / np.maximum(distance[..., 0, 1:].max(axis=-1, keepdims=True), 1e-12)
    return -((1.0 - lam) * jaccard + lam * original)


def copies_first(ranking: np.ndarray, cosine: np.ndarray) -> np.ndarray:
    """The order key that ranks exact copies of the query (plain `cosine` >= EXACT_COPY_COSINE) above every other
    candidate, among themselves by cosine, and the rest by `ranking`. Works on [n] and [queries, n] arrays."""
    return np.where(cosine >= EXACT_COPY_COSINE, COPY_OFFSET + cosine, ranking)

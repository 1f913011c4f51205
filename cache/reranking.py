"""The re-ranking pipeline, written once: how a re-ranked policy ranks a query's candidates.

1. class bonus: each candidate's score is its cosine to the gallery's vectors plus the caller's bonus (W * class
   agreement; -inf keeps a row out of the ranking);
2. DBA: the gallery's vectors are the DBA ones under +dba (the `RerankGallery` passed in);
3. alpha-QE (+qe:K@a): the query moves towards its K best candidates and is scored again;
4. k-reciprocal (+krecip:K1/K2): the best POOL candidates are re-scored by their shared neighbourhoods;
5. copies first: exact copies of the query rank above everything else.

The search (one query over its candidates), `auto`'s leave-one-out validation and the re-ranking study (batches of
queries, each one's own row held out of its gallery) differ only in the RerankGallery they pass.
"""
from __future__ import annotations

import sys
import threading
from typing import NamedTuple, Protocol

import numpy as np

from lookalike.cache.metrics import rank_by_score
from lookalike.cache.rerank import POOL, POOL_OFFSET, LeaveOneOutDBA, alpha_qe, copies_first, k_reciprocal

KRECIP_BATCH = 64  # queries k-reciprocal re-ranks at once (bounds its [batch, pool, pool] arrays)


class RerankGallery(Protocol):
    """The vectors a batch of queries is ranked against; `which` says which queries of the batch ask."""

    def similarities(self, queries: np.ndarray, which: np.ndarray) -> np.ndarray:
        """[len(queries), rows]: each query's score against every gallery row (-inf: a row out of its gallery)."""

    def vectors(self, rows: np.ndarray, which: np.ndarray) -> np.ndarray:
        """[len(rows), len(rows[i]), dim]: the vectors of rows[i] as query which[i] sees them."""


class FixedGallery:
    """The same vectors for every query: a search's candidates, or a gallery that holds no query."""

    def __init__(self, matrix: np.ndarray):
        self.matrix = matrix

    def similarities(self, queries: np.ndarray, which: np.ndarray) -> np.ndarray:
        return queries @ self.matrix.T

    def vectors(self, rows: np.ndarray, which: np.ndarray) -> np.ndarray:
        return np.asarray(self.matrix[rows], np.float32)


class HeldOutGallery:
    """Leave-one-out: query i is gallery row held_out[i], out of its own ranking and of every DBA vector it is
    scored against (LeaveOneOutDBA), so validation leaks nothing."""

    def __init__(self, base: LeaveOneOutDBA, held_out: np.ndarray):
        self.base, self.held_out = base, held_out

    def similarities(self, queries: np.ndarray, which: np.ndarray) -> np.ndarray:
        held_out = self.held_out[which]
        scores = self.base.similarities(queries, held_out)
        scores[np.arange(len(which)), held_out] = -np.inf  # the held-out row is not in its own gallery
        return scores

    def vectors(self, rows: np.ndarray, which: np.ndarray) -> np.ndarray:
        return np.stack([self.base.rows_of(r, int(q)) for r, q in zip(rows, self.held_out[which])])


class OneCore:
    """numpy's, faiss's BLAS and OpenMP held to one thread while any user is inside, shared safely by concurrent
    queries: the first to enter sets the limit and the last to leave restores it (threadpoolctl's context alone,
    entered from two threads, can restore the other's limit and leave it for good). k-reciprocal's many small
    products on one thread: threaded BLAS made them 50x slower on a busy 2-core machine (docs/rerank-study.md); a
    DBA matrix made for a request leaves the other core to the other queries."""

    def __init__(self):
        self._lock = threading.Lock()
        self._users = 0
        self._limits = None
        self._controller, self._modules = None, 0

    def __enter__(self) -> None:
        with self._lock:
            if self._users == 0:
                self._limits = self._libraries().limit(limits=1)
            self._users += 1

    def _libraries(self):
        """threadpoolctl's controller of the thread pools loaded, found again only when modules were imported since
        (finding them takes ~4 ms: 6 % of `auto`'s validation at 10^6 rows entered it once a k-reciprocal query)."""
        if self._controller is None or len(sys.modules) != self._modules:
            from threadpoolctl import ThreadpoolController

            self._controller, self._modules = ThreadpoolController(), len(sys.modules)
        return self._controller

    def __exit__(self, *exc) -> None:
        with self._lock:
            self._users -= 1
            if self._users == 0:
                self._limits.restore_original_limits()
                self._limits = None


ON_ONE_CORE = OneCore()


def expanded(gallery: RerankGallery, queries: np.ndarray, cosine: np.ndarray, ranking: np.ndarray,
              qe: tuple[int, float]) -> np.ndarray:
    """alpha-QE: each query expanded by its qe[0] best candidates by `ranking`, weighted by their cosine."""
    count, alpha = qe
    everyone = np.arange(len(queries))
    best = rank_by_score(ranking, min(count, ranking.shape[-1]))
    return alpha_qe(queries, gallery.vectors(best, everyone), np.take_along_axis(cosine, best, -1), alpha, count)


def _k_reciprocal(gallery: RerankGallery, queries: np.ndarray, ranking: np.ndarray, bonus: np.ndarray,
                  krecip: tuple[int, int]) -> None:
    """Re-scores each query's best POOL candidates (finite ones only) in place: POOL_OFFSET + k-reciprocal score
    + bonus, so the pool stays above every other row. Queries with pools of one size go in batches of KRECIP_BATCH."""
    pools = rank_by_score(ranking, min(POOL, ranking.shape[-1]))
    sizes = np.isfinite(np.take_along_axis(ranking, pools, -1)).sum(axis=-1)
    with ON_ONE_CORE:
        for start in range(0, len(queries), KRECIP_BATCH):
            batch = np.arange(start, min(start + KRECIP_BATCH, len(queries)))
            for size in np.unique(sizes[batch]):
                which = batch[sizes[batch] == size]
                pool = pools[which, :size]
                if size:
                    mutual = k_reciprocal(queries[which], gallery.vectors(pool, which), *krecip)
                    ranking[which[:, None], pool] = POOL_OFFSET + mutual + bonus[which[:, None], pool]


class Reranked(NamedTuple):
    scores: np.ndarray  # [m, rows] what each row was ranked by (cosine + bonus; POOL_OFFSET + k-reciprocal in the pool)
    order: np.ndarray  # [m, depth] rows best first: exact copies of the query first, then by `scores`


def rerank(gallery: RerankGallery, queries: np.ndarray, cosine: np.ndarray, bonus: np.ndarray | float,
           qe: tuple[int, float] | None = None, krecip: tuple[int, int] | None = None,
           plain: np.ndarray | None = None, depth: int | None = None) -> Reranked:
    """How each of `queries` [m, dim] ranks the gallery's rows, the pipeline's steps in order.

    `cosine` [m, rows] is gallery.similarities(queries) (passed in: policies that share a gallery share it);
    `bonus` the class term added to it (0.0: none); `plain` the cosine to the stored embeddings, for copies first
    (None: no copies-first step); `depth` how many rows `order` keeps (None: all)."""
    scores = cosine + bonus
    if qe:
        cosine = gallery.similarities(expanded(gallery, queries, cosine, scores, qe), np.arange(len(queries)))
        scores = cosine + bonus
    if krecip:
        _k_reciprocal(gallery, queries, scores, np.broadcast_to(bonus, scores.shape), krecip)
    return Reranked(scores, rank_by_score(scores if plain is None else copies_first(scores, plain), depth))

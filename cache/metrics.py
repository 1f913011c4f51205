"""Retrieval metrics over ranked relevance, one small function each.

Every function takes `relevance`, a bool array [queries, depth]: relevance[q, i] says whether the
(i+1)-th retrieved gallery item of query q shares its label (False past the end of what was
retrieved, e.g. outside the searched buckets), and `n_relevant` [queries], how many relevant items
the whole gallery holds for q. Per-query values are averaged over the queries that have at least one
relevant item. Rankings come from `rank_by_score`, which breaks ties by gallery order.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np


def _sort_keys(scores: np.ndarray) -> np.ndarray:
    """One int64 per float32 score that orders as the descending score, then the gallery index: unique keys, so an
    unstable (fast, partial) sort of them gives a stable sort's order. NaN sorts last, as in np.argsort."""
    descending = np.negative(scores, dtype=np.float32) + np.float32(0.0)  # -0.0 becomes 0.0: equal scores tie
    bits = descending.view(np.int32)
    keys = (bits ^ ((bits >> 31) & np.int32(0x7FFFFFFF))).astype(np.int64)  # IEEE bits to an ordered integer
    keys[np.isnan(descending)] = np.iinfo(np.int32).max
    keys <<= 32
    keys |= np.arange(scores.shape[-1], dtype=np.int64)
    return keys


def rank_by_score(scores: np.ndarray, depth: int | None = None) -> np.ndarray:
    """Gallery indices by descending score, the first `depth` only when given; equal scores keep gallery order,
    as a stable sort. float32 scores (every search and validation here) sort as unique keys: 2-3x faster than a
    stable argsort, and a partial sort when `depth` is well below the gallery size."""
    scores = np.asarray(scores)
    size = scores.shape[-1]
    if scores.dtype != np.float32 or size >= 2**32:
        order = np.argsort(-scores, axis=-1, kind="stable")
        return order[..., :depth] if depth else order
    keys = _sort_keys(scores)
    if depth and depth < size // 4:
        keys = np.partition(keys, depth - 1, axis=-1)[..., :depth]
    keys.sort(axis=-1)
    keys &= 0xFFFFFFFF
    return keys[..., :depth] if depth else keys


def relevance_matrix(ranked: np.ndarray, query_labels: np.ndarray, gallery_labels: np.ndarray,
                     valid: np.ndarray | None = None) -> np.ndarray:
    """Bool [queries, depth]: ranked gallery index has the query's label (and `valid` is True there)."""
    relevant = np.asarray(gallery_labels)[ranked] == np.asarray(query_labels)[:, None]
    return relevant & valid if valid is not None else relevant


def leave_one_out(scores: np.ndarray, own: np.ndarray, query_labels: np.ndarray,
                  gallery_labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(order, relevance), both [queries, gallery - 1]: gallery rows ranked by `scores` [queries, gallery] with each
    query's own gallery row (`own`) left out. The one leave-one-out evaluator of `auto`, fitted weights and
    training validation."""
    scores = np.array(scores, dtype=np.float32)
    scores[np.arange(len(own)), own] = -np.inf  # sorts last, then dropped
    order = rank_by_score(scores)[:, :-1]
    return order, relevance_matrix(order, query_labels, gallery_labels)


def _mean(values: np.ndarray, n_relevant: np.ndarray) -> float:
    keep = np.asarray(n_relevant) > 0
    return float(np.mean(values[keep])) if keep.any() else float("nan")


def _padded(relevance: np.ndarray, depth: int) -> np.ndarray:
    """The first `depth` columns, padded with False when fewer were retrieved (k > gallery size)."""
    relevance = np.asarray(relevance, dtype=bool)
    if relevance.shape[1] >= depth:
        return relevance[:, :depth]
    return np.pad(relevance, ((0, 0), (0, depth - relevance.shape[1])))


def precision_at_k(relevance: np.ndarray, n_relevant: np.ndarray, k: int) -> float:
    """P@k = (relevant items in the top k) / k; the denominator stays k when fewer were retrieved."""
    return _mean(_padded(relevance, k).sum(axis=1) / k, n_relevant)


def average_precision_at_k(relevance: np.ndarray, n_relevant: np.ndarray, k: int) -> np.ndarray:
    """Per-query AP@k = sum_{i<=k} P@i * rel_i / min(k, R), R = relevant items in the gallery."""
    top = _padded(relevance, k).astype(np.float64)
    precision = np.cumsum(top, axis=1) / np.arange(1, k + 1)
    norm = np.minimum(k, np.maximum(np.asarray(n_relevant), 1))
    return (precision * top).sum(axis=1) / norm


def map_at_k(relevance: np.ndarray, n_relevant: np.ndarray, k: int) -> float:
    """mAP@k: the mean of AP@k over queries."""
    return _mean(average_precision_at_k(relevance, n_relevant, k), n_relevant)


def map_at_r(relevance: np.ndarray, n_relevant: np.ndarray) -> float:
    """MAP@R (Musgrave et al. 2020, as in pytorch-metric-learning): AP over the top R, divided by R."""
    n_relevant = np.asarray(n_relevant)
    depth = int(n_relevant.max(initial=1))
    top = _padded(relevance, depth).astype(np.float64)
    within_r = np.arange(depth)[None, :] < n_relevant[:, None]
    top = top * within_r
    precision = np.cumsum(top, axis=1) / np.arange(1, depth + 1)
    return _mean((precision * top).sum(axis=1) / np.maximum(n_relevant, 1), n_relevant)


def r_precision(relevance: np.ndarray, n_relevant: np.ndarray) -> float:
    """Relevant items among the top R, divided by R."""
    n_relevant = np.asarray(n_relevant)
    depth = int(n_relevant.max(initial=1))
    within_r = np.arange(depth)[None, :] < n_relevant[:, None]
    hits = (_padded(relevance, depth) & within_r).sum(axis=1)
    return _mean(hits / np.maximum(n_relevant, 1), n_relevant)


def recall_at_k(relevance: np.ndarray, n_relevant: np.ndarray, k: int) -> float:
    """recall@k as in re-identification (CMC@k): share of queries with a relevant item in the top k."""
    return _mean(_padded(relevance, k).any(axis=1).astype(np.float64), n_relevant)


def cmc_curve(relevance: np.ndarray, n_relevant: np.ndarray, max_k: int) -> np.ndarray:
    """CMC@1..max_k."""
    return np.array([recall_at_k(relevance, n_relevant, k) for k in range(1, max_k + 1)])


def first_relevant_rank(relevance: np.ndarray, n_gallery: int) -> np.ndarray:
    """1-based rank of the first relevant item; a query whose list holds none gets n_gallery + 1."""
    relevance = np.asarray(relevance, dtype=bool)
    found = relevance.any(axis=1)
    return np.where(found, relevance.argmax(axis=1) + 1, n_gallery + 1)


def mean_rank(relevance: np.ndarray, n_relevant: np.ndarray, n_gallery: int) -> float:
    return _mean(first_relevant_rank(relevance, n_gallery).astype(np.float64), n_relevant)


def median_rank(relevance: np.ndarray, n_relevant: np.ndarray, n_gallery: int) -> float:
    ranks = first_relevant_rank(relevance, n_gallery)[np.asarray(n_relevant) > 0]
    return float(np.median(ranks)) if len(ranks) else float("nan")


def mean_reciprocal_rank(relevance: np.ndarray, n_relevant: np.ndarray) -> float:
    """MRR: mean of 1 / first relevant rank (0 when none was retrieved)."""
    relevance = np.asarray(relevance, dtype=bool)
    reciprocal = np.where(relevance.any(axis=1), 1.0 / (relevance.argmax(axis=1) + 1), 0.0)
    return _mean(reciprocal, n_relevant)


Metric = Callable[[np.ndarray, np.ndarray, int], float]

# The metrics the benchmark reports, by name: (relevance, n_relevant, n_gallery) -> value.
METRICS: dict[str, Metric] = {
    "P@1": lambda rel, n, g: precision_at_k(rel, n, 1),
    "P@5": lambda rel, n, g: precision_at_k(rel, n, 5),
    "mAP@10": lambda rel, n, g: map_at_k(rel, n, 10),
    "mAP@50": lambda rel, n, g: map_at_k(rel, n, 50),
    "MAP@R": lambda rel, n, g: map_at_r(rel, n),
    "R-precision": lambda rel, n, g: r_precision(rel, n),
    "recall@1": lambda rel, n, g: recall_at_k(rel, n, 1),
    "recall@5": lambda rel, n, g: recall_at_k(rel, n, 5),
    "mean_rank": mean_rank,
    "median_rank": median_rank,
    "MRR": lambda rel, n, g: mean_reciprocal_rank(rel, n),
}


def compute_metrics(relevance: np.ndarray, n_relevant: np.ndarray, n_gallery: int) -> dict[str, float]:
    return {name: metric(relevance, n_relevant, n_gallery) for name, metric in METRICS.items()}

"""Choosing the `fused` policy's weight on the gallery itself (never on test queries)."""
from __future__ import annotations

import numpy as np

from cache.search import Searcher
from pipeline.metrics import map_at_r
from pipeline.policies import BucketPolicy

WEIGHTS = (0.0, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)


def leave_one_out_relevance(searcher: Searcher, policy: BucketPolicy, rows: np.ndarray, labels: np.ndarray,
                            depth: int) -> tuple[np.ndarray, np.ndarray]:
    """Relevance [len(rows), depth] of gallery rows used as queries against the rest of the gallery."""
    columns = searcher.data.columns
    relevance = np.zeros((len(rows), depth), dtype=bool)
    for i, row in enumerate(rows):
        hits = searcher.search(np.asarray(columns["embeddings"][row]), policy, depth + 1,
                               columns["classes"][row], columns["probs"][row])
        found = hits.rows[hits.rows != row][:depth]
        relevance[i, :len(found)] = labels[found] == labels[row]
    n_relevant = np.array([(labels == labels[row]).sum() - 1 for row in rows])
    return relevance, n_relevant


def fit_fused_weight(searcher: Searcher, policy: BucketPolicy, validation_fraction: float = 0.2,
                     seed: int = 0, weights: tuple[float, ...] = WEIGHTS) -> float | None:
    """The weight with the best leave-one-out MAP@R on a seeded sample of labelled gallery images.

    None when the gallery has no labels to validate with.
    """
    labels = np.asarray(searcher.data.columns["labels"])
    labelled = np.flatnonzero(labels != "")
    if len(set(labels[labelled].tolist())) < 2:
        return None
    rng = np.random.default_rng(seed)
    rows = rng.permutation(labelled)[:max(1, int(validation_fraction * len(labelled)))]
    depth = int(max((labels == labels[row]).sum() for row in rows))
    scores = {}
    for weight in weights:
        candidate = BucketPolicy("fused", policy.query_classes, policy.gallery_classes, weight)
        relevance, n_relevant = leave_one_out_relevance(searcher, candidate, rows, labels, depth)
        scores[weight] = map_at_r(relevance, n_relevant)
    return max(scores, key=lambda w: (scores[w], -w))

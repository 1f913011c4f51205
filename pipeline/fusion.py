"""Choosing bucket policies and the `fused` weight on the labelled gallery itself, never on test queries.

Validation: a seeded sample of gallery images each queries the rest of the gallery (leave-one-out);
the policy (and weight) with the best MAP@R wins, flat search unless another beats it.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from cache.search import Searcher
from pipeline.metrics import map_at_r
from pipeline.policies import BucketPolicy, parse_policy

WEIGHTS = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0)
# What `auto` chooses among (measured on caltech101-22, AT&T faces and tiny-imagenet-20: BENCHMARKS.md).
AUTO_CANDIDATES = ("flat", "fused:5+soft:3", "fused:10+soft:3", "fused:10+soft:5")


def validation_rows(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray | None:
    """A seeded sample of labelled gallery rows; None when fewer than two labels exist."""
    labelled = np.flatnonzero(labels != "")
    if len(set(labels[labelled].tolist())) < 2:
        return None
    return np.random.default_rng(seed).permutation(labelled)[:max(1, int(fraction * len(labelled)))]


def leave_one_out_map_at_r(searcher: Searcher, policy: BucketPolicy, rows: np.ndarray) -> float:
    """MAP@R of gallery `rows` used as queries against the rest of the gallery under `policy`."""
    columns = searcher.data.columns
    labels = np.asarray(columns["labels"])
    n_relevant = np.array([(labels == labels[row]).sum() - 1 for row in rows])
    depth = int(n_relevant.max(initial=1))
    relevance = np.zeros((len(rows), depth), dtype=bool)
    for i, row in enumerate(rows):
        hits = searcher.search(np.asarray(columns["embeddings"][row]), policy, depth + 1,
                               columns["classes"][row], columns["probs"][row])
        found = hits.rows[hits.rows != row][:depth]
        relevance[i, :len(found)] = labels[found] == labels[row]
    return map_at_r(relevance, n_relevant)


def fit_fused_weight(searcher: Searcher, policy: BucketPolicy, rows: np.ndarray) -> tuple[float, float]:
    """(weight, validation MAP@R) of the best weight for a fused policy; ties go to the smaller weight."""
    scores = {w: leave_one_out_map_at_r(searcher, replace(policy, weight=w), rows) for w in WEIGHTS}
    best = max(scores, key=lambda w: (scores[w], -w))
    return best, scores[best]


def tune_policy(searcher: Searcher, policy: BucketPolicy, rows: np.ndarray) -> tuple[BucketPolicy, float]:
    """The policy with its weight fitted when it is fused without one, and its validation MAP@R."""
    if policy.kind == "fused" and policy.weight is None:
        weight, score = fit_fused_weight(searcher, policy, rows)
        return replace(policy, weight=weight), score
    return policy, leave_one_out_map_at_r(searcher, policy, rows)


def choose_policy(searcher: Searcher, candidates: tuple[str, ...] = AUTO_CANDIDATES, fraction: float = 0.2,
                  seed: int = 0, min_gain: float = 0.01) -> BucketPolicy | None:
    """The candidate with the best leave-one-out MAP@R on the gallery; None without labels.

    A candidate must beat the first one (flat) by `min_gain` MAP@R: a smaller gain on a validation
    sample is as likely noise as signal, and flat search is the simpler choice.
    """
    rows = validation_rows(np.asarray(searcher.data.columns["labels"]), fraction, seed)
    if rows is None:
        return None
    tuned = [tune_policy(searcher, parse_policy(text), rows) for text in candidates]
    baseline, baseline_score = tuned[0]
    best, best_score = max(tuned[1:], key=lambda pair: pair[1], default=(baseline, baseline_score))
    return best if best_score >= baseline_score + min_gain else baseline

"""Choosing bucket policies and the `fused` weight on the labelled gallery itself, never on test queries.

Validation: a seeded sample of gallery images each queries the rest of the gallery (leave-one-out).
A policy must match flat search's P@1 there and beat its MAP@R to be chosen; otherwise flat stays.
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from cache.search import Searcher
from pipeline.metrics import map_at_r, precision_at_k
from pipeline.policies import BucketPolicy, parse_policy

WEIGHTS = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0)
# What `auto` chooses among (measured on caltech101-22, AT&T faces and tiny-imagenet-20: BENCHMARKS.md).
AUTO_CANDIDATES = ("flat", "fused:5+soft:3", "fused:10+soft:3", "fused:10+soft:5")


VALIDATION_LIMIT = 300  # enough queries for a stable MAP@R; keeps the choice cheap for large galleries


def validation_rows(labels: np.ndarray, fraction: float, seed: int, limit: int = VALIDATION_LIMIT) -> np.ndarray | None:
    """A seeded sample of labelled gallery rows (`fraction`, at most `limit`); None with fewer than two labels."""
    labelled = np.flatnonzero(labels != "")
    if len(set(labels[labelled].tolist())) < 2:
        return None
    return np.random.default_rng(seed).permutation(labelled)[:min(limit, max(1, int(fraction * len(labelled))))]


def leave_one_out(searcher: Searcher, policy: BucketPolicy, rows: np.ndarray) -> tuple[float, float]:
    """(MAP@R, P@1) of gallery `rows` used as queries against the rest of the gallery under `policy`."""
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
    return map_at_r(relevance, n_relevant), precision_at_k(relevance, n_relevant, 1)


def tune_policy(searcher: Searcher, policy: BucketPolicy, rows: np.ndarray,
                p1_floor: float = 0.0) -> tuple[BucketPolicy, tuple[float, float]]:
    """The policy (its weight fitted when fused without one) and its validation (MAP@R, P@1).

    The weight is the one with the best MAP@R among those whose P@1 stays at or above `p1_floor`
    (flat search's P@1, so ranking by class agreement never costs the nearest neighbour); ties go to
    the smaller weight. When no weight keeps the floor, the best MAP@R wins.
    """
    if policy.kind != "fused" or policy.weight is not None:
        return policy, leave_one_out(searcher, policy, rows)
    scores = {w: leave_one_out(searcher, replace(policy, weight=w), rows) for w in WEIGHTS}
    eligible = [w for w in WEIGHTS if scores[w][1] >= p1_floor] or list(WEIGHTS)
    best = max(eligible, key=lambda w: (scores[w][0], -w))
    return replace(policy, weight=best), scores[best]


def choose_policy(searcher: Searcher, candidates: tuple[str, ...] = AUTO_CANDIDATES, fraction: float = 0.2,
                  seed: int = 0, min_gain: float = 0.01) -> BucketPolicy | None:
    """The candidate with the best leave-one-out MAP@R on the gallery; None without labels.

    The first candidate (flat) is the baseline: another wins only with P@1 at least the baseline's and
    MAP@R at least `min_gain` above it (a smaller gain on a validation sample is as likely noise).
    """
    rows = validation_rows(np.asarray(searcher.data.columns["labels"]), fraction, seed)
    if rows is None:
        return None
    baseline, (base_map, base_p1) = tune_policy(searcher, parse_policy(candidates[0]), rows)
    tuned = [tune_policy(searcher, parse_policy(text), rows, base_p1) for text in candidates[1:]]
    eligible = [(policy, score) for policy, score in tuned if score[1] >= base_p1 and score[0] >= base_map + min_gain]
    return max(eligible, key=lambda pair: pair[1][0])[0] if eligible else baseline

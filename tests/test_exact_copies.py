"""An exact copy of the query (cosine >= 0.999) ranks above every image that is not one, whatever re-ranking does:
in search, and in `auto`'s validation, which scores the rule it ships."""
from __future__ import annotations

import numpy as np
import pytest

from lookalike.cache.autopolicy import rerank_scores, validation_split
from lookalike.cache.manifest import Manifest
from lookalike.cache.policies import parse_policy
from lookalike.cache.search import Searcher
from lookalike.cache.columns import empty_columns
from lookalike.cache.generations import write_generation
from lookalike.cache.store import load_cache

DIM = 16


def unit(vectors: np.ndarray) -> np.ndarray:
    return (vectors / np.linalg.norm(vectors, axis=-1, keepdims=True)).astype(np.float32)


def copies_beside_a_tight_cluster(groups: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Per group: a photo and its exact copy (label 'photo-g'), and 8 near-identical images of another label at
    cosine ~0.93 to it. DBA pulls the cluster together and query expansion drifts into it."""
    rng = np.random.default_rng(seed)
    vectors, labels = [], []
    for g in range(groups):
        base = unit(rng.normal(size=DIM))
        aside = unit(rng.normal(size=DIM))
        aside = unit(aside - (aside @ base) * base)
        centre = unit(base + 0.4 * aside)
        vectors += [base, base]
        labels += [f"photo-{g}"] * 2
        vectors += list(unit(centre + 0.02 * rng.normal(size=(8, DIM))))
        labels += [f"cluster-{g}"] * 8
    return np.stack(vectors), np.array(labels)


def write_cache(tmp_path, vectors: np.ndarray, labels: np.ndarray):
    count = len(vectors)
    columns = empty_columns(DIM, 1)
    columns.update(paths=np.array([f"{i}.png" for i in range(count)]), sizes=np.zeros(count, np.int64),
                   mtimes=np.zeros(count, np.int64), labels=labels, label_classes=np.full(count, -1, np.int32),
                   classes=np.zeros((count, 1), np.int32), probs=np.ones((count, 1), np.float32),
                   boxes=np.zeros((count, 4), np.float32), embeddings=vectors)
    write_generation(tmp_path / "cache", Manifest({}, {}, str(tmp_path), count, DIM), columns)
    return load_cache(tmp_path / "cache")


@pytest.mark.parametrize("policy", ["flat+dba:5+qe:10", "flat@0.5+dba:5+qe:10", "flat+qe:10", "flat+dba:8",
                                    "flat+krecip:20/6", "fused:1@2+qe:10", "flat"])
def test_copies_of_the_query_come_first_under_every_policy(tmp_path, policy):
    vectors, labels = copies_beside_a_tight_cluster(1)
    searcher = Searcher(write_cache(tmp_path, vectors, labels))
    hits = searcher.search(vectors[0], parse_policy(policy), 5, classes=np.zeros(1, np.int32),
                           probs=np.ones(1, np.float32))
    assert sorted(hits.rows[:2].tolist()) == [0, 1], (policy, hits.rows, hits.scores, hits.rank_scores)
    assert hits.scores[:2] == pytest.approx([1.0, 1.0], abs=1e-5)


def test_auto_validation_scores_the_same_rule():
    """Held-out photos whose copy stays in the validation gallery find it first under every re-ranked policy."""
    vectors, labels = copies_beside_a_tight_cluster(30)
    columns = {"embeddings": vectors, "labels": labels, "classes": np.zeros((len(labels), 1), np.int32),
               "probs": np.ones((len(labels), 1), np.float32)}
    gallery, queries = validation_split(labels, 0)
    assert len(gallery) == len(labels)  # leave-one-out over every row: each held-out photo's copy stays in
    has_copy = np.char.startswith(labels[queries], "photo")
    assert has_copy.sum() >= 30
    policies = [parse_policy(p) for p in ("flat", "flat+dba:5+qe:10", "flat+qe:10", "flat+krecip:20/6")]
    for policy, score in rerank_scores(columns, policies, 0).items():
        assert score.hits[has_copy].all(), policy

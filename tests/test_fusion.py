"""`auto` and the fused weight are chosen on the gallery: buckets are used only where they lose nothing."""
from __future__ import annotations

import json

import numpy as np
import pytest

from lookalike.cache.autopolicy import FLAT, Score, choose_policy, fit_weights, loo_scores, not_worse
from lookalike.cache.manifest import Manifest
from lookalike.cache.metrics import map_at_r, precision_at_k
from lookalike.cache.policies import parse_policy, resolve_auto
from lookalike.cache.search import Searcher
from lookalike.cache.columns import empty_columns
from lookalike.cache.store import CacheData

CLASSES = 20  # the classifier's classes; each image keeps its 10 most probable
PROBS = np.array([0.83] + [0.17 / 9] * 9, np.float32)  # a nucleus of 0.8 is 1 class, 0.9 is 5, 0.95 is 8


def gallery_columns(informative_classes: bool, per_label: int = 60) -> dict[str, np.ndarray]:
    """6 labels; embeddings carry a weak label signal; the top class is the label's (informative) or
    random, the other nine stored classes random."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(6), per_label)
    count = len(labels)
    embeddings = rng.normal(size=(count, 16)) + 3.0 * np.eye(16)[labels]
    embeddings = (embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)).astype(np.float32)
    top1 = labels if informative_classes else rng.integers(0, 6, count)
    others = [rng.permutation(np.delete(np.arange(CLASSES), top))[:9] for top in top1]
    columns = empty_columns(16, 10)
    columns.update(paths=np.array([f"{i}.jpg" for i in range(count)]), labels=np.array([f"l{x}" for x in labels]),
                   label_classes=np.full(count, -1, np.int32),
                   classes=np.column_stack([top1, np.stack(others)]).astype(np.int32),
                   probs=np.tile(PROBS, (count, 1)), embeddings=embeddings)
    return columns


def test_informative_classes_make_auto_choose_a_bucketed_policy():
    columns = gallery_columns(informative_classes=True)
    chosen = choose_policy(columns, rerank=False)
    assert chosen.kind == "fused" and chosen.weight is not None and parse_policy(str(chosen)) == chosen
    scores = loo_scores(columns, [FLAT, chosen])
    assert scores[chosen].candidates < 0.5 and scores[chosen].map_at_r > scores[FLAT].map_at_r


def test_uninformative_classes_leave_flat_search():
    assert choose_policy(gallery_columns(informative_classes=False), rerank=False) == FLAT


def test_unlabelled_gallery_has_no_choice():
    columns = gallery_columns(informative_classes=True)
    columns["labels"] = np.array([""] * len(columns["labels"]))
    assert choose_policy(columns) is None and fit_weights(columns, [parse_policy("fused:3")]) == {}


def test_fitted_weight_ranks_at_least_as_well_as_the_unfitted_ones_and_keeps_the_policy():
    columns = gallery_columns(informative_classes=True)
    policy = parse_policy("fused:10~0.8+soft:3")
    fitted = fit_weights(columns, [policy])[policy]
    assert (fitted.query_classes, fitted.nucleus, fitted.gallery_classes) == (10, 0.8, 3)
    others = [parse_policy(f"fused:10~0.8@{w}+soft:3") for w in (0, 0.5)]
    scores = loo_scores(columns, [fitted, *others])
    assert all(scores[fitted].map_at_r >= scores[other].map_at_r for other in others)


@pytest.mark.parametrize("text", ["flat", "fused:10~0.8@0.5+soft:3", "fused:5@0+soft:7", "fused:10~0.95@0.25+soft:10"])
def test_leave_one_out_scores_match_searching_query_by_query(tmp_path, text):
    """The vectorised evaluator gives what Searcher.search gives, each gallery row querying the others."""
    columns = gallery_columns(informative_classes=True, per_label=15)
    policy = parse_policy(text)
    score = loo_scores(columns, [policy])[policy]
    searcher = Searcher(CacheData.in_memory(columns, tmp_path))
    labels, count = columns["labels"], len(columns["labels"])
    relevance, candidates = np.zeros((count, count - 1), bool), 0
    for row in range(count):
        hits = searcher.search(columns["embeddings"][row], policy, count, columns["classes"][row],
                               columns["probs"][row])
        found = hits.rows[hits.rows != row]
        relevance[row, :len(found)] = labels[found] == labels[row]
        candidates += hits.candidates
    n_relevant = np.full(count, 14)
    assert score.map_at_r == pytest.approx(map_at_r(relevance, n_relevant))
    assert score.p_at_1 == pytest.approx(precision_at_k(relevance, n_relevant, 1))
    assert score.hits.tolist() == relevance[:, 0].tolist()
    assert score.candidates == pytest.approx(candidates / count ** 2)


def sign_case(losses: int, wins: int, map_gain: float) -> tuple[Score, Score]:
    """(policy, flat) scores over 20 queries: flat alone right on `losses`, the policy alone on `wins`."""
    flat = np.zeros(20, bool)
    flat[:losses] = True
    policy = np.zeros(20, bool)
    policy[losses:losses + wins] = True
    return Score(0.5 + map_gain, policy.mean(), policy, 0.3), Score(0.5, flat.mean(), flat, 1.0)


@pytest.mark.parametrize("losses, wins, map_gain, eligible", [
    (0, 0, 0.0, True),  # the same answers: a tie is not worse
    (1, 0, 0.1, True),  # one loss among one disagreement: 1 <= sqrt(1)
    (2, 0, 0.1, False),  # 2 > sqrt(2)
    (3, 1, 0.1, True),  # 2 <= sqrt(4)
    (4, 1, 0.1, False),  # 3 > sqrt(5)
    (0, 3, -0.01, False),  # better P@1 but a lower MAP@R
])
def test_paired_sign_count_decides_eligibility(losses, wins, map_gain, eligible):
    assert not_worse(*sign_case(losses, wins, map_gain)) is eligible


def test_a_format_1_manifest_reads_its_auto_choice():
    """Caches built before format 2 recorded the choice as `default_buckets`; `auto` still means it."""
    old = {"format_version": 1, "fingerprint": {}, "config": {"classifier": "mobilenetv2"}, "gallery_root": "/g",
           "count": 0, "dim": 4, "default_buckets": "fused:10~0.8@0+soft:7", "fused_weight": 0}
    manifest = Manifest.from_json(json.dumps(old), "old cache")
    assert resolve_auto("auto", manifest.default_policy) == "fused:10~0.8@0+soft:7"
    assert manifest.weight_for(None) == 0  # a fitted weight of 0 stays 0
    assert resolve_auto("topk:3", manifest.default_policy) == "topk:3"

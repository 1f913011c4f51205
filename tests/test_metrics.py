"""Metric functions against hand-computed values."""
from __future__ import annotations

import numpy as np
import pytest

from lookalike.cache import metrics as m

# Query 0: relevant at ranks 1 and 3 of 5, R = 2.  Query 1: relevant at rank 2, R = 3 (2 never retrieved).
RELEVANCE = np.array([[1, 0, 1, 0, 0], [0, 1, 0, 0, 0]], dtype=bool)
N_RELEVANT = np.array([2, 3])


def test_precision_at_k():
    assert m.precision_at_k(RELEVANCE, N_RELEVANT, 1) == pytest.approx(0.5)
    assert m.precision_at_k(RELEVANCE, N_RELEVANT, 3) == pytest.approx((2 / 3 + 1 / 3) / 2)


def test_k_larger_than_the_list_keeps_k_as_denominator():
    assert m.precision_at_k(RELEVANCE, N_RELEVANT, 10) == pytest.approx((2 / 10 + 1 / 10) / 2)
    assert m.recall_at_k(RELEVANCE, N_RELEVANT, 10) == 1.0


def test_average_precision_at_k_normalises_by_min_k_r():
    # q0: (1/1 + 2/3) / min(5, 2);  q1: (1/2) / min(5, 3)
    assert m.average_precision_at_k(RELEVANCE, N_RELEVANT, 5).tolist() == pytest.approx([(1 + 2 / 3) / 2, 0.5 / 3])
    # k = 2: q0 (1/1) / 2; q1 (1/2) / 2
    assert m.map_at_k(RELEVANCE, N_RELEVANT, 2) == pytest.approx((0.5 + 0.25) / 2)


def test_map_at_r_and_r_precision():
    # q0 R=2: top 2 = [1, 0] -> AP = 1/2; q1 R=3: top 3 = [0, 1, 0] -> (1/2)/3
    assert m.map_at_r(RELEVANCE, N_RELEVANT) == pytest.approx((0.5 + 1 / 6) / 2)
    assert m.r_precision(RELEVANCE, N_RELEVANT) == pytest.approx((1 / 2 + 1 / 3) / 2)


def test_map_at_r_matches_pytorch_metric_learning():
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    rng = np.random.default_rng(0)
    gallery, queries = rng.normal(size=(40, 8)).astype(np.float32), rng.normal(size=(10, 8)).astype(np.float32)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)  # unit vectors: L2 and cosine rank alike
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    gallery_labels, query_labels = rng.integers(0, 4, 40), rng.integers(0, 4, 10)
    ranked = m.rank_by_score(queries @ gallery.T)
    relevance = m.relevance_matrix(ranked, query_labels, gallery_labels)
    n_relevant = (gallery_labels[None] == query_labels[:, None]).sum(1)
    import torch

    expected = AccuracyCalculator(include=("mean_average_precision_at_r", "r_precision")).get_accuracy(
        torch.tensor(queries), torch.tensor(query_labels), torch.tensor(gallery), torch.tensor(gallery_labels),
        ref_includes_query=False)
    assert m.map_at_r(relevance, n_relevant) == pytest.approx(expected["mean_average_precision_at_r"], abs=1e-6)
    assert m.r_precision(relevance, n_relevant) == pytest.approx(expected["r_precision"], abs=1e-6)


def test_ranks_and_reciprocal_rank():
    assert m.first_relevant_rank(RELEVANCE, 5).tolist() == [1, 2]
    assert m.mean_rank(RELEVANCE, N_RELEVANT, 5) == 1.5 and m.median_rank(RELEVANCE, N_RELEVANT, 5) == 1.5
    assert m.mean_reciprocal_rank(RELEVANCE, N_RELEVANT) == pytest.approx(0.75)


def test_no_relevant_retrieved_gets_worst_rank_and_zero_reciprocal():
    relevance = np.zeros((1, 3), dtype=bool)
    assert m.first_relevant_rank(relevance, 10).tolist() == [11]
    assert m.mean_reciprocal_rank(relevance, np.array([2])) == 0.0


def test_queries_without_relevant_items_are_left_out_of_averages():
    relevance = np.array([[1, 0], [0, 0]], dtype=bool)
    assert m.precision_at_k(relevance, np.array([1, 0]), 1) == 1.0
    assert np.isnan(m.map_at_r(relevance, np.array([0, 0])))


def test_ties_are_broken_by_gallery_order():
    assert m.rank_by_score(np.array([[0.5, 0.9, 0.5, 0.9]])).tolist() == [[1, 3, 0, 2]]


def test_cmc_is_non_decreasing():
    curve = m.cmc_curve(RELEVANCE, N_RELEVANT, 4)
    assert curve.tolist() == [0.5, 1.0, 1.0, 1.0]


def test_every_reported_metric_has_its_hand_computed_value():
    expected = {"P@1": 0.5, "P@5": 0.3, "mAP@10": ((1 + 2 / 3) / 2 + 0.5 / 3) / 2, "mAP@50": ((1 + 2 / 3) / 2 + 0.5 / 3) / 2,
                "MAP@R": (1 / 2 + 0.5 / 3) / 2, "R-precision": (1 / 2 + 1 / 3) / 2, "recall@1": 0.5, "recall@5": 1.0,
                "mean_rank": 1.5, "median_rank": 1.5, "MRR": 0.75}
    assert m.compute_metrics(RELEVANCE, N_RELEVANT, 5) == pytest.approx(expected)

"""The re-ranking pipeline (class bonus -> alpha-QE -> k-reciprocal -> copies first) against values worked out by
hand on a gallery of 2-D unit vectors, so a change to any step or to their order shows here."""
from __future__ import annotations

import numpy as np
import pytest
from lookalike.cache import reranking
from lookalike.cache.rerank import LeaveOneOutDBA
from lookalike.cache.reranking import FixedGallery, HeldOutGallery, rerank

QUERY = np.array([[1.0, 0.0]], np.float32)


def run(gallery: np.ndarray, bonus: list[float], **steps) -> reranking.Reranked:
    vectors = np.asarray(gallery, np.float32)
    cosine = QUERY @ vectors.T
    return rerank(FixedGallery(vectors), QUERY, cosine, np.array([bonus], np.float32), plain=cosine, **steps)


def test_class_bonus_then_exact_copies_first():
    # cosine to q = (1, 0):  0.6   0.8   0.0   0.8   1.0 (row 4 is q itself)
    # + bonus:               0.3   0     0.1   0     0
    # = scores:              0.9   0.8   0.1   0.8   1.0
    # order: the copy (cosine >= 0.999) first, then 0.9, the tie 0.8 / 0.8 in row order, then 0.1
    scores, order = run([[0.6, 0.8], [0.8, 0.6], [0.0, 1.0], [0.8, -0.6], [1.0, 0.0]], [0.3, 0.0, 0.1, 0.0, 0.0])
    assert order[0].tolist() == [4, 0, 1, 3, 2]
    assert np.allclose(scores[0], [0.9, 0.8, 0.1, 0.8, 1.0], atol=1e-6)  # scores keep no copy offset


def test_class_bonus_chooses_the_expansion_and_cosine_weighs_it():
    # Rows: g0 (0.6, 0.8), g1 (0.8, 0.6), g2 (0.8, -0.6), g3 (0, -1), g4 (0, 1); bonus 0.3 on g0.
    # First scores 0.9, 0.8, 0.8, 0, 0: the 2 best are g0 and g1 (the tie with g2 goes to the lower row).
    # +qe:2@1 weighs them by cosine^1 (0.6, 0.8), not by score: q + 0.6 g0 + 0.8 g1 = (2.0, 0.96),
    # |(2.0, 0.96)| = sqrt(4.9216) = 2.21847, so the expanded query is e = (0.90152, 0.43273).
    # Scores again, cosine to e + bonus:
    #   g0: 0.6 * 0.90152 + 0.8 * 0.43273 + 0.3 = 1.18710
    #   g1: 0.8 * 0.90152 + 0.6 * 0.43273       = 0.98086
    #   g2: 0.8 * 0.90152 - 0.6 * 0.43273       = 0.46158
    #   g3: -0.43273,  g4: 0.43273  (without QE g3 and g4 tie at 0 and g3 comes first; with it g4 does)
    gallery = [[0.6, 0.8], [0.8, 0.6], [0.8, -0.6], [0.0, -1.0], [0.0, 1.0]]
    bonus = [0.3, 0.0, 0.0, 0.0, 0.0]
    assert run(gallery, bonus).order[0].tolist() == [0, 1, 2, 3, 4]
    scores, order = run(gallery, bonus, qe=(2, 1.0))
    assert np.allclose(scores[0], [1.18710, 0.98086, 0.46158, -0.43273, 0.43273], atol=1e-5)
    assert order[0].tolist() == [0, 1, 2, 4, 3]


def test_k_reciprocal_reorders_the_pool_and_lifts_it_above_the_rest(monkeypatch):
    # Rows: a (0.8, 0.6) cosine 0.8, b (0.6, -0.8) cosine 0.6 + bonus 0.3 = 0.9, c (0, 1) 0, d (-1, 0) -1.
    # Without re-ranking b leads. With a pool of 2 ([b, a]) and +krecip:1/1 (lambda 0.3):
    # distances 2 - 2 cos: q-a 0.4, q-b 0.8, a-b 2.0. Each point's nearest other: q -> a, a -> q, b -> q,
    # so q and a are reciprocal neighbours and b is alone. Neighbour weights exp(-d), normalised, with e = exp(-0.4):
    # q: {q: 1, a: e} / (1 + e), a: {a: 1, q: e} / (1 + e), b: {b: 1}.
    # Shared weight q-a: 2e / (1 + e), Jaccard distance 1 - shared / (2 - shared) = 1 - e = 0.32968; q-b: 1.
    # Original distance over its pool maximum: a 0.4 / 0.8 = 0.5, b 0.8 / 0.8 = 1.
    # Score = POOL_OFFSET - (0.7 * Jaccard + 0.3 * original) + bonus:
    #   a: 10 - (0.7 * 0.32968 + 0.15) = 9.61922,   b: 10 - (0.7 + 0.3) + 0.3 = 9.3
    # Rows outside the pool keep cosine + bonus (0, -1), below the pool.
    monkeypatch.setattr(reranking, "POOL", 2)
    gallery = [[0.8, 0.6], [0.6, -0.8], [0.0, 1.0], [-1.0, 0.0]]
    bonus = [0.0, 0.3, 0.0, 0.0]
    assert run(gallery, bonus).order[0].tolist() == [1, 0, 2, 3]
    scores, order = run(gallery, bonus, krecip=(1, 1))
    assert np.allclose(scores[0], [9.61922, 9.3, 0.0, -1.0], atol=1e-5)
    assert order[0].tolist() == [0, 1, 2, 3]


def test_a_held_out_query_is_out_of_its_own_ranking():
    # Leave-one-out on rows (1, 0), (0.8, 0.6), (0, 1): query 0 is row 0 itself, so it ranks row 1 (0.8) then row 2.
    vectors = np.array([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0]], np.float32)
    gallery = HeldOutGallery(LeaveOneOutDBA(vectors, 1), np.array([0]))
    cosine = gallery.similarities(vectors[:1], np.array([0]))
    assert cosine[0].tolist() == [-np.inf, pytest.approx(0.8), 0.0]
    assert rerank(gallery, vectors[:1], cosine, 0.0, depth=2).order[0].tolist() == [1, 2]

"""Learned whitening (cache/whitening.py): where images of one label vary most along directions that do not tell
labels apart, the whitened space finds the right images; `auto` adopts it only where its validation wins, the build
stores it, and a query uses it; a cache without it, or with a damaged one, says so in one line."""
from __future__ import annotations

import json

import numpy as np
import pytest

from lookalike.cache.autopolicy import FLAT, choose_policy, rerank_scores
from lookalike.cache.manifest import CacheError
from lookalike.cache.policies import parse_policy
from lookalike.cache.search import Searcher
from lookalike.cache.store import CacheData, load_cache
from lookalike.cache.whitening import can_fit_whitening, fit_whitening, whiten
from lookalike.models.errors import UserError
from tests.test_fusion import gallery_columns

WHITE = parse_policy("flat+white")


def nuisance_columns(per_label: int = 30) -> dict[str, np.ndarray]:
    """gallery_columns' labels with embeddings whose label signal (4 dimensions) is small beside a large variation
    shared by every label (12 other dimensions): cosine is ruled by the variation, the whitened cosine by the label."""
    columns = gallery_columns(informative_classes=False, per_label=per_label)
    rng = np.random.default_rng(1)
    codes = np.unique(columns["labels"], return_inverse=True)[1]
    signal = np.eye(4)[codes % 4] + 0.5 * np.eye(4)[codes // 4] + 0.15 * rng.normal(size=(len(codes), 4))
    embeddings = np.hstack([signal, 0.7 * rng.normal(size=(len(codes), 12))])
    columns["embeddings"] = (embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)).astype(np.float32)
    return columns


def test_whitening_finds_the_label_where_a_shared_variation_hides_it():
    columns = nuisance_columns()
    vectors, labels = columns["embeddings"], columns["labels"]
    held_out = np.arange(0, len(labels), 5)  # fitted on the other images only
    whitening = fit_whitening(np.delete(vectors, held_out, axis=0), np.delete(labels, held_out))
    assert whitening.shape == (17, 16) and whitening.dtype == np.float32

    def p_at_1(space: np.ndarray) -> float:
        scores = space[held_out] @ space.T
        scores[np.arange(len(held_out)), held_out] = -np.inf
        return float(np.mean(labels[scores.argmax(axis=1)] == labels[held_out]))

    assert p_at_1(vectors) + 0.15 < p_at_1(whiten(vectors, whitening))  # 0.61 -> 0.81 (36 held-out queries)
    assert np.allclose(np.linalg.norm(whiten(vectors, whitening), axis=1), 1.0, atol=1e-5)


@pytest.mark.parametrize("rows, dim", [(3, 8), (50, 128), (800, 1280), (5_000, 64)])
def test_the_shrunk_covariance_is_scikit_learns_ledoit_wolf(rows, dim):
    """ledoit_wolf (numpy: one product and the rows' norms) gives scikit-learn's shrunk covariance, with fewer rows
    than dimensions too."""
    from lookalike.cache.whitening import ledoit_wolf

    sklearn_covariance = pytest.importorskip("sklearn.covariance")
    rng = np.random.default_rng(rows)
    centred = (rng.standard_normal((rows, dim)) * rng.uniform(0.1, 2.0, dim)).astype(np.float32)
    centred -= centred.mean(axis=0)
    expected, _ = sklearn_covariance.ledoit_wolf(centred, assume_centered=True)
    assert np.allclose(ledoit_wolf(centred), expected, rtol=1e-5, atol=1e-6)


def test_no_label_with_two_images_fits_no_whitening():
    assert not can_fit_whitening(np.array(["a", "b", "", ""])) and can_fit_whitening(np.array(["a", "a", "b"]))
    assert fit_whitening(np.eye(4, dtype=np.float32), np.array(["a", "b", "", ""])) is None


def test_a_large_gallery_is_whitened_from_a_sample_that_fits_the_same_space(monkeypatch):
    """Above FIT_ROWS images the whitening is fitted on a seeded sample: it ranks as the whole gallery's does."""
    from lookalike.cache import whitening as module

    columns = nuisance_columns(per_label=100)
    vectors, labels = columns["embeddings"], columns["labels"]
    whole = whiten(vectors, fit_whitening(vectors, labels))
    monkeypatch.setattr(module, "FIT_ROWS", 300)  # of 600
    sampled = whiten(vectors, fit_whitening(vectors, labels))
    top = lambda space: np.argsort(-(space[:50] @ space.T), axis=1)[:, 1:6]
    assert np.mean([len(np.intersect1d(a, b)) / 5 for a, b in zip(top(whole), top(sampled))]) > 0.8


def test_auto_adopts_whitening_where_its_validation_wins_and_not_where_it_cannot():
    columns = nuisance_columns()
    chosen = choose_policy(columns)
    assert chosen.white, chosen
    scores = rerank_scores(columns, [FLAT, WHITE])
    assert scores[WHITE].map_at_r > scores[FLAT].map_at_r + 0.1
    perfect = gallery_columns(informative_classes=True, per_label=30)
    perfect["embeddings"] = np.eye(16, dtype=np.float32)[np.unique(perfect["labels"], return_inverse=True)[1]]
    assert not choose_policy(perfect).white  # MAP@R 1 already: nothing to gain


def test_the_whitening_is_validated_without_the_queries_it_scores(monkeypatch):
    """Cross-fitted: every whitening fitted during validation leaves out the queries it then ranks."""
    from lookalike.cache import autopolicy

    columns = nuisance_columns()
    fitted_on = []
    real_fit = autopolicy.fit_whitening

    def recording_fit(vectors, labels, rows):
        fitted_on.append({tuple(np.round(row, 6)) for row in np.asarray(vectors)[rows]})
        return real_fit(vectors, labels, rows)

    monkeypatch.setattr(autopolicy, "fit_whitening", recording_fit)
    sample = autopolicy.validation_set(columns, 0, autopolicy.RERANK_QUERY_LIMIT)
    rerank_scores(columns, [FLAT, WHITE])
    folds = autopolicy.whitening_folds(sample.queries, len(sample.gallery))
    assert len(folds) == autopolicy.WHITENING_FOLDS  # 180 images, all of them queries: cross-fitted
    assert len(fitted_on) == len(folds)
    for rows, fold in zip(fitted_on, folds):
        assert not rows & {tuple(np.round(row, 6)) for row in sample.vectors[fold]}
    fitted_on.clear()  # 15 queries of 180 images: one whitening fitted without all of them
    monkeypatch.setattr(autopolicy, "RERANK_QUERY_LIMIT", 15)
    sample = autopolicy.validation_set(columns, 0, autopolicy.RERANK_QUERY_LIMIT)
    rerank_scores(columns, [FLAT, WHITE])
    assert len(fitted_on) == 1 and len(fitted_on[0]) == 180 - 15
    assert not fitted_on[0] & {tuple(np.round(row, 6)) for row in sample.vectors[sample.queries]}


def test_the_build_stores_the_whitening_and_a_query_ranks_in_it(gallery, tiny_config, tmp_path, monkeypatch):
    from lookalike.pipeline import build
    from lookalike.pipeline.build import build_cache

    monkeypatch.setattr(build, "choose_policy", lambda columns, **_: parse_policy("flat+white+qe:2"))
    build_cache(gallery, tmp_path / "cache", tiny_config)
    data = load_cache(tmp_path / "cache")
    assert data.manifest.whitening and data.manifest.default_policy == "flat+white+qe:2"
    embeddings, labels = np.asarray(data.columns["embeddings"]), data.columns["labels"]
    whitened = whiten(embeddings, fit_whitening(embeddings, labels))  # its axes' signs may differ: compare cosines
    assert np.allclose(data.columns["white"] @ data.columns["white"].T, whitened @ whitened.T, atol=1e-4)
    assert np.allclose(whiten(embeddings, data.whitening), data.columns["white"], atol=1e-5)
    hits = Searcher(data).search(embeddings[3], WHITE, 4)
    expected = whitened @ whitened[3]
    assert hits.rows.tolist() == np.argsort(-expected, kind="stable")[:4].tolist()
    assert np.allclose(hits.scores, embeddings[hits.rows] @ embeddings[3], atol=1e-5)  # reported: the cosine

    (data.generation / "whitening.npy").write_bytes(b"damaged")
    with pytest.raises(CacheError, match="whitening.npy is unreadable"):
        load_cache(tmp_path / "cache")
    manifest = json.loads((data.generation / "manifest.json").read_text())
    np.save(data.generation / "whitening.npy", np.full((3, 3), np.nan, np.float32))
    with pytest.raises(CacheError, match=r"whitening.npy is not a finite \[\d+, \d+\] matrix"):
        load_cache(tmp_path / "cache")
    manifest["whitening"] = "yes"
    (data.generation / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match="whitening is not true or false"):
        load_cache(tmp_path / "cache")


def test_a_cache_without_a_whitening_refuses_white_in_one_line():
    searcher = Searcher(CacheData.in_memory(gallery_columns(informative_classes=False, per_label=5)))
    with pytest.raises(UserError, match=r"\+white: this cache stores no learned whitening"):
        searcher.search(np.eye(16, dtype=np.float32)[0], WHITE, 3)


def test_above_exact_max_rows_a_whitened_policy_takes_its_candidates_in_the_whitened_space():
    """Through an index, a +white search's pool comes from an index of the whitened rows: the rows it ranks high lie
    far from the query in the stored space (a pool of the stored space's 256 nearest lost them)."""
    from lookalike.cache.autopolicy import pooled_scores

    columns = nuisance_columns(per_label=129)  # 774 images: a pool of 256 is not all of them; R 128, the pooled depth
    exact = rerank_scores(columns, [FLAT, WHITE])
    through_index = pooled_scores(columns, [FLAT, WHITE], 0, 100)
    assert through_index[WHITE].map_at_r == pytest.approx(exact[WHITE].map_at_r, abs=0.01)
    assert through_index[WHITE].map_at_r > through_index[FLAT].map_at_r + 0.1

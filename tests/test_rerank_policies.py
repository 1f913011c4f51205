"""Re-ranking as bucket-policy parts (+dba, +qe, +krecip, flat@W): searched as written, validated without leaks,
adopted by `auto` only where it gains, stored by the build."""
from __future__ import annotations

import numpy as np
import pytest

from lookalike.cache.autopolicy import FLAT, choose_policy, rerank_scores
from lookalike.cache.metrics import map_at_r, precision_at_k
from lookalike.cache.policies import parse_policy
from lookalike.cache.rerank import alpha_qe, dba
from lookalike.cache.search import Searcher
from lookalike.cache.store import CacheData, empty_columns, load_cache
from lookalike.pipeline.build import build_cache
from tests.test_fusion import gallery_columns


@pytest.mark.parametrize("text", ["flat@0.25+dba:20@3+qe:10", "flat+krecip:5/2", "top1+qe:2", "fused:10~0.8@0+soft:3+dba:5",
                                  "topk:3+dba:2@0.5+qe:3@2+krecip:20/6"])
def test_rerank_parts_round_trip(text):
    assert str(parse_policy(text)) == text and parse_policy(text).reranks


@pytest.mark.parametrize("text, message", [("flat+qe:0", "from 1 to 100"), ("flat:3", "flat takes only"),
                                           ("topk:3@1", "only fused and flat take a weight"),
                                           ("flat+qe:2+dba:5", "unknown bucket policy")])
def test_bad_rerank_parts_are_refused(text, message):
    with pytest.raises(ValueError, match=message):
        parse_policy(text)


def test_search_ranks_as_written_and_reports_the_cosine(tmp_path):
    """flat+dba:3+qe:2: DBA gallery vectors, the query expanded by its 2 best, ranked again; `scores` is the
    cosine to the stored embedding, `rank_scores` what the rows were ranked by."""
    columns = gallery_columns(informative_classes=True, per_label=10)
    searcher = Searcher(CacheData.in_memory(columns, tmp_path))
    query = columns["embeddings"][7]
    hits = searcher.search(query, parse_policy("flat+dba:3+qe:2"), 5, columns["classes"][7], columns["probs"][7])
    augmented = dba(columns["embeddings"], 3)
    first = augmented @ query
    best = np.argsort(-first, kind="stable")[:2]
    expanded = alpha_qe(query, augmented[best], first[best], 1.0, 2)
    expected = np.argsort(-(augmented @ expanded), kind="stable")[:5]
    assert hits.rows.tolist() == expected.tolist()
    assert np.allclose(hits.scores, columns["embeddings"][hits.rows] @ query, atol=1e-6)
    assert np.allclose(hits.rank_scores, (augmented @ expanded)[hits.rows], atol=1e-6)


@pytest.mark.parametrize("text", ["flat+dba:3+qe:2", "flat@0.5+dba:2@3", "flat+krecip:5/2"])
def test_leave_one_out_is_searching_a_gallery_without_the_query(tmp_path, text):
    """The vectorised evaluator equals, query by query, a real search of the gallery with that image deleted
    (its DBA recomputed without it): the held-out image shapes nothing it is scored against."""
    columns = gallery_columns(informative_classes=True, per_label=8)
    policy = parse_policy(text)
    score = rerank_scores(columns, [policy])[policy]
    labels, count = columns["labels"], len(columns["labels"])
    relevance = np.zeros((count, count - 1), bool)
    for row in range(count):
        rest = np.delete(np.arange(count), row)
        kept = {name: columns[name][rest] for name in ("paths", "labels", "label_classes", "classes", "probs",
                                                      "embeddings")}
        searcher = Searcher(CacheData.in_memory(kept, tmp_path))
        hits = searcher.search(columns["embeddings"][row], policy, count - 1, columns["classes"][row],
                               columns["probs"][row])
        relevance[row, :len(hits.rows)] = labels[rest][hits.rows] == labels[row]
    n_relevant = np.full(count, 7)
    assert score.map_at_r == pytest.approx(map_at_r(relevance, n_relevant), abs=1e-9)
    assert score.p_at_1 == pytest.approx(precision_at_k(relevance, n_relevant, 1))


def test_auto_adopts_reranking_where_it_gains_and_not_where_nothing_can():
    noisy = gallery_columns(informative_classes=False, per_label=30)
    chosen = choose_policy(noisy)
    assert chosen.kind == "flat" and (chosen.dba or chosen.qe or chosen.krecip)
    scores = rerank_scores(noisy, [FLAT, chosen])
    assert scores[chosen].map_at_r > scores[FLAT].map_at_r
    perfect = gallery_columns(informative_classes=True, per_label=30)
    perfect["embeddings"] = np.eye(16, dtype=np.float32)[np.unique(perfect["labels"], return_inverse=True)[1]]
    assert choose_policy(perfect) == choose_policy(perfect, rerank=False)  # MAP@R 1 already: nothing to gain


def test_the_build_stores_the_chosen_dba_and_queries_use_it(gallery, tiny_config, tmp_path, monkeypatch):
    from lookalike.pipeline import build
    monkeypatch.setattr(build, "choose_policy", lambda columns: parse_policy("flat+dba:3+qe:2"))
    build_cache(gallery, tmp_path / "cache", tiny_config)
    data = load_cache(tmp_path / "cache")
    assert data.manifest.default_policy == "flat+dba:3+qe:2" and data.manifest.dba == [3, 0.0]
    embeddings = np.asarray(data.columns["embeddings"])
    assert np.allclose(data.columns["dba"], dba(embeddings, 3), atol=1e-6)
    hits = Searcher(data).search(embeddings[4], parse_policy(data.manifest.default_policy), 3)
    # Ranked as the stored DBA vectors rank the expanded query (mutual neighbours share one DBA vector and tie).
    augmented = dba(embeddings, 3)
    first = augmented @ embeddings[4]
    best = np.argsort(-first, kind="stable")[:2]
    expected = augmented @ alpha_qe(embeddings[4], augmented[best], first[best], 1.0, 2)
    assert np.allclose(hits.rank_scores, np.sort(expected)[::-1][:3], atol=1e-5)
    assert np.allclose(hits.rank_scores, expected[hits.rows], atol=1e-5) and 4 in hits.rows


def test_empty_columns_have_no_dba():
    assert "dba" not in empty_columns(4, 3)


def test_auto_compares_the_rerank_gain_on_one_sample_of_queries(monkeypatch):
    """Step 2 keeps a re-ranked policy when it beats step 1's choice on step 2's own queries: two MAP@Rs measured on
    different queries are never compared (step 1's choice scores 0.9 on its 2,000 queries, 0.5 on step 2's 500)."""
    from lookalike.cache import autopolicy

    columns = gallery_columns(informative_classes=False, per_label=30)
    hits = np.ones(40, bool)

    def score(value: float):
        return autopolicy.Score(map_at_r=value, p_at_1=1.0, hits=hits, candidates=0.5)

    def loo_scores(columns, policies, seed=0, query_limit=autopolicy.QUERY_LIMIT):
        full = query_limit == autopolicy.QUERY_LIMIT
        return {p: score(0.6 if p == FLAT else 0.9 if full else 0.5) for p in policies}

    def rerank_scores(columns, policies, seed=0):
        return {p: score(0.5 if p == FLAT else 0.6) for p in policies}

    monkeypatch.setattr(autopolicy, "loo_scores", loo_scores)
    monkeypatch.setattr(autopolicy, "rerank_scores", rerank_scores)
    chosen = choose_policy(columns)
    assert chosen.dba or chosen.qe or chosen.krecip, chosen


def test_dba_matrices_of_many_distinct_policies_stay_within_their_budget(monkeypatch):
    """A client sending ever new +dba:K@a keeps at most DBA_CACHE_BYTES of DBA matrices (least recently used go)."""
    from lookalike.cache import search

    columns = gallery_columns(informative_classes=False, per_label=30)
    searcher = Searcher(CacheData.in_memory(columns))
    one = columns["embeddings"].astype(np.float32).nbytes
    monkeypatch.setattr(search, "DBA_CACHE_BYTES", 3 * one)
    query = columns["embeddings"][0]
    for k in range(2, 40):
        searcher.search(query, parse_policy(f"flat+dba:{k}@0.5"), 5)
    assert sum(matrix.nbytes for matrix in searcher._dba.values()) <= 3 * one
    assert list(searcher._dba)[-1] == (39, 0.5)

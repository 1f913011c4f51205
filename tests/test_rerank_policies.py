"""Re-ranking as bucket-policy parts (+dba, +qe, +krecip, flat@W): searched as written, validated without leaks,
adopted by `auto` only where it gains, stored by the build."""
from __future__ import annotations

import numpy as np
import pytest

from lookalike.cache.autopolicy import FLAT, PooledSearch, choose_policy, pooled_scores, rerank_family, rerank_scores
from lookalike.cache.indexes import CompressedSearch, make_gallery_index, parse_memory
from lookalike.cache.metrics import map_at_r, precision_at_k
from lookalike.cache.policies import parse_policy
from lookalike.cache.search import WHOLE_GALLERY, Searcher
from lookalike.cache.columns import COLUMNS, empty_columns
from lookalike.cache.store import CacheData, load_cache
from lookalike.models.errors import UserError
from lookalike.pipeline.build import build_cache
from tests.test_fusion import gallery_columns


def reference_dba(vectors: np.ndarray, k: int, alpha: float = 0.0) -> np.ndarray:
    """DBA written out plainly, in float64: each row plus its k-1 most similar other rows (ties: the lower row),
    each weighted by max(cosine, 0)^alpha (alpha 0: 1), scaled to unit length."""
    out = []
    for i, row in enumerate(vectors.astype(np.float64)):
        cosines = {j: float(row @ other) for j, other in enumerate(vectors.astype(np.float64)) if j != i}
        nearest = sorted(cosines, key=lambda j: (-cosines[j], j))[:k - 1]
        total = row.copy()
        for j in nearest:
            total += (max(cosines[j], 0.0) ** alpha if alpha else 1.0) * vectors[j]
        out.append(total / np.linalg.norm(total))
    return np.array(out)


def reference_expanded(query: np.ndarray, gallery: np.ndarray, count: int, alpha: float) -> np.ndarray:
    """alpha-QE written out plainly: the query plus its `count` most similar gallery rows (ties: the lower row),
    each weighted by max(cosine, 0)^alpha, scaled to unit length."""
    cosines = gallery.astype(np.float64) @ query
    total = query.astype(np.float64).copy()
    for j in sorted(range(len(gallery)), key=lambda j: (-cosines[j], j))[:count]:
        total += max(cosines[j], 0.0) ** alpha * gallery[j]
    return total / np.linalg.norm(total)


def test_reference_dba_and_expansion_by_hand():
    """The references themselves, on three 2-D unit vectors: a (1, 0), b (0.6, 0.8), c (0, 1)."""
    vectors = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    # k=2: a + b = (1.6, 0.8) / 1.78885; b's nearest other is c (0.8 > 0.6): (0.6, 1.8) / 1.89737; c + b likewise.
    assert np.allclose(reference_dba(vectors, 2), [[0.89443, 0.44721], [0.31623, 0.94868], [0.31623, 0.94868]],
                       atol=1e-5)
    # q = a, 1 neighbour with alpha 2: a + 0.6^2 * b = (1.216, 0.288) / 1.24964
    assert np.allclose(reference_expanded(vectors[0], vectors[1:], 1, 2.0), [0.97308, 0.23047], atol=1e-5)


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


def exact_passes(monkeypatch) -> list:
    """The matrices cache.indexes.exact_top passes over from now on, one entry per pass."""
    from lookalike.cache import indexes

    passes, real = [], indexes.exact_top
    monkeypatch.setattr(indexes, "exact_top", lambda vectors, queries, k: passes.append(len(vectors)) or real(
        vectors, queries, k))
    return passes


def test_search_ranks_as_written_and_reports_the_cosine(tmp_path):
    """flat+dba:3+qe:2: DBA gallery vectors, the query expanded by its 2 best, ranked again; `scores` is the
    cosine to the stored embedding, `rank_scores` what the rows were ranked by."""
    columns = gallery_columns(informative_classes=True, per_label=10)
    searcher = Searcher(CacheData.in_memory(columns, tmp_path))
    query = columns["embeddings"][7]
    hits = searcher.search(query, parse_policy("flat+dba:3+qe:2"), 5, columns["classes"][7], columns["probs"][7])
    augmented = reference_dba(columns["embeddings"], 3)
    expected = augmented @ reference_expanded(query, augmented, 2, 1.0)
    assert np.allclose(hits.rank_scores, np.sort(expected)[::-1][:5], atol=1e-5)  # the 5 best, best first
    assert np.allclose(hits.rank_scores, expected[hits.rows], atol=1e-5)
    assert np.allclose(hits.scores, columns["embeddings"][hits.rows] @ query, atol=1e-6)


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


def test_validation_through_the_search_path_agrees_with_the_score_matrices():
    """pooled_scores (galleries above exact_max_rows) searches each held-out query through the search path. Over
    every row with exact neighbours it is the score matrices' leave-one-out (equal scores may round apart); through
    an IVF index's candidates and an approximate k-NN graph (exact_max_rows forced low) it stays within 0.01."""
    columns = gallery_columns(informative_classes=False, per_label=30)
    policies = [FLAT, *rerank_family(None), *rerank_family(0.5)]
    exact = rerank_scores(columns, policies)
    every_row = pooled_scores(columns, policies, 0, len(columns["labels"]))
    approximate = pooled_scores(columns, policies, 0, 60)
    for policy in policies:
        assert every_row[policy].map_at_r == pytest.approx(exact[policy].map_at_r, abs=1e-3), policy
        assert np.sum(every_row[policy].hits != exact[policy].hits) <= 2, policy  # of 180
        assert approximate[policy].map_at_r == pytest.approx(exact[policy].map_at_r, abs=0.01), policy
    assert choose_policy(columns, exact_max_rows=60).reranks


@pytest.mark.parametrize("index", ["auto", "ivf"])
def test_a_build_above_exact_max_rows_validates_through_the_search_path_and_stores_its_dba(gallery, tiny_config,
                                                                                           tmp_path, monkeypatch,
                                                                                           index):
    """With a gallery index (ivf) the validation is given it (it searches as queries will), the DBA graph reads it
    and is tuned on the exact neighbours the index was tuned on (one exact pass over the rows, not two), and it is
    published with the rows."""
    from lookalike.pipeline import build

    passes = exact_passes(monkeypatch)
    given = []
    monkeypatch.setattr(build, "choose_policy",
                        lambda columns, **options: given.append(options) or parse_policy("flat+dba:3+qe:2"))
    report = build_cache(gallery, tmp_path / "cache", tiny_config, exact_max_rows=8, index=index)
    data = load_cache(tmp_path / "cache")
    assert report.auto_path.startswith("search path") and data.manifest.exact_max_rows == 8
    assert (given[0]["gallery_index"] is not None) == (index == "ivf") == (report.index is not None)
    assert len(passes) == 1
    embeddings = np.asarray(data.columns["embeddings"])
    assert np.allclose(data.columns["dba"], reference_dba(embeddings, 3), atol=1e-5)  # an IVF probed to recall 0.95
    searcher = Searcher(data)
    assert searcher.exact_max_rows == 8
    with pytest.raises(UserError, match=r"\+dba:5: this cache stores DBA \[3, 0.0\]; above 8 images"):
        searcher.search(embeddings[0], parse_policy("flat+dba:5"), 3)


def test_the_build_stores_the_chosen_dba_and_queries_use_it(gallery, tiny_config, tmp_path, monkeypatch):
    from lookalike.pipeline import build
    monkeypatch.setattr(build, "choose_policy", lambda columns, **_: parse_policy("flat+dba:3+qe:2"))
    build_cache(gallery, tmp_path / "cache", tiny_config)
    data = load_cache(tmp_path / "cache")
    assert data.manifest.default_policy == "flat+dba:3+qe:2" and data.manifest.dba == [3, 0.0]
    embeddings = np.asarray(data.columns["embeddings"])
    augmented = reference_dba(embeddings, 3)
    assert np.allclose(data.columns["dba"], augmented, atol=1e-5)
    hits = Searcher(data).search(embeddings[4], parse_policy(data.manifest.default_policy), 3)
    # Ranked as the stored DBA vectors rank the expanded query (mutual neighbours share one DBA vector and tie).
    expected = augmented @ reference_expanded(embeddings[4], augmented, 2, 1.0)
    assert np.allclose(hits.rank_scores, np.sort(expected)[::-1][:3], atol=1e-5)
    assert np.allclose(hits.rank_scores, expected[hits.rows], atol=1e-5) and 4 in hits.rows


def test_empty_columns_are_every_stored_column_with_no_rows_and_search_as_an_empty_gallery(tmp_path):
    """An empty gallery has the stored columns at their widths and no DBA column: a re-ranked policy finds nothing."""
    columns = empty_columns(4, 3)
    assert sorted(columns) == sorted(COLUMNS)
    assert {name: column.shape for name, column in columns.items() if column.ndim == 2} == {
        "classes": (0, 3), "probs": (0, 3), "boxes": (0, 4), "embeddings": (0, 4)}
    hits = Searcher(CacheData.in_memory(columns, tmp_path)).search(np.ones(4, np.float32) / 2,
                                                                   parse_policy("flat+dba:3+qe:2"), 5)
    assert hits.rows.tolist() == [] and hits.candidates == 0


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
    assert list(searcher._dba)[-1] == ((39, 0.5), False)  # (DBA, in the whitened space)




@pytest.mark.parametrize("kind", ["ivf", "ivfpq"])
def test_validation_through_a_gallery_index_searches_as_queries_will(kind, monkeypatch):
    """A build's gallery index (over INDEXED_MIN_ROWS rows, here lowered: searches go through it) is given to the
    validation, which searches through it as the cache's queries will, and stays within 0.01 of the score matrices'
    leave-one-out. Its k-NN graph searches IVF,Flat lists: the gallery index's own, or (IVF-PQ holds codes, not the
    vectors) an index of its own, as the build's DBA graph does: the DBA weights are true cosines. The graph is tuned
    on the exact neighbours the gallery index was tuned on: no second exact pass over the rows."""
    from lookalike.cache import search as search_module

    monkeypatch.setattr(search_module, "INDEXED_MIN_ROWS", 100)
    columns = gallery_columns(informative_classes=False, per_label=50)  # 300 rows
    policies = [FLAT, parse_policy("flat+dba:5"), parse_policy("flat+dba:20@3+qe:2"), parse_policy("flat+white+dba:5")]
    exact = rerank_scores(columns, policies)
    passes = exact_passes(monkeypatch)
    gallery_index = make_gallery_index(columns["embeddings"], kind, parse_memory("1GB"))
    search = PooledSearch(columns, policies, 60, 10, gallery_index)
    assert len(passes) == 1
    assert isinstance(search.searcher.index(WHOLE_GALLERY, 1), CompressedSearch)
    graph = search.galleries[(20, 3.0), False]._neighbours
    assert (graph.index is gallery_index.index) == (kind == "ivf")
    rows = np.arange(0, len(columns["labels"]), 7)
    sims, ids = graph(rows)
    vectors = columns["embeddings"]
    assert np.allclose(sims, np.einsum("id,ikd->ik", vectors[rows], vectors[ids]), atol=1e-5)
    through_index = pooled_scores(columns, policies, 0, 60, gallery_index)
    for policy in policies:
        assert through_index[policy].map_at_r == pytest.approx(exact[policy].map_at_r, abs=0.01), policy


@pytest.mark.parametrize("index", ["auto", "ivf"])
def test_a_large_build_that_adopts_whitening_publishes_the_index_of_the_whitened_rows(gallery, tiny_config, tmp_path,
                                                                                     monkeypatch, index):
    """Above exact_max_rows a +white choice searches an IVF index of the whitened rows: the build makes it (its DBA
    graph reads it) and publishes it with them, so no query process makes one (10 s at 10^6 rows, at every query
    of a read-only cache)."""
    from lookalike.cache import search as search_module
    from lookalike.cache.indexes import ivf_file
    from lookalike.pipeline import build

    monkeypatch.setattr(build, "choose_policy", lambda columns, **_: parse_policy("flat+white+dba:3+qe:2"))
    build_cache(gallery, tmp_path / "cache", tiny_config, exact_max_rows=8, index=index)
    data = load_cache(tmp_path / "cache")
    assert data.manifest.whitening and (data.generation / ivf_file("flat", white=True)).is_file()
    monkeypatch.setattr(search_module, "make_index", lambda *args, **kwargs: pytest.fail("a query made an index"))
    embeddings = np.asarray(data.columns["embeddings"])
    for row in (0, 7, len(embeddings) - 1):
        assert Searcher(data).search(embeddings[row], parse_policy("flat+white+dba:3+qe:2"), 3).rows[0] == row


@pytest.mark.parametrize("damage", ["cut short", "another cache's"])
def test_a_damaged_or_planted_index_of_the_whitened_rows_is_made_again(gallery, tiny_config, tmp_path, monkeypatch,
                                                                      damage):
    """The build's ivf-flat-white.faiss cut short, or replaced by an index of other rows and dimensions: a +white
    search makes the index again from the whitened rows and answers as the published one did."""
    import faiss

    from lookalike.cache.indexes import ivf_file
    from lookalike.pipeline import build

    monkeypatch.setattr(build, "choose_policy", lambda columns, **_: parse_policy("flat+white+dba:3+qe:2"))
    build_cache(gallery, tmp_path / "cache", tiny_config, exact_max_rows=8)
    data = load_cache(tmp_path / "cache")
    policy, embeddings = parse_policy("flat+white+dba:3+qe:2"), np.asarray(data.columns["embeddings"])
    before = [Searcher(data).search(embeddings[row], policy, 3).rows for row in (0, 7)]
    path = data.generation / ivf_file("flat", white=True)
    if damage == "cut short":
        path.write_bytes(path.read_bytes()[:500])
    else:
        other = faiss.index_factory(8, "IVF1,Flat", faiss.METRIC_INNER_PRODUCT)
        other.train(np.eye(8, dtype=np.float32))
        other.add(np.eye(8, dtype=np.float32)[np.arange(len(embeddings)) % 8])
        faiss.write_index(other, str(path))
    after = [Searcher(load_cache(tmp_path / "cache")).search(embeddings[row], policy, 3).rows for row in (0, 7)]
    assert all(np.array_equal(b, a) for b, a in zip(before, after))

"""Bucket policies on a hand-made cache whose answers are known."""
from __future__ import annotations

import numpy as np
import pytest

from lookalike.cache.buckets import class_agreement
from lookalike.cache.policies import BucketPolicy, parse_policy
from lookalike.cache.search import Searcher
from lookalike.cache.columns import empty_columns
from lookalike.cache.store import CacheData


def unit(*values):
    vector = np.array(values, np.float32)
    return vector / np.linalg.norm(vector)


@pytest.fixture
def searcher(tmp_path) -> Searcher:
    """Five images; classes 1 and 2 (top-2 each). Row 4 looks most like the query but sits in class 2."""
    columns = empty_columns(dim=2, topk=2)
    columns.update(
        paths=np.array([f"{i}.jpg" for i in range(5)]), labels=np.array(["a", "a", "b", "b", "a"]),
        label_classes=np.full(5, -1, np.int32),
        classes=np.array([[1, 2], [1, 2], [2, 1], [2, 1], [2, 1]], np.int32),
        probs=np.array([[0.9, 0.1], [0.8, 0.2], [0.9, 0.1], [0.7, 0.3], [0.55, 0.45]], np.float32),
        embeddings=np.stack([unit(1, 0.2), unit(1, 0.4), unit(0, 1), unit(0.2, 1), unit(1, 0.1)]),
    )
    return Searcher(CacheData.in_memory(columns, tmp_path, fused_weight=0.5))


QUERY = unit(1, 0.05)
CLASSES, PROBS = np.array([1, 2]), np.array([0.6, 0.4], np.float32)


def test_flat_searches_everything(searcher):
    hits = searcher.search(QUERY, parse_policy("flat"), k=3)
    assert hits.rows.tolist() == [4, 0, 1] and hits.candidates == 5


def test_top1_searches_only_the_predicted_bucket(searcher):
    hits = searcher.search(QUERY, parse_policy("top1"), 5, CLASSES, PROBS)
    assert hits.rows.tolist() == [0, 1] and hits.candidates == 2


def test_topk_unions_buckets(searcher):
    hits = searcher.search(QUERY, parse_policy("topk:2"), 3, CLASSES, PROBS)
    assert hits.rows.tolist() == [4, 0, 1] and hits.candidates == 5


def test_soft_assignment_puts_images_in_their_top_m_buckets(searcher):
    hits = searcher.search(QUERY, parse_policy("top1+soft:2"), 5, CLASSES, PROBS)
    assert hits.rows.tolist() == [4, 0, 1, 3, 2]  # each found once although in two buckets


def test_fused_adds_class_agreement(searcher):
    plain = searcher.search(QUERY, parse_policy("topk:2"), 5, CLASSES, PROBS)
    fused = searcher.search(QUERY, parse_policy("fused:2@2"), 5, CLASSES, PROBS)
    assert plain.rows[0] == 4 and fused.rows[0] == 0  # row 0 agrees with the query's classes more
    expected = float(np.dot(QUERY, unit(1, 0.2)) + 2 * (0.6 * 0.9 + 0.4 * 0.1))
    assert fused.rank_scores[0] == pytest.approx(expected, rel=1e-5)
    assert fused.scores[0] == pytest.approx(float(np.dot(QUERY, unit(1, 0.2))), rel=1e-5)  # cosine stays cosine
    assert plain.rank_scores is None


@pytest.mark.parametrize("text, probs, buckets, rows", [
    ("topk:2~0.5", [0.6, 0.4], [1], [0, 1]),  # 0.6 reaches 0.5: the top class alone
    ("topk:2~0.9", [0.6, 0.4], [1, 2], [4, 0, 1, 3, 2]),  # 0.6 + 0.4 reaches 0.9: both classes
    ("topk:2~0.9", [0.5, 0.2], [1, 2], [4, 0, 1, 3, 2]),  # never reached: all N classes
    ("topk:1~0.9", [0.5, 0.2], [1], [0, 1]),  # at most N
    ("fused:2~0.5@2", [0.6, 0.4], [1], [0, 1]),
])
def test_nucleus_searches_the_shortest_prefix_reaching_t(searcher, text, probs, buckets, rows):
    hits = searcher.search(QUERY, parse_policy(text), 5, CLASSES, np.array(probs, np.float32))
    assert hits.buckets == buckets and hits.rows.tolist() == rows and hits.candidates == len(rows)


def test_nucleus_needs_probabilities(searcher):
    with pytest.raises(ValueError, match="probabilities"):
        searcher.search(QUERY, parse_policy("topk:2~0.5"), 5, CLASSES)


def test_empty_buckets_fall_back_to_flat_and_say_so(searcher):
    hits = searcher.search(QUERY, parse_policy("top1"), 2, np.array([7, 8]), PROBS)
    assert hits.rows.tolist() == [4, 0] and "whole gallery" in hits.note


def test_class_agreement_is_the_inner_product_of_sparse_probabilities():
    agreement = class_agreement(np.array([3, 5]), np.array([0.5, 0.5]), np.array([[5, 9], [1, 2]]),
                                np.array([[0.8, 0.2], [0.5, 0.5]]))
    assert agreement.tolist() == [pytest.approx([0.4, 0.0])]
    rng = np.random.default_rng(0)  # classes below, among and above the queries' own, several queries at once
    query_classes = np.array([rng.choice(np.arange(10, 20), 3, replace=False) for _ in range(4)])  # a top-3: distinct
    gallery_classes = np.array([rng.choice(30, 3, replace=False) for _ in range(50)])
    query_probs, gallery_probs = rng.random((4, 3)), rng.random((50, 3))
    expected = np.einsum("qi,gj,qigj->qg", query_probs, gallery_probs,
                         query_classes[:, :, None, None] == gallery_classes[None, None])
    assert np.allclose(class_agreement(query_classes, query_probs, gallery_classes, gallery_probs), expected)


@pytest.mark.parametrize("text, policy", [
    ("flat", BucketPolicy("flat")), ("top1", BucketPolicy("topk", 1)), ("topk:4", BucketPolicy("topk", 4)),
    ("fused", BucketPolicy("fused", 3)), ("fused:2@0.3+soft:2", BucketPolicy("fused", 2, 2, 0.3)),
    ("topk:3~0.8", BucketPolicy("topk", 3, nucleus=0.8)), ("topk:5~1+soft:2", BucketPolicy("topk", 5, 2, None, 1.0)),
    ("fused:10~0.9@0+soft:5", BucketPolicy("fused", 10, 5, 0.0, 0.9)),
    ("fused:4~0.75", BucketPolicy("fused", 4, 1, None, 0.75)), ("topk:1~0.9", BucketPolicy("topk", 1, nucleus=0.9)),
])
def test_policy_grammar(text, policy):
    assert parse_policy(text) == policy and parse_policy(str(policy)) == policy


@pytest.mark.parametrize("text", ["flat", "top1+soft:3", "topk:3~0.8", "fused:10~0.9@0+soft:5", "fused:3@0.25"])
def test_canonical_policies_print_as_written(text):
    assert str(parse_policy(text)) == text


@pytest.mark.parametrize("text", ["top2", "topk:0", "flat:3", "top1@0.5", "nearest", "top1~0.5", "fused~0.8",
                                  "topk:3~0", "topk:3~1.5", "topk:3~0.8@0.5", "fused:3~", "fused:3~1.2.3",
                                  "topk:3~0.8~0.9", "fused:3@0.5~0.8", "topk:0~0.5"])
def test_bad_policies_are_refused(text):
    with pytest.raises(ValueError, match="bucket policy"):
        parse_policy(text)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ties_at_the_cut_keep_the_lower_row_first(dtype):
    """One ranking everywhere (cache.metrics.rank_by_score): equal scores in gallery order, also where a top-k cut
    falls inside a run of equal scores."""
    from lookalike.cache.metrics import rank_by_score

    scores = np.full(1000, 0.5, dtype)
    scores[[7, 900]] = 0.9
    assert rank_by_score(scores, 5).tolist() == [7, 900, 0, 1, 2]
    assert rank_by_score(scores).tolist()[:4] == [7, 900, 0, 1]


def test_queries_from_many_threads_get_the_answers_they_get_one_at_a_time():
    """serve answers queries side by side: with a two-entry index cache (so indexes are evicted and made again
    while others search) and new DBA matrices made mid-run, every threaded answer equals the serial one."""
    from concurrent.futures import ThreadPoolExecutor

    from tests.test_fusion import gallery_columns

    columns = gallery_columns(informative_classes=True, per_label=40)
    policies = [parse_policy(p) for p in ("flat", "top1", "topk:3", "fused:3@1", "top1+soft:2", "flat+dba:5",
                                          "flat+dba:9@1+qe:3", "topk:2+krecip:8/3", "flat@0.5+qe:4")]
    jobs = [(row, policies[row % len(policies)]) for row in range(0, 240, 2)]

    def ask(searcher: Searcher, job) -> tuple[list[int], list[float]]:
        row, policy = job
        hits = searcher.search(columns["embeddings"][row], policy, 5, columns["classes"][row], columns["probs"][row])
        return hits.rows.tolist(), hits.scores.round(5).tolist()

    alone = Searcher(CacheData.in_memory(columns), index_cache_size=2)
    serial = [ask(alone, job) for job in jobs]
    shared = Searcher(CacheData.in_memory(columns), index_cache_size=2)
    with ThreadPoolExecutor(8) as pool:
        threaded = list(pool.map(lambda job: ask(shared, job), jobs))
    assert threaded == serial


def test_one_core_is_restored_when_the_last_of_overlapping_users_leaves():
    """Two queries whose one-core sections overlap (enter A, enter B, leave A, leave B) leave BLAS as it was."""
    from threadpoolctl import threadpool_info

    from lookalike.cache.reranking import OneCore

    def blas_threads() -> list[int]:
        return [pool["num_threads"] for pool in threadpool_info() if pool["user_api"] == "blas"]

    before = blas_threads()
    limit = OneCore()
    limit.__enter__()
    limit.__enter__()
    assert set(blas_threads()) == {1}
    limit.__exit__(None, None, None)
    assert set(blas_threads()) == {1}  # the other query is still inside
    limit.__exit__(None, None, None)
    assert blas_threads() == before


def test_a_new_dba_matrix_is_made_on_a_background_thread_that_yields_to_queries(monkeypatch):
    """A server's hostile policies take idle CPU only: the DBA of a policy other than the cache's own is made on the
    searcher's preparation thread, at nice 10."""
    import os
    import threading

    from lookalike.cache import rerank
    from tests.test_fusion import gallery_columns

    seen = {}
    make_dba = rerank.dba

    def recording(*args, **kwargs):
        seen["thread"] = threading.current_thread().name
        seen["nice"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        return make_dba(*args, **kwargs)

    monkeypatch.setattr(rerank, "dba", recording)
    columns = gallery_columns(informative_classes=False, per_label=10)
    hits = Searcher(CacheData.in_memory(columns)).search(columns["embeddings"][3], parse_policy("flat+dba:4"), 3)
    assert hits.rows[0] == 3
    assert seen["thread"].startswith("lookalike-prepare") and seen["nice"] >= 10

"""The gallery index (build-cache --index): the choice under a memory budget, and searches through a compressed index
that find what exact search finds, inside the buckets asked for, with exact scores."""
from __future__ import annotations

import json

import numpy as np
import pytest

from lookalike.cache.indexes import (
    RECORD_FILE,
    build_gallery_index,
    factory_key,
    parse_index,
    parse_memory,
)
from lookalike.cache.policies import parse_policy
from lookalike.cache.search import ExactIndex, Searcher
from lookalike.cache.store import load_cache
from lookalike.models.errors import UserError
from lookalike.pipeline.evaluation.speed.synthetic import make_synthetic_cache, synthetic

ROWS, DIM, BUCKETS = 6_000, 64, 4  # the speed figures' clustered generator: buckets of ~1,500 rows use the index
QUERIES = synthetic(0, dim=DIM, buckets=BUCKETS)[2]


def test_auto_keeps_exact_search_then_ivf_then_the_finest_pq_code_that_fits():
    assert factory_key("auto", 32_768, 512, parse_memory("4GB")) is None
    assert factory_key("auto", 10**6, 512, parse_memory("4GB")) == "IVF1000,Flat"  # 2.06 GB of vectors and ids
    assert factory_key("auto", 10**7, 512, parse_memory("4GB")) == "IVF3162,PQ128x4fs"  # 720 MB of codes and ids
    assert factory_key("auto", 10**7, 512, parse_memory("300MB")) == "IVF3162,PQ32x4fs"  # 240 MB
    assert factory_key("exact", 10**7, 512, 1) is None
    assert factory_key("ivfpq", 10**5, 1280, parse_memory("2GB")) == "IVF316,PQ128x4fs"


@pytest.mark.parametrize("text, message", [
    ("hnsw", "use auto, exact, ivf or ivfpq[:MEMORY]"),
    ("ivf:2GB", "use auto, exact, ivf or ivfpq[:MEMORY]"),
    ("ivfpq:lots", "give a size such as 4GB"),
])
def test_a_bad_index_choice_is_one_line(text, message):
    with pytest.raises(UserError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_index(text)


def test_a_budget_no_code_fits_is_refused_with_what_it_needs():
    with pytest.raises(UserError, match=r"the smallest IVF-PQ index of 10,000,000 rows needs 153 MiB"):
        factory_key("ivfpq", 10**7, 512, parse_memory("100MB"))
    with pytest.raises(UserError, match="too few to train"):
        factory_key("ivfpq", 100, 512, parse_memory("1GB"))


@pytest.fixture(scope="module")
def compressed(tmp_path_factory):
    """A synthetic cache with an IVF-PQ index made, tuned and saved as build-cache makes it."""
    folder = tmp_path_factory.mktemp("indexed") / "cache"
    make_synthetic_cache(folder, ROWS, DIM, BUCKETS)
    data = load_cache(folder)
    record = build_gallery_index(data.generation, data.columns["embeddings"], "ivfpq", parse_memory("1GB"))
    return folder, record


def test_the_index_is_recorded_beside_the_generation_with_its_tuning(compressed):
    folder, record = compressed
    generation = load_cache(folder).generation
    saved = json.loads((generation / RECORD_FILE).read_text())
    assert saved["key"] == "IVF77,PQ64x4fs" and saved == {**saved, "kind": "ivfpq", "nprobe": record.nprobe}
    assert record.recall_at_5 >= 0.95 and record.bytes_per_row < DIM * 4  # codes, ids and codebooks


@pytest.mark.parametrize("policy", ["flat", "top1", "topk:3", "top1+soft:2"])
def test_searches_through_the_index_find_what_exact_search_finds_inside_the_same_buckets(compressed, policy):
    folder, _ = compressed
    data = load_cache(folder)
    indexed = Searcher(data)
    exact = Searcher(data)
    exact.gallery_index = None  # the same cache searched exactly
    queries, classes = QUERIES(50)
    probs = np.tile(np.array([0.8, 0.15, 0.05], np.float32), (len(classes), 1))
    parsed = parse_policy(policy)
    overlap = []
    for query, query_classes, query_probs in zip(queries, classes, probs):
        found = indexed.search(query, parsed, 5, query_classes, query_probs)
        truth = exact.search(query, parsed, 5, query_classes, query_probs)
        stored = np.asarray(data.columns["embeddings"])[found.rows] @ query
        np.testing.assert_allclose(found.scores, stored, atol=1e-5)  # re-scored exactly from the stored rows
        assert set(found.buckets) == set(truth.buckets) and found.candidates == truth.candidates
        allowed = np.isin(found.rows, np.concatenate([exact.index(b, parsed.gallery_classes).rows
                                                      for b in truth.buckets]))
        assert allowed.all()  # the bucket restricts the index (an ID selector), never widened
        overlap.append(len(np.intersect1d(found.rows, truth.rows)) / len(truth.rows))  # small buckets hold < 5
    assert np.mean(overlap) >= 0.9
    assert not any(isinstance(indexed.index(b, parsed.gallery_classes), ExactIndex) for b in found.buckets
                   if len(indexed.index(b, parsed.gallery_classes).rows) > 1_024)


def test_a_reranked_search_takes_its_candidates_from_the_index(compressed):
    """+qe through the index: the pool of the query's nearest, joined by the expanded query's (a second search),
    finds what the same policy finds over every row."""
    folder, _ = compressed
    data = load_cache(folder)
    queries, _ = QUERIES(20)
    indexed, exact = Searcher(data), Searcher(data)
    exact.gallery_index = None
    overlap, searched = [], []
    for query in queries:
        found = indexed.search(query, parse_policy("flat+qe:3"), 5)
        truth = exact.search(query, parse_policy("flat+qe:3"), 5)
        assert found.candidates <= 512 < truth.candidates == ROWS
        overlap.append(len(np.intersect1d(found.rows, truth.rows)) / 5)
        searched.append(found.candidates)
    assert np.mean(overlap) >= 0.9
    assert max(searched) > 256  # the expanded query's search added rows to the first pool of 256


def test_build_cache_makes_the_index_asked_for_and_refuses_an_impossible_one_before_publishing(gallery, tmp_path):
    from click.testing import CliRunner

    from lookalike.cli import cli
    from tests.conftest import TINY_CLASSIFIER, TINY_EMBEDDER

    common = ["build-cache", "--gallery", str(gallery), "--classifier", TINY_CLASSIFIER, "--embedder", TINY_EMBEDDER,
              "--device", "cpu"]
    built = CliRunner().invoke(cli, [*common, "--out", str(tmp_path / "ivf"), "--index", "ivf"])
    assert built.exit_code == 0, built.output
    assert "index IVF1,Flat (nprobe" in built.stdout  # 18 rows: one list (40 training rows a list)
    record = json.loads((load_cache(tmp_path / "ivf").generation / RECORD_FILE).read_text())
    assert record["kind"] == "ivf" and record["recall_at_5"] == 1.0  # 18 rows: every list is probed in the end
    refused = CliRunner().invoke(cli, [*common, "--out", str(tmp_path / "pq"), "--index", "ivfpq:1GB"])
    assert refused.exit_code == 1 and "too few to train" in refused.stderr
    assert refused.stderr.strip().splitlines()[-1].startswith("error: --index ivfpq")  # one line, after the bar
    assert not (tmp_path / "pq" / "CURRENT").exists()  # nothing published; the embedded rows wait in pending/


def test_a_search_for_many_results_probes_enough_lists_to_return_the_exact_ranking(compressed):
    """Asking for 2,000 rows of 6,000 probes enough lists to find them: the same rows as exact search, in its order
    (every candidate re-scored exactly), as a benchmark ranking a whole gallery needs."""
    folder, _ = compressed
    data = load_cache(folder)
    indexed, exact = Searcher(data), Searcher(data)
    exact.gallery_index = None
    query = QUERIES(1)[0][0]
    found, truth = (s.search(query, parse_policy("flat"), 2_000) for s in (indexed, exact))
    assert len(found.rows) == 2_000
    assert np.mean(np.isin(found.rows, truth.rows)) > 0.99


@pytest.mark.parametrize("damage, message", [
    (lambda g: (g / RECORD_FILE).write_text("{not json"), "cannot be read"),
    (lambda g: (g / RECORD_FILE).write_text(json.dumps({**json.loads((g / RECORD_FILE).read_text()), "nprobe": -5})),
     "not one build-cache writes"),
    (lambda g: (g / RECORD_FILE).write_text(json.dumps({**json.loads((g / RECORD_FILE).read_text()),
                                                         "candidates": 10**12})), "not one build-cache writes"),
    (lambda g: (g / "index.faiss").write_bytes((g / "index.faiss").read_bytes()[:1000]), "cannot be read"),
    (lambda g: (g / "index-lists.npy").unlink(), "cannot be read"),
    (lambda g: np.save(g / "index-lists.npy", np.zeros(5, np.uint16)), r"index-lists.npy is uint16 \(5,\)"),
    (lambda g: np.save(g / "index-lists.npy", np.zeros(6_000, np.float32)), "not one list number per row"),
])
def test_a_damaged_or_planted_index_is_refused_in_one_line(compressed, tmp_path, damage, message):
    import shutil

    folder, _ = compressed
    copy = tmp_path / "cache"
    shutil.copytree(folder, copy)
    damage(load_cache(copy).generation)
    with pytest.raises(UserError, match=message) as refused:
        Searcher(load_cache(copy))
    assert "\n" not in str(refused.value) and "rebuild the cache" in str(refused.value)


def test_a_planted_list_number_is_refused_in_one_line_when_a_bucket_searches(compressed, tmp_path):
    """index-lists.npy naming a list the index does not have would index past its centroids."""
    import shutil

    folder, _ = compressed
    copy = tmp_path / "cache"
    shutil.copytree(folder, copy)
    generation = load_cache(copy).generation
    lists = np.load(generation / "index-lists.npy")
    np.save(generation / "index-lists.npy", np.full_like(lists, 60_000))
    queries, classes = QUERIES(1)
    with pytest.raises(UserError, match="index-lists.npy names list 60000 of 77"):
        Searcher(load_cache(copy)).search(queries[0], parse_policy("top1"), 5, classes[0],
                                          np.array([0.8, 0.15, 0.05], np.float32))


def test_an_index_of_other_rows_is_refused(compressed, tmp_path):
    """An index.faiss of another generation (another row count) would return rows this cache does not have."""
    import shutil

    folder, _ = compressed
    copy = tmp_path / "cache"
    shutil.copytree(folder, copy)
    make_synthetic_cache(tmp_path / "small", 2_000, DIM, BUCKETS)
    small = load_cache(tmp_path / "small")
    build_gallery_index(small.generation, small.columns["embeddings"], "ivf", parse_memory("1GB"))
    shutil.copy(small.generation / "index.faiss", load_cache(copy).generation / "index.faiss")
    with pytest.raises(UserError, match="holds 2,000 vectors of 64 dimensions, the cache 6,000 of 64"):
        Searcher(load_cache(copy))


def test_the_approximate_knn_graph_finds_the_exact_neighbours_with_their_exact_scores():
    """DBA above exact_max_rows takes each row's nearest others from an IVF index probed to recall@k 0.95."""
    from lookalike.cache.indexes import exact_top
    from lookalike.cache.rerank import nearest_others

    vectors, _, _ = synthetic(ROWS, dim=DIM, buckets=BUCKETS)
    sims, ids = nearest_others(vectors, 9, exact_max_rows=0)
    truth = exact_top(vectors, vectors, 10)
    assert np.mean([len(np.intersect1d(f, t)) / 9 for f, t in zip(ids, truth)]) >= 0.95
    assert np.allclose(sims, np.einsum("id,ikd->ik", vectors, vectors[ids]), atol=1e-5)
    assert (ids != np.arange(ROWS)[:, None]).all()  # no row is its own neighbour


def test_a_gallery_index_made_for_the_merged_rows_is_published_for_the_stored_order(tmp_path):
    """build-cache makes its gallery index for the rows as merged, before `auto` is chosen (the validation searches
    through it), and publishes it with the rows grouped by bucket: its ids renumbered, a search through it finds each
    stored row itself, over the whole gallery and in its bucket (whose search probes the lists its rows are in)."""
    from lookalike.cache.generations import write_generation
    from lookalike.cache.indexes import make_gallery_index
    from lookalike.cache.manifest import Manifest

    vectors, classes, _ = synthetic(ROWS, dim=DIM, buckets=BUCKETS)
    merged = np.random.default_rng(0).permutation(ROWS)  # the rows as a build merges them: not grouped by bucket
    probs = np.tile(np.array([0.8, 0.15, 0.05], np.float32), (ROWS, 1))
    columns = {"paths": np.char.add("img", merged.astype(str)), "sizes": np.zeros(ROWS, np.int64),
               "mtimes": np.zeros(ROWS, np.int64), "labels": classes[merged, 0].astype(str),
               "label_classes": np.full(ROWS, -1, np.int32), "classes": classes[merged], "probs": probs,
               "boxes": np.full((ROWS, 4), np.nan, np.float32), "embeddings": vectors[merged]}
    gallery_index = make_gallery_index(columns["embeddings"], "ivf", parse_memory("1GB"))
    write_generation(tmp_path, Manifest(fingerprint={}, config={}, gallery_root=str(tmp_path), count=ROWS, dim=DIM),
                     columns, gallery_index=gallery_index)
    data = load_cache(tmp_path)
    assert not np.array_equal(data.columns["paths"], columns["paths"])  # stored in another order
    searcher = Searcher(data)
    assert searcher.gallery_index is not None
    stored = np.asarray(data.columns["embeddings"])
    for row in range(0, ROWS, 250):
        for policy in ("flat", "top1"):
            found = searcher.search(stored[row], parse_policy(policy), 5, data.columns["classes"][row], probs[row])
            assert found.rows[0] == row, (policy, row)


def test_rows_of_a_list_smaller_than_k_get_their_k_nearest_from_more_lists():
    """k-means leaves a few lists of a handful of rows; a k-NN search of their rows probes more lists (twice as many,
    again) until they hold k rows: each row gets k neighbours, none missing, its own list's first, with their true
    cosines."""
    import faiss

    from lookalike.cache.indexes import knn_rows, lists_of_rows

    rng = np.random.default_rng(0)
    centres = np.eye(8, DIM, dtype=np.float32)  # 8 lists; list 7 gets 3 rows, the others 200
    sizes = [200] * 7 + [3]
    vectors = np.concatenate([centres[i] + 0.05 * rng.standard_normal((n, DIM), dtype=np.float32)
                              for i, n in enumerate(sizes)])
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    quantizer = faiss.IndexFlatIP(DIM)
    quantizer.add(centres)
    index = faiss.IndexIVFFlat(quantizer, DIM, 8, faiss.METRIC_INNER_PRODUCT)
    index.add(vectors)
    small = np.arange(len(vectors) - 3, len(vectors))
    sims, ids = knn_rows(index, vectors, small, 10, 1, lists_of_rows(index))
    assert (ids >= 0).all() and all(set(found[:3]) == set(small) for found in ids)
    assert np.allclose(sims, np.einsum("id,ikd->ik", vectors[small], vectors[ids]), atol=1e-5)


def test_knn_rows_finds_what_faiss_ivf_search_finds_for_any_probes():
    """knn_rows scans each list once for every row probing it: the same neighbours and cosines as faiss's own IVF
    search probing as many lists (the row's own list alone for one probe), in any order of rows asked."""
    from lookalike.cache.indexes import ivf_search, knn_rows, lists_of_rows, make_index

    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((3_000, DIM), dtype=np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    index = make_index(vectors, "IVF16,Flat")
    rows = rng.permutation(len(vectors))[:500]
    for probes in (1, 3, 16):
        sims, ids = knn_rows(index, vectors, rows, 12, probes, lists_of_rows(index))
        expected_sims, expected = ivf_search(index, vectors[rows], 12, probes)
        assert np.mean(ids == expected) > 0.99 and np.allclose(sims, expected_sims, atol=1e-5), probes
    assert (ids[:, 0] == rows).all()  # every row is its own nearest, all lists probed
    with pytest.raises(ValueError, match="IVF,Flat"):
        knn_rows(make_index(vectors, "IVF16,PQ8"), vectors, rows, 12, 1, lists_of_rows(index))

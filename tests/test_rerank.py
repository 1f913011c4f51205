"""Re-ranking on stored vectors: DBA, aQE and k-reciprocal raise retrieval quality on clustered vectors, and
leave-one-out DBA is exactly the gallery without the held-out row."""
from __future__ import annotations

import numpy as np
import pytest

from lookalike.cache.metrics import map_at_r, precision_at_k, rank_by_score, relevance_matrix
from lookalike.cache.rerank import LeaveOneOutDBA, alpha_qe, dba, k_reciprocal, nearest
from lookalike.models.outputs import unit_rows


def clustered(seed: int, clusters: int = 12, per_cluster: int = 15, dim: int = 32, noise: float = 1.2):
    """Unit vectors around random cluster centres (label = cluster): noisy enough that flat search is imperfect."""
    rng = np.random.default_rng(seed)
    centres = unit_rows(rng.normal(size=(clusters, dim)))
    labels = np.repeat(np.arange(clusters), per_cluster)
    vectors = unit_rows(centres[labels] + noise * rng.normal(size=(len(labels), dim)) / np.sqrt(dim))
    return vectors, labels


def quality(scores: np.ndarray, query_labels: np.ndarray, gallery_labels: np.ndarray) -> tuple[float, float]:
    relevance = relevance_matrix(rank_by_score(scores), query_labels, gallery_labels)
    n_relevant = (gallery_labels[None, :] == query_labels[:, None]).sum(axis=1)
    return map_at_r(relevance, n_relevant), precision_at_k(relevance, n_relevant, 1)


@pytest.fixture(scope="module")
def split():
    vectors, labels = clustered(0)
    rng = np.random.default_rng(1)
    queries = np.zeros(len(labels), bool)
    queries[rng.permutation(len(labels))[:len(labels) // 5]] = True
    return vectors[~queries], labels[~queries], vectors[queries], labels[queries]


def test_dba_raises_map_at_r(split):
    gallery, gallery_labels, queries, query_labels = split
    flat_map, flat_p1 = quality(queries @ gallery.T, query_labels, gallery_labels)
    dba_map, dba_p1 = quality(queries @ dba(gallery, 5).T, query_labels, gallery_labels)
    assert flat_map < 0.9  # the set leaves room to improve
    assert dba_map > flat_map + 0.02
    assert dba_p1 >= flat_p1 - 0.05


def test_alpha_qe_raises_map_at_r(split):
    gallery, gallery_labels, queries, query_labels = split
    sims, ids = nearest(gallery, queries, 5)
    expanded = alpha_qe(queries, gallery[ids], sims, alpha=3.0, k=5)
    assert np.allclose(np.linalg.norm(expanded, axis=1), 1.0, atol=1e-5)
    assert quality(expanded @ gallery.T, query_labels, gallery_labels)[0] > \
        quality(queries @ gallery.T, query_labels, gallery_labels)[0] + 0.02


def test_k_reciprocal_raises_map_at_r_within_the_pool(split):
    gallery, gallery_labels, queries, query_labels = split
    pool = 60
    flat = queries @ gallery.T
    reranked = np.full_like(flat, -np.inf)
    for i, query in enumerate(queries):
        top = rank_by_score(flat[i], pool)
        reranked[i, top] = k_reciprocal(query, gallery[top], k1=10, k2=4)
    flat_top = np.full_like(flat, -np.inf)  # the same pool in its original order
    np.put_along_axis(flat_top, rank_by_score(flat, pool), np.take_along_axis(flat, rank_by_score(flat, pool), 1), 1)
    assert quality(reranked, query_labels, gallery_labels)[0] > quality(flat_top, query_labels, gallery_labels)[0]


def test_dba_with_k1_or_one_row_changes_nothing():
    vectors, _ = clustered(2, clusters=2, per_cluster=3)
    assert np.array_equal(dba(vectors, 1), vectors)
    assert np.array_equal(dba(vectors[:1], 5), vectors[:1])


def test_held_out_row_has_no_influence():
    """dba(held_out=q) on the other rows equals DBA of the gallery with q deleted, whatever q's vector is."""
    vectors, _ = clustered(3, clusters=4, per_cluster=6)
    q = 5
    others = np.delete(np.arange(len(vectors)), q)
    expected = dba(vectors[others], 4, alpha=2.0)
    assert np.allclose(dba(vectors, 4, alpha=2.0, held_out=q)[others], expected, atol=1e-6)
    moved = vectors.copy()
    moved[q] = vectors[0]  # the held-out row now sits on another row: still no influence
    assert np.allclose(dba(moved, 4, alpha=2.0, held_out=q)[others], expected, atol=1e-6)


def test_leave_one_out_dba_matches_brute_force():
    vectors, _ = clustered(4, clusters=4, per_cluster=6)
    loo = LeaveOneOutDBA(vectors, 3, alpha=1.0)
    assert np.allclose(loo.augmented, dba(vectors, 3, alpha=1.0), atol=1e-6)
    held_out = np.arange(len(vectors))
    scores = loo.similarities(vectors, held_out)
    for q in held_out:
        brute = dba(vectors, 3, alpha=1.0, held_out=int(q))
        others = np.delete(np.arange(len(vectors)), q)
        assert np.allclose(scores[q, others], brute[others] @ vectors[q], atol=1e-5)
        assert np.allclose(loo.rows_of(others, int(q)), brute[others], atol=1e-6)


def test_k_reciprocal_scores_stay_finite_among_exact_duplicates():
    """A pool full of identical vectors (exact duplicates in a gallery) used to leave points with no reciprocal
    neighbour at all, and 0/0 weights made every score NaN."""
    pool = np.tile(unit_rows(np.ones((1, 8))), (30, 1))
    pool[20:] = unit_rows(np.arange(8.0)[None])  # a second group of duplicates
    scores = k_reciprocal(pool[0], pool, k1=5, k2=2)
    assert np.all(np.isfinite(scores)) and scores[:20].min() > scores[20:].max()


def test_leave_one_out_dba_over_a_knn_graph_makes_the_rows_read_from_their_own_lists():
    """Above exact_max_rows validation reads DBA vectors of its candidates only: a KnnGraph through an IVF index finds
    the lists of the rows read (recall@k 0.95 against exact), and rows_of from those lists equals LeaveOneOutDBA over
    the whole graph, the held-out row replaced by each list's next."""
    from lookalike.cache.indexes import exact_top, ivf_lists, make_index
    from lookalike.cache.rerank import KnnGraph

    vectors, _ = clustered(5, clusters=20, per_cluster=40)
    graph = KnnGraph(vectors, 6, make_index(vectors, f"IVF{ivf_lists(len(vectors))},Flat"))
    read = np.arange(100, 160)
    lazy = LeaveOneOutDBA(vectors, 4, alpha=1.0, neighbours=graph)
    part = [lazy.rows_of(read, int(q)) for q in (100, 130, 700)]
    sims, ids = graph(np.arange(len(vectors)))
    truth = exact_top(vectors, vectors, 7)[:, 1:]
    assert np.mean([len(np.intersect1d(f, t)) / 6 for f, t in zip(ids, truth)]) >= 0.95
    assert not (ids == np.arange(len(vectors))[:, None]).any()  # each row's own row is out of its list
    whole = LeaveOneOutDBA(vectors, 4, alpha=1.0, neighbours=(sims, ids))
    for q, got in zip((100, 130, 700), part):
        assert np.allclose(got, whole.rows_of(read, q), atol=1e-6)
        users, changed = whole.without(q)
        expected = whole.augmented[read].copy()
        inside = np.isin(users, read)
        expected[np.searchsorted(read, users[inside])] = changed[inside]
        assert np.allclose(got, expected, atol=1e-6)


def test_rows_made_once_hold_memory_for_the_rows_made_not_the_whole_matrix():
    """A validation at 10^6 rows reads the DBA vectors of about a fifth of them: kept row after row as made, they
    hold that fifth (written into a whole-sized matrix at scattered rows, they held whole 2 MB pages: 22 GB)."""
    import tracemalloc

    from lookalike.cache.rerank import MadeOnce

    calls = []

    def make(rows):
        calls.append(len(rows))
        return (np.repeat(rows[:, None].astype(np.float32), 512, axis=1),)

    made = MadeOnce(1_000_000, [((512,), np.float32)])
    rows = np.random.default_rng(0).choice(1_000_000, 2_000, replace=False)
    tracemalloc.start()
    for part in np.array_split(rows, 10):
        assert np.array_equal(made(part, make)[0][:, 0], part)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 40 << 20  # the whole matrix: 2 GB; 2,000 rows: 4 MB
    assert np.array_equal(made(rows[::-1], make)[0][:, 7], rows[::-1]) and sum(calls) == 2_000  # each made once

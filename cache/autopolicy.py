"""Choosing the `auto` bucket policy and the `fused` weight on the labelled gallery itself, never on test queries.

Validation is leave-one-out: labelled gallery rows (a seeded sample of at most QUERY_LIMIT) each query all the
other rows of the gallery (of a seeded GALLERY_LIMIT-row subsample when the gallery is larger). Every policy is
scored in numpy from one cosine matrix and one class-agreement matrix per chunk of queries: a candidate mask and a
sort, not a search per query.

`auto` is the policy of auto_family() that searches the fewest images among those not worse than flat search there:
MAP@R at least flat's and P@1 not significantly lower (a paired sign count). On caltech101-22, AT&T faces and
tiny-imagenet-20 (mobilenetv2, no crop) this rule kept flat search's P@1 and MAP@R on the held-out test queries at
17-91 % of the gallery; on caltech101-22 with YOLO crops it cost 4 of 485 rank-1 hits for +0.009 MAP@R.
"""
from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import NamedTuple

import numpy as np
from threadpoolctl import threadpool_limits

from lookalike.cache.buckets import class_agreement
from lookalike.cache.columns import WHITE_COLUMN
from lookalike.cache.metrics import leave_one_out, map_at_r, precision_at_k, relevance_matrix
from lookalike.cache.policies import FLAT, BucketPolicy
from lookalike.cache.rerank import KnnGraph, LeaveOneOutDBA, nearest_others
from lookalike.cache.reranking import HeldOutGallery, rerank
from lookalike.cache.indexes import EXACT_MAX_ROWS, CompressedSearch, GalleryIndex, ivf_lists, make_index
from lookalike.cache.search import RERANK_IVF_POOL, WHOLE_GALLERY, IVFIndex, Scored, Searcher, rerank_pool
from lookalike.cache.store import CacheData
from lookalike.cache.whitening import can_fit_whitening, fit_whitening, whiten
from lookalike.models.machine import usable_cpus

# The family `auto` chooses among: query class sets (top N, or a nucleus of probability T over the top 10),
# gallery soft buckets M (at most the classes stored per image) and fused weights W.
AUTO_QUERY_SETS: tuple[tuple[int, float | None], ...] = ((3, None), (5, None), (10, None),
                                                         (10, 0.8), (10, 0.9), (10, 0.95))
AUTO_SOFT = (3, 5, 7, 10)
AUTO_WEIGHTS = (0.0, 0.25, 0.5)
WEIGHTS = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0)  # tried for a `fused` policy given without @W

QUERY_LIMIT = 2_000  # validation queries at most: enough for a stable MAP@R and sign count, bounded cost
RERANK_QUERY_LIMIT = 500  # validation queries for re-ranking (the first of the same seeded order)
WHITENING_FOLDS = 2  # +white cross-fitted on a small gallery: each half of the queries ranked in a whitening without it
# A validation through the search path ranks each query's best this many (R counts up to it): as deep as a search's
# pool of RERANK_IVF_POOL candidates ranks with its 2 k margin. Its candidates' k-NN lists and DBA vectors are made
# as read: at 10^6 rows, 500 queries' pools of 2 x 1,024 held most rows, and validation took 375 s.
POOLED_DEPTH = RERANK_IVF_POOL // 2
GALLERY_LIMIT = 20_000  # a larger gallery is validated on a seeded subsample of this many rows
CHUNK_ELEMENTS = 1 << 22  # query x gallery scores computed at once, per thread (a few hundred MB each)
WORKERS = usable_cpus()  # validation threads


@dataclass(frozen=True)
class Score:
    """One policy's leave-one-out result."""

    map_at_r: float
    p_at_1: float
    hits: np.ndarray  # bool per validation query: its first result shares its label
    candidates: float  # mean images searched per query, as a fraction of the validation gallery


def _in_threads(function: Callable, items: list) -> list:
    """[function(item) for item in items] on WORKERS threads with one BLAS thread each: numpy's sorts, products
    and array passes release the GIL, so validation uses every core."""
    with threadpool_limits(limits=1, user_api="blas"), ThreadPoolExecutor(WORKERS) as pool:
        return list(pool.map(function, items))


def validation_split(labels: np.ndarray, seed: int, query_limit: int = QUERY_LIMIT) -> tuple[np.ndarray, np.ndarray] | None:
    """(validation gallery rows, query positions among them); None with fewer than two labels.

    Queries are labelled rows with at least one other image of their label in the validation gallery (any
    other query scores 0 under every policy), a seeded sample of at most `query_limit` in gallery order; a smaller
    limit takes the first of the same seeded order, so its queries are a subset of a larger limit's.
    """
    labels = np.asarray(labels)
    if len(set(labels[labels != ""].tolist())) < 2:
        return None
    rng = np.random.default_rng(seed)
    gallery = np.arange(len(labels))
    if len(gallery) > GALLERY_LIMIT:
        gallery = np.sort(rng.choice(len(labels), GALLERY_LIMIT, replace=False))
    _, codes, counts = np.unique(labels[gallery], return_inverse=True, return_counts=True)
    usable = np.flatnonzero((labels[gallery] != "") & (counts[codes] > 1))
    if len(usable) == 0:
        return None
    return gallery, np.sort(rng.permutation(usable)[:query_limit])


def _weight(policy: BucketPolicy) -> float:
    """The weight of class agreement in a policy's ranking (0: cosine alone)."""
    if policy.kind != "fused":
        return 0.0
    if policy.weight is None:
        raise ValueError(f"bucket policy {policy}: give its weight (@W) or fit it with fit_weights")
    return policy.weight


def _ap_and_hits(relevant_at: tuple[np.ndarray, np.ndarray], candidate: np.ndarray | None,
                 n_relevant: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(AP@R, rank-1 hit) per query when only `candidate` rows are searched (None: all), in ranked order, from the
    ranked positions of each query's relevant rows (`relevant_at`, np.nonzero of the relevance, row-major): the
    searched rank of a relevant row is the number of candidates up to it, so no per-policy relevance is built."""
    rows, positions = relevant_at
    if candidate is None:
        searched, rank = np.ones(len(rows), bool), positions + 1
    else:
        at = rows * candidate.shape[1] + positions  # flat indices: one take, not a 2-D fancy index
        searched = np.take(candidate, at)
        rank = np.take(np.cumsum(candidate, axis=1, dtype=np.int32), at)
    found = np.cumsum(searched)  # relevant candidates so far, counted per query below
    starts = np.searchsorted(rows, np.arange(len(n_relevant)))
    found -= np.concatenate([[0], found])[starts][rows]
    counted = searched & (rank <= n_relevant[rows])
    precision = found[counted] / rank[counted]
    ap = np.bincount(rows[counted], weights=precision, minlength=len(n_relevant)) / np.maximum(n_relevant, 1)
    hits = np.zeros(len(n_relevant), bool)
    hits[rows[counted & (rank == 1)]] = True
    return ap, hits


class Validation(NamedTuple):
    """A validation sample gathered once: its gallery rows, the query positions among them, and the gallery's
    vectors, label codes (with each label's count) and stored classes with their probabilities."""

    gallery: np.ndarray
    queries: np.ndarray
    vectors: np.ndarray
    codes: np.ndarray
    counts: np.ndarray
    classes: np.ndarray
    probs: np.ndarray


def validation_set(columns: dict[str, np.ndarray], seed: int, query_limit: int) -> Validation | None:
    """validation_split's sample with its rows gathered; None with fewer than two labels."""
    split = validation_split(np.asarray(columns["labels"]), seed, query_limit)
    if split is None:
        return None
    gallery, queries = split
    _, codes, counts = np.unique(np.asarray(columns["labels"])[gallery], return_inverse=True, return_counts=True)
    return Validation(gallery, queries, np.asarray(columns["embeddings"][gallery], np.float32), codes, counts,
                      np.asarray(columns["classes"])[gallery], np.asarray(columns["probs"], np.float32)[gallery])


def loo_scores(columns: dict[str, np.ndarray], policies: list[BucketPolicy], seed: int = 0,
               query_limit: int = QUERY_LIMIT) -> dict[BucketPolicy, Score] | None:
    """Leave-one-out Score of each policy (fused ones with their weight) on a cache's columns; None without labels.

    A gallery row is a candidate when one of its top-M classes is among the query's classes (top N or its
    nucleus); the query's own row is always one (it shares the query's classes) and is counted, then left out.
    """
    sample = validation_set(columns, seed, query_limit)
    if sample is None:
        return None
    gallery, queries, embeddings, label_codes, label_counts, classes, probs = sample
    policies = list(dict.fromkeys(policies))
    class_ids, class_codes = np.unique(classes, return_inverse=True)
    class_codes = class_codes.reshape(len(gallery), -1)  # gallery x stored classes, compact class ids
    stored = class_codes.shape[1]
    buckets = {p.gallery_classes for p in policies if p.uses_buckets}  # M > stored acts as stored (as in search)
    weights = sorted({_weight(p) for p in policies})

    def chunk_scores(chunk: np.ndarray) -> dict[BucketPolicy, tuple[np.ndarray, np.ndarray]]:
        """(MAP@R * queries, P@1 * queries, candidates searched) and rank-1 hits of each policy on `chunk`."""
        n_relevant = label_counts[label_codes[chunk]] - 1
        cosine = embeddings[chunk] @ embeddings.T
        # Per compact class id: its position among the query's classes (`stored` when absent).
        position = np.full((len(chunk), len(class_ids)), stored, np.int16)
        for i in range(stored):
            position[np.arange(len(chunk)), class_codes[chunk, i]] = i
        # first[M][q, g]: the best position among query q's classes of a class in gallery row g's top M (g is a
        # candidate when the query uses more classes than that).
        first, lowest = {}, np.full(cosine.shape, stored, np.int16)
        for j in range(stored):
            np.minimum(lowest, position[:, class_codes[:, j]], out=lowest)
            for m in buckets:
                if min(m, stored) == j + 1:
                    first[m] = lowest.copy()
        agreement = class_agreement(classes[chunk], probs[chunk], classes, probs) if weights[-1] > 0 else None
        used = {p: np.reshape(p.classes_used(probs[chunk]), (-1, 1)) for p in policies if p.uses_buckets}
        out = {}
        for weight in weights:
            score = cosine + np.float32(weight) * agreement if weight else cosine
            order, relevant = leave_one_out(score, chunk, label_codes[chunk], label_codes)
            relevant_at = np.nonzero(relevant)
            ranked_first = {m: np.take_along_axis(first[m], order, axis=1) for m in buckets}
            for policy in (p for p in policies if _weight(p) == weight):
                candidate = ranked_first[policy.gallery_classes] < used[policy] if policy.uses_buckets else None
                ap, hits = _ap_and_hits(relevant_at, candidate, n_relevant)
                # The query's own row was searched (it is in its own buckets) but not ranked.
                searched = candidate.sum() + len(chunk) if policy.uses_buckets else len(gallery) * len(chunk)
                out[policy] = np.array([ap.sum(), hits.sum(), searched]), hits
        return out

    # Chunks bound the memory of the [queries x gallery] matrices; one per core at least.
    step = max(1, min(CHUNK_ELEMENTS // max(len(gallery), len(class_ids)), -(-len(queries) // WORKERS)))
    chunks = _in_threads(chunk_scores, [queries[i:i + step] for i in range(0, len(queries), step)])
    return {p: Score(*(sum(c[p][0] for c in chunks)[:2] / len(queries)), np.concatenate([c[p][1] for c in chunks]),
                     sum(c[p][0][2] for c in chunks) / (len(queries) * len(gallery))) for p in policies}


def not_worse(score: Score, flat: Score) -> bool:
    """MAP@R at least flat search's, and P@1 not significantly lower: among the queries where exactly one of the
    two is right at rank 1, flat's wins exceed the policy's by at most the square root of their number (a paired
    sign count, about one standard deviation when both are equally good)."""
    losses = int(np.sum(flat.hits & ~score.hits))
    wins = int(np.sum(score.hits & ~flat.hits))
    return bool(score.map_at_r >= flat.map_at_r and losses - wins <= np.sqrt(losses + wins))


def auto_family(stored_classes: int) -> list[BucketPolicy]:
    """The fused policies `auto` chooses among, for a cache keeping `stored_classes` classes per image."""
    family = [BucketPolicy("fused", min(n, stored_classes), m, w, t)
              for n, t in AUTO_QUERY_SETS for m in AUTO_SOFT if m <= stored_classes for w in AUTO_WEIGHTS]
    return list(dict.fromkeys(family))


def choose_policy(columns: dict[str, np.ndarray], seed: int = 0, rerank: bool = True,
                  exact_max_rows: int = EXACT_MAX_ROWS,
                  gallery_index: GalleryIndex | None = None) -> BucketPolicy | None:
    """`auto` for a gallery, in two steps on leave-one-out:
    1. of the policies searching fewer images than flat search (candidate fraction rounded to 0.001 below 1) and
       not worse than it, the one searching the fewest (ties: the higher MAP@R); flat when there is none;
    2. (`rerank`) a re-ranked flat search of rerank_family() replaces it when it is not worse than flat search and
       gains MAP@R over step 1's choice scored on the same queries (step 2's sample); the one with the best MAP@R.
       Up to `exact_max_rows` images from score matrices (rerank_scores); above, each query searched through the
       search path itself (pooled_scores), through `gallery_index` when the build made one (as its queries will).
    None without labels."""
    family = auto_family(np.asarray(columns["classes"]).shape[1])
    scores = loo_scores(columns, [FLAT, *family], seed)
    if scores is None:
        return None
    searched = {p: round(scores[p].candidates, 3) for p in family}
    eligible = [p for p in family if searched[p] < 1 and not_worse(scores[p], scores[FLAT])]
    chosen = min(eligible, key=lambda p: (searched[p], -scores[p].map_at_r), default=FLAT)
    if not rerank:
        return chosen
    weight = chosen.weight if chosen.kind == "fused" and chosen.weight else None
    candidates = rerank_family(weight)
    if len(columns["labels"]) > exact_max_rows:
        reranked = pooled_scores(columns, [FLAT, chosen, *candidates], seed, exact_max_rows, gallery_index)
        baseline = reranked[chosen]
    else:
        reranked = rerank_scores(columns, [FLAT, *candidates], seed)
        baseline = loo_scores(columns, [chosen], seed, RERANK_QUERY_LIMIT)[chosen]  # step 2's queries, not step 1's
    better = [p for p in candidates if p in reranked and not_worse(reranked[p], reranked[FLAT])
              and reranked[p].map_at_r > baseline.map_at_r]
    return max(better, key=lambda p: reranked[p].map_at_r, default=chosen)


def pooled_scores(columns: dict[str, np.ndarray], policies: list[BucketPolicy], seed: int,
                  exact_max_rows: int, gallery_index: GalleryIndex | None = None) -> dict[BucketPolicy, Score]:
    """Leave-one-out Score of each policy on a gallery of any size, each query searched through the search path
    itself (PooledSearch, through `gallery_index` when given). The queries are RERANK_QUERY_LIMIT labelled rows of the
    whole gallery, each ranked to depth min(R, POOLED_DEPTH); with +white policies, cross-fitted as in rerank_scores.
    A +white policy has no score when the whitening cannot be fitted (no label with two images).
    `columns["embeddings"]`: float32 rows in memory."""
    labels = np.asarray(columns["labels"])
    _, codes, counts = np.unique(labels, return_inverse=True, return_counts=True)
    usable = np.flatnonzero((labels != "") & (counts[codes] > 1))
    queries = np.sort(np.random.default_rng(seed).permutation(usable)[:RERANK_QUERY_LIMIT])
    n_relevant = np.minimum(counts[codes[queries]] - 1, POOLED_DEPTH)
    folds = whitening_folds(queries, len(labels))
    if not all(can_fit_whitening(np.delete(labels, fold)) for fold in folds):
        policies = [p for p in policies if not p.white]
    white = any(p.white for p in policies)
    search = PooledSearch(columns, policies, exact_max_rows, int(n_relevant.max()), gallery_index)
    found = []
    for fold in folds if white else [queries]:
        search.whitened_without(fold if white else None)
        search.prefetch(fold)
        found += _in_threads(search.ranked, fold.tolist())
    scores = {}
    for i, policy in enumerate(policies):  # each fold's queries in `queries` order (np.array_split keeps it)
        relevance = np.zeros((len(queries), search.depth), bool)
        for q, rows in enumerate(f[i] for f in found):
            relevance[q, :len(rows)] = labels[rows] == labels[queries[q]]
        scores[policy] = Score(map_at_r(relevance, n_relevant), precision_at_k(relevance, n_relevant, 1),
                               relevance[:, 0], 1.0)
    return scores


class PooledSearch:
    """pooled_scores' search of a held-out gallery row through the search path: a Searcher over every row (through
    `gallery_index`, else an IVF index above `exact_max_rows`); re-ranked flat policies through rerank_pool (a pool of
    candidates, a second search for +qe), others through Searcher.search. No leak: the row is out of its candidates
    and of every DBA vector it is scored against (LeaveOneOutDBA over a KnnGraph through the space's IVF,Flat index:
    the lists and DBA vectors of the rows pools hold, made as read), and the whitening is fitted without it."""

    def __init__(self, columns: dict[str, np.ndarray], policies: list[BucketPolicy], exact_max_rows: int, depth: int,
                 gallery_index: GalleryIndex | None = None):
        self.columns, self.policies, self.exact_max_rows, self.depth = columns, policies, exact_max_rows, depth
        self.vectors = columns["embeddings"]
        self.classes, self.probs = np.asarray(columns["classes"]), np.asarray(columns["probs"])
        self.searcher = Searcher(CacheData.in_memory(columns), exact_max_rows=exact_max_rows,
                                 gallery_index=gallery_index)
        self.searchers = {False: self.searcher}
        self.dbas = {(p.dba, p.white) for p in policies if p.dba}
        self.spaces = {False: self.vectors}
        self.searcher.index(WHOLE_GALLERY, 1)  # made here, with every BLAS thread (queries run one thread each)
        self.galleries = self._galleries(False)
        self._pools: dict[tuple[int, bool], np.ndarray] = {}  # each query's first candidates, shared by its policies

    def _galleries(self, white: bool) -> dict:
        """The LeaveOneOutDBA of each (K, a) the policies name in one space, over one k-NN graph of it: exact, or
        through an IVF,Flat index of the space."""
        named = [dba for dba, w in self.dbas if w == white]
        if not named:
            return {}
        depth, space, index = max(k for k, _ in named), self.spaces[white], self._graph_index(white)
        gallery_index = self.searcher.gallery_index
        truth = gallery_index.truth if gallery_index is not None and not white else None  # of the plain rows
        graph = KnnGraph(space, depth, index, truth) if index is not None else nearest_others(space, depth)
        return {(dba, white): LeaveOneOutDBA(space, *dba, neighbours=graph) for dba in named}

    def _graph_index(self, white: bool):
        """The IVF,Flat faiss index of a space that its k-NN graph searches, as the build's DBA graph does: the index
        its searches go through, or one made beside an IVF-PQ gallery index (whose codes are not the vectors); None
        where its searches are exact."""
        index = self.searchers[white].index(WHOLE_GALLERY, 1, white)
        if not isinstance(index, CompressedSearch):
            return index.index if isinstance(index, IVFIndex) else None
        flat = self.searchers[white].gallery_index.flat_index
        return flat if flat is not None else make_index(self.spaces[white], f"IVF{ivf_lists(len(self.vectors))},Flat")

    def whitened_without(self, held_out: np.ndarray | None) -> None:
        """The whitened space (and its DBAs) fitted on every row but `held_out`; None: no whitened space."""
        if held_out is None:
            return
        labels = np.asarray(self.columns["labels"])
        whitening = fit_whitening(self.vectors, labels, np.delete(np.arange(len(labels)), held_out))
        self.spaces[True] = whiten(self.vectors, whitening)
        data = CacheData.in_memory({**self.columns, WHITE_COLUMN: self.spaces[True]}, whitening=True)
        data.whitening = whitening
        self.searchers[True] = Searcher(data, exact_max_rows=self.exact_max_rows)  # its candidates: whitened
        self.searchers[True].index(WHOLE_GALLERY, 1, True)
        self._pools = {key: pool for key, pool in self._pools.items() if not key[1]}
        self.galleries = {**{key: g for key, g in self.galleries.items() if not key[1]}, **self._galleries(True)}

    def prefetch(self, rows: np.ndarray) -> None:
        """The first candidates of each query row in every space its re-ranked policies rank in, then the k-NN lists and
        DBA vectors of all of them at once: at 10^6 rows a k-NN search of 10^5 rows in one batch keeps faiss's threads
        busy, where one query's pool at a time left them waiting (most of validation's time)."""
        for white in {p.white for p in self.policies if p.reranks and not p.uses_buckets}:
            union = np.unique(np.concatenate(_in_threads(lambda row: self._first_pool(row, white), rows.tolist())))
            galleries = [g for (_, space), g in self.galleries.items() if space == white]
            if galleries:
                galleries[0].neighbours_of(union)  # one k-NN batch on every core, shared by the space's DBAs
                _in_threads(lambda gallery: gallery.prepare(union), galleries)

    def _first_pool(self, row: int, white: bool) -> np.ndarray:
        """The candidates of gallery row `row`'s first search in one space (without it), shared by its policies."""
        if (row, white) not in self._pools:
            found = self.searchers[white].candidate_rows(self.vectors[row], [WHOLE_GALLERY], 1, self.depth, white)
            self._pools[row, white] = found[found != row]
        return self._pools[row, white]

    def ranked(self, row: int) -> list[np.ndarray]:
        """Each policy's rows for the query of gallery row `row`, best first, without that row."""
        out, first = [], {}
        for policy in self.policies:
            if policy.reranks and not policy.uses_buckets:
                out.append(self._reranked(row, policy, first))
            else:
                found = self.searcher.search(self.vectors[row], policy, self.depth + 1, self.classes[row],
                                             self.probs[row]).rows
                out.append(found[found != row][:self.depth])
        return out

    def _reranked(self, row: int, policy: BucketPolicy, first: dict) -> np.ndarray:
        """The rows of `policy` for the query of gallery row `row`; `first`: the Scored of its first pool in each
        (space, DBA, weight), shared by the policies of one query."""
        query, space = self.vectors[row], self.spaces[policy.white]
        dba, weight = self.galleries.get((policy.dba, policy.white)), policy.weight or 0.0
        pool = self._first_pool(row, policy.white)

        def candidates(q: np.ndarray) -> np.ndarray:
            if q is query:
                return pool
            found = self.searchers[policy.white].candidate_rows(q, [WHOLE_GALLERY], 1, self.depth, policy.white)
            return found[found != row]

        def scored(rows: np.ndarray) -> Scored:
            key = (policy.white, policy.dba, weight)
            if rows is pool and key in first:
                return first[key]
            stored, against = self.vectors[rows], dba.rows_of(rows, row) if dba else space[rows]
            bonus = (weight * class_agreement(self.classes[row], self.probs[row], self.classes[rows],
                                              self.probs[rows])[0] if weight else np.zeros(len(rows), np.float32))
            found = Scored(space[row], against, against @ space[row], bonus, stored, stored @ query)
            if rows is pool:
                first[key] = found
            return found

        rows, _, _, best = rerank_pool(query, policy, self.depth, candidates, scored,
                                       lambda rows: len(rows) == len(self.vectors) - 1)
        return rows[best]


# Re-ranking `auto` considers (docs/rerank-study.md: the study's 186 combinations on three galleries, trimmed to those
# that won or came close): DBA (K, a) x alpha-QE (K, a), and k-reciprocal (K1, K2) on plain vectors.
RERANK_DBA = (None, (2, 0.0), (5, 0.0), (20, 3.0))
RERANK_QE = (None, (2, 1.0), (10, 1.0))
RERANK_KRECIP = ((5, 2), (20, 6))


def rerank_family(weight: float | None) -> list[BucketPolicy]:
    """Flat searches re-ranked by DBA and/or alpha-QE, or k-reciprocal; with the class term (flat@W) when the
    bucketed choice found one worth a weight; each also in the learned whitened space (+white)."""
    family = [BucketPolicy("flat", weight=weight, dba=d, qe=q) for d in RERANK_DBA for q in RERANK_QE if d or q]
    family += [BucketPolicy("flat", weight=weight, krecip=k) for k in RERANK_KRECIP]
    return family + [replace(p, white=True) for p in [BucketPolicy("flat", weight=weight), *family]]


def rerank_scores(columns: dict[str, np.ndarray], policies: list[BucketPolicy],
                  seed: int = 0) -> dict[BucketPolicy, Score] | None:
    """Leave-one-out Score of flat re-ranked policies, scored as cache/search.py's re-ranked search does. No leak:
    the held-out row is out of its own ranking, its expansion and every DBA vector (LeaveOneOutDBA), and +white
    policies are cross-fitted: each part of the queries (whitening_folds) is ranked in a whitening fitted on every
    validation row but that part's."""
    sample = validation_set(columns, seed, RERANK_QUERY_LIMIT)
    if sample is None:
        return None
    policies = list(dict.fromkeys(policies))
    plain, white = [p for p in policies if not p.white], [p for p in policies if p.white]
    scores = _sample_scores(sample, plain) if plain else {}
    if white:
        labels = np.asarray(columns["labels"])[sample.gallery]
        folds = whitening_folds(sample.queries, len(sample.gallery))
        everyone = np.arange(len(sample.gallery))
        fitted = [fit_whitening(sample.vectors, labels, np.delete(everyone, fold)) for fold in folds]
        if all(whitening is not None for whitening in fitted):  # else too few labelled images: no +white score
            parts = [_sample_scores(sample._replace(queries=fold, vectors=whiten(sample.vectors, whitening)), white)
                     for fold, whitening in zip(folds, fitted)]
            scores.update({p: _merged([part[p] for part in parts]) for p in white})
    return {p: scores[p] for p in policies if p in scores}


def whitening_folds(queries: np.ndarray, rows: int) -> list[np.ndarray]:
    """The parts of the validation queries each ranked in a whitening fitted without them: all in one when they are at
    most a tenth of the gallery's `rows` (fitted on 90 % of it or more, near the one the build fits on all of it: one
    fit, one whitened k-NN graph, where a 10^6-row gallery spent minutes on each), else WHITENING_FOLDS parts."""
    return [queries] if 10 * len(queries) <= rows else np.array_split(queries, WHITENING_FOLDS)


def _merged(parts: list[Score]) -> Score:
    """One Score of several parts' queries, in their order."""
    counts = np.array([len(part.hits) for part in parts])
    return Score(float(np.average([p.map_at_r for p in parts], weights=counts)),
                 float(np.average([p.p_at_1 for p in parts], weights=counts)),
                 np.concatenate([p.hits for p in parts]), 1.0)


def _sample_scores(sample: Validation, policies: list[BucketPolicy]) -> dict[BucketPolicy, Score]:
    """rerank_scores of `policies` on one sample, the queries ranked against its `vectors` as they are."""
    _, queries, vectors, codes, counts, classes, probs = sample
    n_relevant = counts[codes[queries]] - 1
    agreement = class_agreement(classes[queries], probs[queries], classes, probs) if classes.shape[1] else None
    # Every DBA of the family from one k-NN pass; each held-out row's changed vectors are computed once per DBA.
    dbas = {(1, 0.0)} | {p.dba or (1, 0.0) for p in policies}  # (1, 0.0): the plain cosine, for copies first
    depth = min(max(k for k, _ in dbas), len(vectors) - 1)
    neighbours = nearest_others(vectors, depth) if depth > 1 else None
    galleries = {dba: HeldOutGallery(LeaveOneOutDBA(vectors, *dba, neighbours=neighbours), queries) for dba in dbas}
    everyone = np.arange(len(queries))
    plain = dict(zip(dbas, _in_threads(lambda dba: galleries[dba].similarities(vectors[queries], everyone),
                                       list(dbas))))

    def score(policy: BucketPolicy) -> Score:
        dba = policy.dba or (1, 0.0)
        bonus = policy.weight * agreement if policy.weight and agreement is not None else 0.0
        order = rerank(galleries[dba], vectors[queries], plain[dba], bonus, policy.qe, policy.krecip, plain[(1, 0.0)],
                       int(n_relevant.max())).order
        relevance = relevance_matrix(order, codes[queries], codes)
        return Score(map_at_r(relevance, n_relevant), precision_at_k(relevance, n_relevant, 1), relevance[:, 0], 1.0)

    return dict(zip(policies, _in_threads(score, policies)))


def fit_weights(columns: dict[str, np.ndarray], policies: list[BucketPolicy],
                seed: int = 0) -> dict[BucketPolicy, BucketPolicy]:
    """Each policy with its fused weight fitted on the gallery: among WEIGHTS, the best leave-one-out MAP@R of
    those not worse than flat search (ties: the smaller weight), else the best MAP@R; {} without labels."""
    if not policies:
        return {}  # nothing to fit: no validation pass
    trials = {policy: [replace(policy, weight=w) for w in WEIGHTS] for policy in policies}
    scores = loo_scores(columns, [FLAT, *(v for variants in trials.values() for v in variants)], seed)
    if scores is None:
        return {}
    fitted = {}
    for policy, variants in trials.items():
        eligible = [v for v in variants if not_worse(scores[v], scores[FLAT])] or variants
        fitted[policy] = max(eligible, key=lambda v: (scores[v].map_at_r, -v.weight))
    return fitted

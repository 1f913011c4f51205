"""The gallery's index for large searches, chosen and made at build time under a memory budget (`build-cache --index
auto|exact|ivf|ivfpq[:MEMORY] --index-memory 4GB`): faiss factory strings, with the lists probed tuned by measured
recall.

- exact: every search scans the stored float32 rows (memory-mapped): the answer is exact; a search over more than
  EXACT_MAX_ROWS rows uses an IVF index made at the first such query (cache/search.py), as before.
- ivf (`IVF{n},Flat`): the rows again, grouped in lists; a query scans the lists nearest to it.
- ivfpq (`IVF{n},PQ{m}x4fs`): each row as m 4-bit product-quantised codes (m/2 bytes), 32-256x smaller than float32,
  scanned with faiss's SIMD fast-scan kernels. (8-bit codes trained 100-200x slower here: 106 s for 6,000 rows.)

`auto` keeps exact search up to EXACT_MAX_ROWS rows, IVF while the vectors fit the budget, and IVF-PQ with the finest
code that fits above that. An index answers searches over the whole gallery and over buckets alike: the bucket is an
ID selector on the search (a top-1 bucket is one contiguous run of rows), and the index only proposes candidates,
which are re-scored exactly from the stored rows (read with pread): the scores are true cosines, and an approximate
code changes which rows are found, never their scores. The lists probed and the candidates re-scored are the cheapest
pair whose recall@5 against exact search, measured through that same path on sampled gallery rows, reaches
RECALL_TARGET (coarse codes need more candidates: at 10^6 rows 64 capped recall@5 at 0.80).
"""
from __future__ import annotations

import io
import json
import re
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np

from lookalike.cache.mapped import StackedRows, read_rows, slice_rows
from lookalike.cache.metrics import rank_by_score
from lookalike.models.errors import UserError
from lookalike.models.files import atomic_write, write_text_atomic

INDEX_KINDS = ("auto", "exact", "ivf", "ivfpq")
DEFAULT_MEMORY = "4GB"
EXACT_MAX_ROWS = 32_768  # exact search up to this many rows (cache/search.py measured its cost)
RECALL_TARGET = 0.95  # recall@5 against exact search that the probes are tuned to reach
TUNING_QUERIES = 200  # sampled gallery rows the probes are tuned on
TRUTH_DEPTH = 32  # their exact neighbours found when a gallery index is made: for its recall@5 and the k-NN graphs'
PROBES = (1, 2, 4, 8, 16, 32, 64, 128, 256)
PQ_BYTES = (64, 48, 32, 24, 16, 8)  # code sizes tried, finest first: 2 x this many 4-bit parts
ID_BYTES = 8  # an inverted list keeps each row's 64-bit id beside its code
CANDIDATES = (64, 256, 1024)  # rows an index may propose for a top-k search (at least 2 k), re-scored exactly
TRAIN_PER_LIST = 40  # training rows per inverted list (faiss warns below 39)
PQ_MIN_ROWS = 256  # a PQ code's 256 centroids per part need at least as many training rows
INDEX_FILE, RECORD_FILE = "index.faiss", "index.json"
LISTS_FILE = "index-lists.npy"  # the inverted list of every row: a bucket's search probes only the lists it is in
_MEMORY = re.compile(r"^(?P<number>\d+(?:\.\d+)?)\s*(?P<unit>[KMGT]?i?B)?$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}


@dataclass(frozen=True)
class IndexRecord:
    """What a generation's index is: its kind, faiss factory string, lists probed and the recall@5 measured."""

    kind: str
    key: str
    nprobe: int
    candidates: int
    recall_at_5: float
    bytes_per_row: float


def parse_memory(text: str) -> int:
    """'4GB', '512MiB', '2e9' bytes... as bytes; UserError otherwise."""
    match = _MEMORY.match(text.strip())
    if match is None:
        raise UserError(f"index memory {text!r}: give a size such as 4GB or 512MiB")
    return int(float(match["number"]) * _UNITS[(match["unit"] or "B").lower()])


def parse_index(text: str, memory: str = DEFAULT_MEMORY) -> tuple[str, int]:
    """`--index` (kind, or ivfpq:MEMORY) and `--index-memory` as (kind, budget in bytes)."""
    kind, _, budget = text.partition(":")
    if kind not in INDEX_KINDS or (budget and kind != "ivfpq"):
        raise UserError(f"--index {text}: use {', '.join(INDEX_KINDS[:-1])} or ivfpq[:MEMORY] (ivfpq:2GB)")
    return kind, parse_memory(budget or memory)


def ivf_lists(count: int) -> int:
    """Inverted lists for `count` vectors: about sqrt(count) (~1,000 rows a list at 10^6), and at most one per
    TRAIN_PER_LIST rows (faiss's k-means wants that many training rows per list)."""
    return max(1, min(65_536, int(np.sqrt(count)), count // TRAIN_PER_LIST))


def factory_key(kind: str, count: int, dim: int, memory: int) -> str | None:
    """The faiss factory string for `kind` ('auto' resolved) on `count` rows of `dim`, or None for exact search.
    UserError when no code fits `memory`."""
    if kind == "auto":
        kind = "exact" if count <= EXACT_MAX_ROWS else "ivf" if count * (4 * dim + ID_BYTES) <= memory else "ivfpq"
    if kind == "exact":
        return None
    lists = ivf_lists(count)
    if kind == "ivf":
        return f"IVF{lists},Flat"
    if count < PQ_MIN_ROWS:
        raise UserError(f"--index ivfpq: {count} images are too few to train its codes (at least {PQ_MIN_ROWS}); "
                        "use exact or ivf")
    for code in PQ_BYTES:
        if dim % (2 * code) == 0 and count * (code + ID_BYTES) <= memory:
            return f"IVF{lists},PQ{2 * code}x4fs"
    smallest = min((c for c in PQ_BYTES if dim % (2 * c) == 0), default=None)
    need = f"{count * (smallest + ID_BYTES) / 2**20:,.0f} MiB" if smallest else f"a code size dividing {dim}"
    raise UserError(f"--index-memory {memory / 2**20:,.0f} MiB: the smallest IVF-PQ index of {count:,} rows needs "
                    f"{need}")


def make_index(vectors: np.ndarray, key: str, rows: np.ndarray | None = None, seed: int = 0):
    """A faiss index (inner product) made by `key` over `vectors[rows]` (every row when None), trained on a seeded
    sample and filled a slice at a time (the i-th row added gets id i)."""
    import faiss

    rows = np.arange(len(vectors)) if rows is None else np.asarray(rows)
    count, dim = len(rows), vectors.shape[1]
    index = faiss.index_factory(dim, key, faiss.METRIC_INNER_PRODUCT)
    lists = faiss.extract_index_ivf(index).nlist
    sample = np.sort(np.random.default_rng(seed).choice(count, min(count, TRAIN_PER_LIST * max(lists, 256)),
                                                        replace=False))
    index.train(read_rows(vectors, rows[sample]))
    step = slice_rows(dim)
    for start in range(0, count, step):
        index.add(read_rows(vectors, rows[start:start + step]))
    return index


class Truth(NamedTuple):
    """TUNING_QUERIES sampled rows of a matrix and the rows of their exact top k in it, best first: what an index's
    probes are tuned against."""

    rows: np.ndarray
    top: np.ndarray


class GalleryIndex(NamedTuple):
    """A generation's gallery index as a search uses it: its record, the index (memory-mapped), the inverted list of
    every row (LISTS_FILE) and every list's centroid; when made in this process, the Truth of its rows to TRUTH_DEPTH
    (it was tuned on; `auto`'s validation and the build's DBA tune their k-NN graphs of the same rows on it)."""

    record: IndexRecord
    index: object
    row_lists: np.ndarray
    centroids: np.ndarray
    truth: Truth | None = None

    @property
    def flat_index(self):
        """The faiss index when its lists hold the vectors whole (ivf), which a k-NN graph of them can search; None
        for codes (ivfpq)."""
        return self.index if self.record.kind == "ivf" else None


def lists_of_rows(index) -> np.ndarray:
    """The inverted list holding each row of an IVF index (its ids are the rows), read from the lists."""
    import faiss

    ivf = faiss.extract_index_ivf(index)
    out = np.zeros(ivf.ntotal, np.uint16 if ivf.nlist <= 1 << 16 else np.int32)
    for number in range(ivf.nlist):
        size = ivf.invlists.list_size(number)
        if size:
            out[faiss.rev_swig_ptr(ivf.invlists.get_ids(number), size)] = number
    return out


class CompressedSearch:
    """One bucket's (or the whole gallery's) search through the gallery index: the index proposes candidates among
    `rows` only (an ID selector), which are re-scored exactly from the stored vectors. The whole gallery probes the
    tuned number of lists, or enough to hold twice the candidates wanted (a benchmark ranking every row probes them
    all). A bucket probes only the lists that hold its rows, nearest first: the tuned number, or enough to hold twice
    the candidates wanted among its rows (a bucket of 10^4 of 10^7 rows lies in a few of 3,162 lists; probing every
    list for it took 84 ms)."""

    def __init__(self, gallery: GalleryIndex, embeddings: np.ndarray, rows: np.ndarray, whole: bool):
        import faiss

        self.index, self.embeddings, self.rows = gallery.index, embeddings, rows
        self.nprobe, self.candidates = gallery.record.nprobe, gallery.record.candidates
        self.lists = faiss.extract_index_ivf(gallery.index).nlist
        self.nbytes = 0  # the index is memory-mapped; nothing of the bucket is held
        self.bucket_lists = self.selector = None
        if not whole:
            contiguous = len(rows) and rows[-1] - rows[0] + 1 == len(rows)
            self.selector = (faiss.IDSelectorRange(int(rows[0]), int(rows[-1]) + 1) if contiguous
                             else faiss.IDSelectorBatch(rows.astype(np.int64)))
            self.bucket_lists, self.bucket_sizes = np.unique(np.asarray(gallery.row_lists[rows]), return_counts=True)
            if len(self.bucket_lists) and self.bucket_lists[-1] >= self.lists:
                raise UserError(f"its index: {LISTS_FILE} names list {self.bucket_lists[-1]} of {self.lists}; "
                                "rebuild the cache with build-cache --rebuild")
            self.bucket_centroids = gallery.centroids[self.bucket_lists]

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(exact scores, positions in `rows`), best first."""
        wanted = min(len(self.rows), max(self.candidates, 2 * k))
        query = np.ascontiguousarray(query[None], np.float32)
        found = self._whole(query, wanted) if self.bucket_lists is None else self._bucket(query, wanted)
        found = found[found >= 0]
        scores = read_rows(self.embeddings, found) @ query[0]
        best = rank_by_score(scores, min(k, len(found)))
        return scores[best], np.searchsorted(self.rows, found[best])

    def _whole(self, query: np.ndarray, wanted: int) -> np.ndarray:
        probes = min(self.lists, max(self.nprobe, int(np.ceil(2 * wanted * self.lists / max(1, len(self.rows))))))
        return ivf_search(self.index, query, wanted, probes)[1][0]

    def _bucket(self, query: np.ndarray, wanted: int) -> np.ndarray:
        """The bucket's lists nearest the query first, as many as hold 2 x `wanted` of its rows (at least nprobe),
        searched with the bucket's selector (faiss's search_preassigned: the lists are given, not found)."""
        import faiss

        order = rank_by_score(self.bucket_centroids @ query[0])
        held = np.cumsum(self.bucket_sizes[order])
        probes = min(len(order), max(self.nprobe, int(np.searchsorted(held, 2 * wanted)) + 1))
        lists = np.ascontiguousarray(self.bucket_lists[order[:probes]][None], np.int64)
        centroid_scores = np.ascontiguousarray((self.bucket_centroids[order[:probes]] @ query[0])[None], np.float32)
        scores, found = np.empty((1, wanted), np.float32), np.empty((1, wanted), np.int64)
        faiss.extract_index_ivf(self.index).search_preassigned_c(
            1, faiss.swig_ptr(query), wanted, faiss.swig_ptr(lists), faiss.swig_ptr(centroid_scores),
            faiss.swig_ptr(scores), faiss.swig_ptr(found), False,
            faiss.SearchParametersIVF(sel=self.selector, nprobe=probes))
        return found[0]


def exact_top(embeddings: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """The rows of the exact top k of each query (inner product), best first, over a memory-mapped matrix read a
    slice at a time: every query in one pass, however large the gallery."""
    import faiss

    count = len(embeddings)
    truth = np.full((len(queries), k), -1, np.int64)
    best = np.full((len(queries), k), -np.inf, np.float32)
    step = slice_rows(embeddings.shape[1])
    for start in range(0, count, step):
        scores, local = faiss.knn(queries, read_rows(embeddings, np.arange(start, min(count, start + step))), k,
                                  metric=faiss.METRIC_INNER_PRODUCT)
        merged_scores, merged = np.concatenate([best, scores], 1), np.concatenate([truth, local + start], 1)
        keep = rank_by_score(merged_scores, k)
        best, truth = np.take_along_axis(merged_scores, keep, 1), np.take_along_axis(merged, keep, 1)
    return truth


def sampled_truth(vectors: np.ndarray | StackedRows, k: int, seed: int = 0) -> Truth:
    """The Truth of TUNING_QUERIES rows of `vectors` sampled with `seed`, to depth k: one pass over the matrix (3 s at
    10^6 rows of 512 dimensions), whatever k."""
    count = len(vectors)
    rows = np.sort(np.random.default_rng(seed + 1).choice(count, min(count, TUNING_QUERIES), replace=False))
    return Truth(rows, exact_top(vectors, read_rows(vectors, rows), k))


def tune(index, embeddings: np.ndarray, truth: Truth) -> tuple[int, int, float]:
    """(lists probed, candidates, recall@5): the fewest CANDIDATES, then the fewest PROBES, whose recall@5 against exact
    search (`truth`), its sampled gallery rows searched as queries are (CompressedSearch), reaches RECALL_TARGET; the
    most of both otherwise."""
    import faiss

    queries, truth = read_rows(embeddings, truth.rows), truth.top[:, :5]
    rows = np.arange(len(embeddings))
    lists = faiss.extract_index_ivf(index).nlist
    recall = 0.0
    for candidates in CANDIDATES:
        for probes in (p for p in PROBES if p <= lists):
            trial = GalleryIndex(IndexRecord("", "", probes, candidates, 0.0, 0.0), index, None, None)
            search = CompressedSearch(trial, embeddings, rows, whole=True)
            found = [search.search(query, 5)[1] for query in queries]
            recall = float(np.mean([len(np.intersect1d(f, t)) / 5 for f, t in zip(found, truth)]))
            if recall >= RECALL_TARGET:
                return probes, candidates, recall
    return min(lists, PROBES[-1]), CANDIDATES[-1], recall


def ivf_search(index, queries: np.ndarray, k: int, probes: int) -> tuple[np.ndarray, np.ndarray]:
    """(scores, ids) of an IVF index's search probing `probes` lists; the index's own nprobe is left alone, so
    threads may share it."""
    import faiss

    # faiss.contrib.torch_utils (pytorch-metric-learning imports it) replaces `search` with one taking no search
    # parameters, keeping faiss's own as `search_numpy`
    search = getattr(index, "search_numpy", index.search)
    return search(np.ascontiguousarray(queries, np.float32), k, params=faiss.SearchParametersIVF(nprobe=probes))


def knn_probes(index, vectors: np.ndarray, k: int, row_lists: np.ndarray, seed: int = 0,
               truth: Truth | None = None) -> int:
    """The fewest PROBES of knn_rows through an IVF,Flat index of `vectors` (`row_lists`: lists_of_rows of it) whose
    recall@k against exact search, on TUNING_QUERIES sampled rows (`truth` when it is deep enough, else sampled with
    `seed`), reaches RECALL_TARGET (every list when none does)."""
    import faiss

    lists = faiss.extract_index_ivf(index).nlist
    if truth is None or truth.top.shape[1] < k:
        truth = sampled_truth(vectors, k, seed)
    for probes in (p for p in PROBES if p <= lists):
        found = knn_rows(index, vectors, truth.rows, k, probes, row_lists)[1]
        if np.mean([len(np.intersect1d(f, t)) / k for f, t in zip(found, truth.top[:, :k])]) >= RECALL_TARGET:
            return probes
    return lists


def knn_rows(index, vectors: np.ndarray, rows: np.ndarray, k: int, probes: int,
             row_lists: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(similarities, ids) of the k nearest rows (themselves among them) of `vectors[rows]`, best first, through an
    IVF,Flat index of `vectors` (its ids are the rows; `row_lists`: lists_of_rows of it) probing `probes` lists (twice
    as many, again and again, for a row whose probed lists hold fewer than k: k-means leaves a few lists of a handful
    of rows, and probing every list for their rows cost more than the rest of a 30,000-row batch together)."""
    import faiss

    ivf = faiss.extract_index_ivf(index)
    if ivf.code_size != 4 * ivf.d:
        raise ValueError(f"knn_rows reads the vectors in an IVF,Flat index's lists, not codes of {ivf.code_size} bytes")
    sims, ids = np.full((len(rows), k), -np.inf, np.float32), np.full((len(rows), k), -1, np.int64)
    todo = np.arange(len(rows))
    while len(todo):
        _scan_lists(ivf, vectors, rows, todo, _probed(ivf, vectors, rows[todo], probes, row_lists), sims, ids)
        todo = todo[(ids[todo] < 0).any(axis=1)] if probes < ivf.nlist else todo[:0]
        probes = min(ivf.nlist, 2 * probes)
        sims[todo], ids[todo] = -np.inf, -1
    return sims, ids


def _probed(ivf, vectors: np.ndarray, rows: np.ndarray, probes: int, row_lists: np.ndarray) -> np.ndarray:
    """The `probes` lists nearest each of `rows` [rows, probes]: for one, the list holding it (IVF adds a row to its
    nearest centroid's list, so it needs no coarse search), else the coarse quantizer's, a slice of rows at a time."""
    if probes == 1:
        return np.asarray(row_lists)[rows][:, None].astype(np.int64)
    step = slice_rows(vectors.shape[1])
    return np.concatenate([ivf.quantizer.search(read_rows(vectors, rows[start:start + step]), probes)[1]
                           for start in range(0, len(rows), step)])


def _scan_lists(ivf, vectors: np.ndarray, rows: np.ndarray, todo: np.ndarray, probed: np.ndarray,
                sims: np.ndarray, ids: np.ndarray) -> None:
    """Merge into (sims, ids)[todo] the k best of the lists `probed` for each of rows[todo]. Each list is read in place
    and scanned once for all the rows probing it, as one product (faiss.knn): faiss's IVF search scans a list once
    per row and searches every row's centroids (at 10^6 rows 1.5x slower for 116,000 rows, 1.8x for 50). The rows
    are gathered a slice at a time, in the order of their lists."""
    import faiss

    who, lists = np.repeat(todo, probed.shape[1]), probed.reshape(-1)
    order = np.argsort(lists, kind="stable")
    who, lists = who[order[lists[order] >= 0]], lists[order[lists[order] >= 0]]
    step, k = slice_rows(vectors.shape[1]), ids.shape[1]
    for start in range(0, len(who), step):
        part, part_lists = who[start:start + step], lists[start:start + step]
        queries = read_rows(vectors, rows[part])
        bounds = np.flatnonzero(np.diff(part_lists, prepend=-1, append=-1))
        for first, end in zip(bounds[:-1], bounds[1:]):
            number = int(part_lists[first])
            size = ivf.invlists.list_size(number)
            if size == 0:
                continue
            stored = faiss.rev_swig_ptr(ivf.invlists.get_codes(number), size * ivf.code_size)
            found_sims, found = faiss.knn(queries[first:end], stored.view(np.float32).reshape(size, ivf.d),
                                          min(k, size), metric=faiss.METRIC_INNER_PRODUCT)
            at = part[first:end]
            merged_sims = np.concatenate([sims[at], found_sims], axis=1)
            merged = np.concatenate([ids[at], faiss.rev_swig_ptr(ivf.invlists.get_ids(number), size)[found]], axis=1)
            best = rank_by_score(merged_sims, k)
            sims[at], ids[at] = np.take_along_axis(merged_sims, best, 1), np.take_along_axis(merged, best, 1)


def make_gallery_index(embeddings: np.ndarray | StackedRows, kind: str, memory: int) -> GalleryIndex | None:
    """The gallery index `kind` resolves to for `embeddings` (rows read a slice at a time) under `memory`, made and
    tuned in memory (its record's bytes_per_row is measured when saved); None when exact search is the choice. Made
    before `auto` is validated, so the validation searches through it as queries will, and saved with the
    generation's rows."""
    import faiss

    key = factory_key(kind, *embeddings.shape, memory)
    if key is None:
        return None
    index = make_index(embeddings, key)
    truth = sampled_truth(embeddings, TRUTH_DEPTH)
    nprobe, candidates, recall = tune(index, embeddings, truth)
    record = IndexRecord("ivf" if key.endswith(",Flat") else "ivfpq", key, nprobe, candidates, round(recall, 4), 0.0)
    ivf = faiss.extract_index_ivf(index)
    return GalleryIndex(record, index, lists_of_rows(index), ivf.quantizer.reconstruct_n(0, ivf.nlist), truth)


def save_gallery_index(generation: Path, gallery: GalleryIndex) -> IndexRecord:
    """Save a made gallery index beside a published generation's rows (index.faiss and its lists, then index.json,
    each atomically: a generation without index.json searches exactly); its record, with the bytes a row takes."""
    write_index(generation / INDEX_FILE, gallery.index)
    atomic_write(generation / LISTS_FILE, lambda tmp: tmp.write_bytes(_npy_bytes(gallery.row_lists)))
    record = replace(gallery.record, bytes_per_row=round((generation / INDEX_FILE).stat().st_size
                                                         / gallery.index.ntotal, 1))
    write_text_atomic(generation / RECORD_FILE, json.dumps(asdict(record)))
    return record


def renumber(index, order: np.ndarray) -> None:
    """An IVF index made in memory, renumbered in place for its rows stored in `order` (stored row i is row order[i]
    of those it was made of): every list's ids rewritten. A build makes its indexes for the rows as merged (`auto`
    validates through the gallery index) and publishes the rows grouped by bucket."""
    import faiss

    stored_as = np.empty(len(order), np.int64)
    stored_as[order] = np.arange(len(order))
    lists = faiss.extract_index_ivf(index).invlists
    for number in range(lists.nlist):
        size = lists.list_size(number)
        if size:
            ids = faiss.rev_swig_ptr(lists.get_ids(number), size)
            ids[:] = stored_as[ids]


def ivf_file(bucket: str, white: bool) -> str:
    """The file name of a generation's IVF index of one bucket ('flat': the whole gallery) of its stored or
    (`white`) whitened rows, beside its embeddings: made by the first search needing it, or by the build."""
    return f"ivf-{bucket}{'-white' if white else ''}.faiss"


def write_index(path: Path, index) -> None:
    """A faiss index saved atomically (a crash leaves the old file or none, never half of one)."""
    import faiss

    atomic_write(path, lambda tmp: faiss.write_index(index, str(tmp)))


def build_gallery_index(generation: Path, embeddings: np.ndarray, kind: str, memory: int) -> IndexRecord | None:
    """Choose, make, tune and save the index of a published generation; None when exact search is the choice."""
    gallery = make_gallery_index(embeddings, kind, memory)
    return save_gallery_index(generation, gallery) if gallery else None


def _npy_bytes(array: np.ndarray) -> bytes:
    """`array` as the bytes of a .npy file."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def open_gallery_index(generation: Path | None, rows: int, dim: int) -> GalleryIndex | None:
    """The GalleryIndex of a generation that has one (the index and its row lists memory-mapped), else None. A record
    or index that is not the one build-cache writes for these `rows` of `dim` (damaged, or planted) is refused with
    one line."""
    if generation is None or not (generation / RECORD_FILE).is_file():
        return None
    import faiss

    try:
        record = IndexRecord(**json.loads((generation / RECORD_FILE).read_text()))
        index = faiss.read_index(str(generation / INDEX_FILE), faiss.IO_FLAG_MMAP_IFC)
        problem = _mismatch(record, index, rows, dim)
        row_lists = np.load(generation / LISTS_FILE, mmap_mode="r", allow_pickle=False) if problem is None else None
        if row_lists is not None and (row_lists.shape != (rows,) or row_lists.dtype.kind not in "iu"):
            problem = f"{LISTS_FILE} is {row_lists.dtype} {row_lists.shape}, not one list number per row"
    except (OSError, ValueError, TypeError, RuntimeError) as err:
        problem = f"it cannot be read ({type(err).__name__})"
    if problem:
        raise UserError(f"{generation}: its index: {problem}; rebuild the cache with build-cache --rebuild")
    ivf = faiss.extract_index_ivf(index)
    return GalleryIndex(record, index, row_lists, ivf.quantizer.reconstruct_n(0, ivf.nlist))


def _mismatch(record: IndexRecord, index, rows: int, dim: int) -> str | None:
    """What makes `record` and `index` unusable for a gallery of `rows` vectors of `dim`; None when nothing."""
    import faiss

    if record.kind not in ("ivf", "ivfpq") or not all(type(v) is int and 1 <= v <= 1 << 20
                                                       for v in (record.nprobe, record.candidates)):
        return f"its record is not one build-cache writes ({record.kind!r}, nprobe {record.nprobe!r}, " \
               f"candidates {record.candidates!r})"
    if index.ntotal != rows or index.d != dim or faiss.try_extract_index_ivf(index) is None:
        return f"it holds {index.ntotal:,} vectors of {index.d} dimensions, the cache {rows:,} of {dim}"
    return None

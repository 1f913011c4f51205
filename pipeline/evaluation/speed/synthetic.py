"""Search alone on synthetic caches (10^4..10^6 clustered unit vectors in 1,000 buckets), each size written by one
process and measured by fresh ones; and the peak memory of an incremental build adding rows to such a cache."""
from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from lookalike.models.outputs import unit_rows
from lookalike.pipeline.evaluation.speed.children import run_child
from lookalike.pipeline.evaluation.speed.measure import percentile

SYNTHETIC_DIM = 512
SYNTHETIC_BUCKETS = 1000


def synthetic(count: int, seed: int = 0, dim: int = SYNTHETIC_DIM, buckets: int = SYNTHETIC_BUCKETS,
              noise: float = 1.2, into: np.ndarray | None = None):
    """(vectors, classes[count, 3], query sampler): clustered unit vectors, bucket centres in 50 groups, rows in
    bucket order (as a cache stores them).

    Each vector is its bucket centre plus Gaussian noise (cosine to the centre ~0.64); bucket centres
    scatter around 50 group centres, so neighbouring buckets overlap as similar classes do. Classes are
    the bucket and its two nearest buckets (a classifier's usual confusions). The vectors are written into `into`
    when given (a float16 memory map: 10^7 rows on disk, not in RAM), 100,000 rows at a time.
    """
    rng = np.random.default_rng(seed)
    groups = unit_rows(rng.standard_normal((50, dim), dtype=np.float32))
    group_of = rng.integers(0, 50, buckets)
    centres = unit_rows(groups[group_of] + 0.8 * unit_rows(rng.standard_normal((buckets, dim), dtype=np.float32)))
    near = np.argsort(-(centres @ centres.T), axis=1)[:, :3]  # itself first
    own = np.sort(rng.integers(0, buckets, count))
    vectors = np.empty((count, dim), np.float32) if into is None else into
    for start in range(0, count, 100_000):
        part = slice(start, min(count, start + 100_000))
        noise_part = rng.standard_normal((len(own[part]), dim), dtype=np.float32) * (noise / np.sqrt(dim))
        vectors[part] = unit_rows(centres[own[part]] + noise_part)

    def queries(n: int, query_seed: int = 1):
        qrng = np.random.default_rng(query_seed)
        chosen = qrng.integers(0, buckets, n)
        q = unit_rows(centres[chosen] + qrng.standard_normal((n, dim), dtype=np.float32) * (noise / np.sqrt(dim)))
        return q, near[chosen].astype(np.int32)

    return vectors, near[own].astype(np.int32), queries


def make_synthetic_cache(folder: Path, count: int, dim: int = SYNTHETIC_DIM, buckets: int = SYNTHETIC_BUCKETS,
                         vector_dtype: type = np.float32) -> None:
    """A real cache generation (written by cache.generations) holding `count` synthetic rows, its vectors stored as
    `vector_dtype`. They are made in a memory-mapped file of that dtype beside the cache, so a float16 cache of 10^7
    rows needs 10 GB of disk twice and little RAM."""
    from lookalike.cache.generations import write_generation
    from lookalike.cache.manifest import Manifest

    folder.mkdir(parents=True, exist_ok=True)
    source = folder / "synthetic-vectors.npy"
    into = np.lib.format.open_memmap(source, "w+", np.dtype(vector_dtype), (count, dim))
    _, classes, _ = synthetic(count, dim=dim, buckets=buckets, into=into)
    columns = {
        "paths": np.char.add("img", np.arange(count).astype(str)), "sizes": np.zeros(count, np.int64),
        "mtimes": np.zeros(count, np.int64), "labels": classes[:, 0].astype(str),
        "label_classes": np.full(count, -1, np.int32), "classes": classes,
        "probs": np.tile(np.array([0.8, 0.15, 0.05], np.float32), (count, 1)),
        "boxes": np.full((count, 4), np.nan, np.float32), "embeddings": into,
    }
    try:
        write_generation(folder, Manifest(fingerprint={}, config={}, gallery_root=str(folder), count=count, dim=dim),
                         columns, vector_dtype)
    finally:
        del into, columns
        source.unlink()


def _memory() -> dict:
    """This process's resident memory in MiB: anonymous (its own) and file-backed (mapped pages)."""
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
            fields[key] = int(value.split()[0]) / 1024
    return fields


def search_benchmark(folder: Path, bucket_queries: int = 200, flat_queries: int = 50,
                     recall_queries: int = 100) -> dict:
    """Latency per query of top1, topk:3 and flat on a synthetic cache, memory, and IVF recall@5."""
    import faiss  # noqa: F401  (its libraries are mapped before the baseline, as torch's are in a query process)

    from lookalike.cache.policies import parse_policy
    from lookalike.cache.search import EXACT_MAX_ROWS, WHOLE_GALLERY, ExactIndex, Searcher
    from lookalike.cache.store import load_cache

    before = _memory()
    data = load_cache(folder)
    count = len(data)
    _, _, sample_queries = synthetic(0)
    queries, classes = sample_queries(max(bucket_queries, flat_queries, recall_queries))
    probs = np.array([0.8, 0.15, 0.05], np.float32)
    searcher = Searcher(data)
    out = {"items": count, "dim": SYNTHETIC_DIM, "buckets": SYNTHETIC_BUCKETS,
           "matrix_mib": count * SYNTHETIC_DIM * 4 / 2**20, "exact_max_rows": EXACT_MAX_ROWS}

    def timed(policy: str, n: int) -> dict:
        parsed = parse_policy(policy)
        searcher.search(queries[0], parsed, 5, classes[0], probs)  # builds or loads what it needs
        latencies = []
        for i in range(n):
            t = time.perf_counter()
            searcher.search(queries[i], parsed, 5, classes[i], probs)
            latencies.append((time.perf_counter() - t) * 1000)
        memory = _memory()
        return {"ms_p50": percentile(latencies, 50), "ms_p95": percentile(latencies, 95), "queries": n,
                "rss_anon_mib": memory["RssAnon"] - before["RssAnon"], "rss_file_mib": memory["RssFile"] - before["RssFile"]}

    parsed = parse_policy("top1")
    searcher.search(queries[0], parsed, 5, classes[0], probs)
    memory = _memory()
    out["one_query"] = {"rss_anon_mib": memory["RssAnon"] - before["RssAnon"],
                        "rss_file_mib": memory["RssFile"] - before["RssFile"]}
    out["top1"] = timed("top1", bucket_queries)
    out["topk:3"] = timed("topk:3", bucket_queries)
    t = time.perf_counter()
    searcher.search(queries[0], parse_policy("flat"), 5)
    out["flat_first_query_s"] = time.perf_counter() - t  # builds and saves the IVF index above EXACT_MAX_ROWS
    out["flat"] = timed("flat", flat_queries)
    exact = ExactIndex(np.arange(count), data.columns["embeddings"])
    started = time.perf_counter()
    truth = [exact.search(queries[i], 5)[1] for i in range(recall_queries)]
    out["flat_exact_ms"] = (time.perf_counter() - started) * 1000 / recall_queries
    index = searcher.index(WHOLE_GALLERY, 1)
    out["flat_index"] = type(index).__name__
    if hasattr(index, "index"):
        out["ivf"] = _ivf_sweep(index, queries[:recall_queries], truth, searcher.nprobe)
    out["peak_rss_mib"] = _memory()["VmHWM"]
    return out


def _ivf_sweep(index, queries: np.ndarray, truth: list[np.ndarray], nprobe: int) -> dict:
    """An IVF index's recall@5 against the exact top 5 (`truth`) and its ms per query, for nprobe 1 to 64; the index
    is left at `nprobe`, whose recall is the headline figure."""
    sweep = {}
    for probes in (1, 2, 4, 8, 16, 32, 64):
        index.index.nprobe = probes
        t = time.perf_counter()
        found = [index.search(query, 5)[1] for query in queries]
        ms = (time.perf_counter() - t) * 1000 / len(queries)
        recall = float(np.mean([len(set(f.tolist()) & set(g.tolist())) / 5 for f, g in zip(found, truth)]))
        sweep[probes] = {"recall_at_5": recall, "ms": ms}
    index.index.nprobe = nprobe
    return {"nlist": int(index.index.nlist), "nprobe": nprobe, "sweep": sweep, "recall_at_5": sweep[nprobe]["recall_at_5"]}


def incremental_publish_benchmark(folder: Path, added: int = 100) -> dict:
    """Peak memory of an incremental build adding `added` rows to the synthetic cache in `folder`: the same merge,
    `auto` choice and publish as build-cache (the new rows arrive as a pending chunk, as embedded images do)."""
    from lookalike.cache.store import load_cache
    from lookalike.pipeline.build import merge_rows
    from lookalike.pipeline.gallery import GalleryEntry

    before = _memory()
    previous = load_cache(folder)
    count, dim = len(previous), previous.manifest.dim
    vectors, classes, _ = synthetic(added, seed=1)
    chunk = {name: np.asarray(previous.columns[name][:added]).copy() for name in previous.columns}
    chunk.update(paths=np.char.add("new", np.arange(added).astype(str)), embeddings=vectors, classes=classes)
    entries = [GalleryEntry(p, None) for p in previous.columns["paths"].tolist() + chunk["paths"].tolist()]
    started = time.perf_counter()
    columns, rows = merge_rows(previous, [chunk], entries)
    from lookalike.cache.autopolicy import choose_policy
    from lookalike.cache.generations import write_generation

    choose_policy(columns)
    write_generation(folder, replace(previous.manifest, count=rows), columns)
    matrix_mib = count * dim * 4 / 2**20
    peak = _memory()["VmHWM"] - before["VmRSS"]
    return {"rows": count, "added": added, "seconds": time.perf_counter() - started, "matrix_mib": matrix_mib,
            "peak_rss_above_start_mib": peak, "peak_vs_matrix": peak / matrix_mib}


def search_sizes_benchmark(sizes: list[int], workdir: Path) -> dict:
    """Each size written by one process and searched by a fresh one (clean memory figures)."""
    results = {}
    for count in sizes:
        folder = workdir / f"synthetic-{count}"
        run_child("make-synthetic", folder=str(folder), count=count)
        results[str(count)] = run_child("search", folder=str(folder))
        results[str(count)]["incremental_publish"] = run_child("incremental-publish", folder=str(folder))
    return results

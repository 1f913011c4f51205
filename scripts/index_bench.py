"""The gallery index at scale (issue 22): on N synthetic clustered rows of 512 dimensions (the speed figures'
generator, 1,000 buckets), build-cache's index choice under a memory budget, the time to make and tune it, its
bytes per row, and one query's latency (p50/p95) and recall@5 against exact search under flat and topk:3.
Prints a Markdown table."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

from lookalike.cache.indexes import IndexRecord, build_gallery_index, exact_top, parse_index
from lookalike.cache.policies import parse_policy
from lookalike.cache.search import Searcher
from lookalike.cache.store import load_cache
from lookalike.pipeline.evaluation.speed.synthetic import make_synthetic_cache, synthetic

QUERIES = 200
PROBS = np.array([0.8, 0.15, 0.05], np.float32)  # the query's class probabilities (its three classes)


def measure(searcher: Searcher, policy: str, queries: np.ndarray, classes: np.ndarray,
            truth: list[np.ndarray]) -> dict:
    """p50/p95 ms of one query and its recall@5 against `truth` (the exact top 5 of each query), under `policy`."""
    parsed = parse_policy(policy)
    took, recall = [], []
    for query, query_classes, exact in zip(queries, classes, truth):
        started = time.perf_counter()
        found = searcher.search(query, parsed, 5, query_classes, PROBS)
        took.append(time.perf_counter() - started)
        recall.append(len(np.intersect1d(found.rows, exact)) / max(1, len(exact)))
    ms = np.asarray(took) * 1000
    return {"p50": np.percentile(ms, 50), "p95": np.percentile(ms, 95), "recall": float(np.mean(recall))}


def exact_answers(data, queries: np.ndarray, classes: np.ndarray) -> dict[str, np.ndarray]:
    """The exact top 5 of each query under flat (one pass over the whole matrix for every query) and topk:3 (an
    exact scan of the query's buckets)."""
    exact = Searcher(data)
    exact.gallery_index = None
    bucketed = parse_policy("topk:3")
    return {"flat": exact_top(data.columns["embeddings"], queries, 5),
            "topk:3": np.stack([exact.search(q, bucketed, 5, c, PROBS).rows for q, c in zip(queries, classes)])}


def resident_mib() -> dict[str, float]:
    """This process's resident memory (MiB): anonymous, and mapped from files (the index, rows read)."""
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return {key: int(fields[key].split()[0]) / 1024 for key in ("RssAnon", "RssFile")}


def prepare(folder: Path, rows: int, float16: bool, kind: str, memory: int) -> dict:
    """Make the synthetic cache in `folder`, its gallery index and the exact answers (exact.npz); the seconds the
    cache and the index took, and the index's record."""
    cache = folder / "cache"
    started = time.perf_counter()
    make_synthetic_cache(cache, rows, vector_dtype=np.float16 if float16 else np.float32)
    made = time.perf_counter() - started
    data = load_cache(cache)
    started = time.perf_counter()
    record = build_gallery_index(data.generation, data.columns["embeddings"], kind, memory)
    built = time.perf_counter() - started
    queries, classes = synthetic(1)[2](QUERIES)  # the sampler depends on the seed only
    np.savez(folder / "exact.npz", **exact_answers(data, queries, classes))
    return {"made": made, "built": built, "record": asdict(record) if record else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--index", default="auto", help="auto, exact, ivf or ivfpq[:MEMORY]")
    parser.add_argument("--index-memory", default="4GB")
    parser.add_argument("--float16", action="store_true", help="store the vectors as float16 (build-cache --float16)")
    parser.add_argument("--workdir", type=Path, default=None, help="where the synthetic cache is written (a temporary "
                        "folder by default; 10^7 float16 rows need 20 GB while it is made)")
    parser.add_argument("--keep", action="store_true", help="keep the cache (and its index and exact answers) in "
                        "--workdir and measure an earlier one again instead of making it")
    args = parser.parse_args()
    if args.keep and args.workdir is None:
        parser.error("--keep needs --workdir")
    kind, memory = parse_index(args.index, args.index_memory)
    kept = args.workdir / f"synthetic-{args.rows}-{'float16' if args.float16 else 'float32'}-{args.index}" \
        if args.keep else None
    with contextlib.nullcontext(kept) if kept else tempfile.TemporaryDirectory(dir=args.workdir) as folder:
        prepared = Path(folder) / "prepared.json"
        if not prepared.is_file():
            prepared.write_text(json.dumps(prepare(Path(folder), args.rows, args.float16, kind, memory)))
        made, built, record = json.loads(prepared.read_text()).values()
        record = IndexRecord(**record) if record else None
        figures = {policy: json.loads(subprocess.run(
            [sys.executable, __file__, "--measure", str(Path(folder) / "cache"), policy,
             str(Path(folder) / "exact.npz")], check=True, capture_output=True, text=True).stdout)
            for policy in ("flat", "topk:3")}
    stored = 2 if args.float16 else 4
    matrix_mib = args.rows * 512 * stored / 2**20
    index = (f"{record.key}, nprobe {record.nprobe}, {record.candidates} candidates, tuned recall@5 "
             f"{record.recall_at_5:.3f}, "
             f"{record.bytes_per_row:.1f} B/row = {record.bytes_per_row * args.rows / 2**20:,.0f} MiB"
             if record else "exact (no index)")
    print("| rows | index | make + tune | " + " | ".join(f"{p} p50 / p95 ms, recall@5" for p in figures) + " | "
          "query process RSS (anon + file) |")
    print("|---|---|---|" + "---|" * (len(figures) + 1))
    rss = max(figures.values(), key=lambda f: f["rss"]["RssAnon"] + f["rss"]["RssFile"])["rss"]
    print(f"| {args.rows:,} ({matrix_mib:,.0f} MiB {'float16' if args.float16 else 'float32'}) | {index} | "
          f"{built:.0f} s | " + " | ".join(f"{f['p50']:.2f} / {f['p95']:.2f}, {f['recall']:.3f}"
                                          for f in figures.values())
          + f" | {rss['RssAnon']:,.0f} + {rss['RssFile']:,.0f} MiB |")
    print(f"\n`python scripts/index_bench.py {' '.join(sys.argv[1:])}` — synthetic cache written in {made:.0f} s; "
          f"{QUERIES} queries; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


def measure_in_this_process(cache: Path, policy: str, answers: Path) -> None:
    """One policy's figures from a fresh process (its memory is the query's, not the build's), printed as JSON."""
    searcher = Searcher(load_cache(cache))
    queries, classes = synthetic(1)[2](QUERIES)
    truth = np.load(answers)[policy]
    searcher.search(queries[0], parse_policy(policy), 5, classes[0], PROBS)  # warm: maps its files
    figures = measure(searcher, policy, queries, classes, truth)
    figures["rss"] = resident_mib()
    print(json.dumps(figures))


if __name__ == "__main__":
    if sys.argv[1:2] == ["--measure"]:
        measure_in_this_process(Path(sys.argv[2]), sys.argv[3], Path(sys.argv[4]))
    else:
        main()

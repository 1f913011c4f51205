"""The gallery index at scale (issue 22): on N synthetic clustered rows of 512 dimensions (the speed figures'
generator, 1,000 buckets), build-cache's index choice under a memory budget, the time to make and tune it, its
bytes per row, and one query's latency (p50/p95) and recall@5 against exact search under flat and topk:3.
Prints a Markdown table."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from lookalike.cache.indexes import build_gallery_index, parse_index
from lookalike.cache.policies import parse_policy
from lookalike.cache.search import Searcher
from lookalike.cache.store import load_cache
from lookalike.pipeline.evaluation.speed.synthetic import make_synthetic_cache, synthetic

QUERIES = 200


def measure(searcher: Searcher, exact: Searcher, policy: str, queries: np.ndarray, classes: np.ndarray) -> dict:
    """p50/p95 ms of one query and recall@5 against exact search, under `policy`."""
    parsed = parse_policy(policy)
    probs = np.array([0.8, 0.15, 0.05], np.float32)
    took, recall = [], []
    for query, query_classes in zip(queries, classes):
        started = time.perf_counter()
        found = searcher.search(query, parsed, 5, query_classes, probs)
        took.append(time.perf_counter() - started)
        truth = exact.search(query, parsed, 5, query_classes, probs)
        recall.append(len(np.intersect1d(found.rows, truth.rows)) / max(1, len(truth.rows)))
    ms = np.asarray(took) * 1000
    return {"p50": np.percentile(ms, 50), "p95": np.percentile(ms, 95), "recall": float(np.mean(recall))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--index", default="auto", help="auto, exact, ivf or ivfpq[:MEMORY]")
    parser.add_argument("--index-memory", default="4GB")
    args = parser.parse_args()
    kind, memory = parse_index(args.index, args.index_memory)
    with tempfile.TemporaryDirectory() as folder:
        cache = Path(folder) / "cache"
        started = time.perf_counter()
        make_synthetic_cache(cache, args.rows)
        made = time.perf_counter() - started
        data = load_cache(cache)
        started = time.perf_counter()
        record = build_gallery_index(data.generation, data.columns["embeddings"], kind, memory)
        built = time.perf_counter() - started
        indexed, exact = Searcher(load_cache(cache)), Searcher(data)
        exact.gallery_index = None
        queries, classes = synthetic(1)[2](QUERIES)  # the sampler depends on the seed only
        for policy in ("flat", "topk:3"):  # warm: the first query of each maps its files
            indexed.search(queries[0], parse_policy(policy), 5, classes[0], np.array([0.8, 0.15, 0.05], np.float32))
        figures = {policy: measure(indexed, exact, policy, queries, classes) for policy in ("flat", "topk:3")}
    matrix_mib = args.rows * 512 * 4 / 2**20
    index = (f"{record.key}, nprobe {record.nprobe}, {record.candidates} candidates, tuned recall@5 "
             f"{record.recall_at_5:.3f}, "
             f"{record.bytes_per_row:.1f} B/row = {record.bytes_per_row * args.rows / 2**20:,.0f} MiB"
             if record else "exact (no index)")
    print("| rows | index | make + tune | " + " | ".join(f"{p} p50 / p95 ms, recall@5" for p in figures) + " |")
    print("|---|---|---|" + "---|" * len(figures))
    print(f"| {args.rows:,} ({matrix_mib:,.0f} MiB float32) | {index} | {built:.0f} s | "
          + " | ".join(f"{f['p50']:.2f} / {f['p95']:.2f}, {f['recall']:.3f}" for f in figures.values()) + " |")
    print(f"\n`python scripts/index_bench.py {' '.join(sys.argv[1:])}` — synthetic cache written in {made:.0f} s; "
          f"{QUERIES} queries; load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()

"""Re-ranking at scale (issue 23): on N synthetic labelled rows (the speed figures' clustered generator, labels = the
bucket), what `auto` costs above exact_max_rows, in build-cache's order: the gallery index (--index auto), `auto`'s
validation through the search path and that index (choose_policy), the DBA of its choice from the approximate k-NN
graph through the index, and one re-ranked query's latency through the cache's own search. Prints a Markdown
table."""
from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

from lookalike.cache import rerank
from lookalike.cache.autopolicy import choose_policy
from lookalike.cache.columns import DBA_COLUMN
from lookalike.cache.indexes import DEFAULT_MEMORY, make_gallery_index, parse_memory
from lookalike.cache.policies import parse_policy
from lookalike.cache.search import Searcher
from lookalike.cache.store import CacheData
from lookalike.pipeline.evaluation.speed.synthetic import synthetic

QUERIES = 100
PROBS = np.array([0.8, 0.15, 0.05], np.float32)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--policy", default="flat+dba:20@3+qe:10", help="the re-ranked policy whose query is timed")
    args = parser.parse_args()
    vectors, classes, sample_queries = synthetic(args.rows)
    count = len(vectors)
    columns = {"paths": np.char.add("img", np.arange(count).astype(str)), "labels": classes[:, 0].astype(str),
               "classes": classes, "probs": np.tile(PROBS, (count, 1)), "embeddings": vectors,
               "sizes": np.zeros(count, np.int64), "mtimes": np.zeros(count, np.int64),
               "label_classes": np.full(count, -1, np.int32), "boxes": np.full((count, 4), np.nan, np.float32)}
    started = time.perf_counter()
    gallery_index = make_gallery_index(vectors, "auto", parse_memory(DEFAULT_MEMORY))
    index_seconds = time.perf_counter() - started
    started = time.perf_counter()
    chosen = choose_policy(columns, gallery_index=gallery_index)
    validation = time.perf_counter() - started
    timed = parse_policy(args.policy)
    started = time.perf_counter()
    columns[DBA_COLUMN] = rerank.dba(vectors, *timed.dba, index=gallery_index.flat_index if gallery_index else None,
                                     truth=gallery_index.truth if gallery_index else None)
    dba_seconds = time.perf_counter() - started
    searcher = Searcher(CacheData.in_memory(columns, dba=list(timed.dba)), gallery_index=gallery_index)
    queries, query_classes = sample_queries(QUERIES)
    searcher.search(queries[0], timed, 5, query_classes[0], PROBS)  # below --index auto's size: makes an IVF index
    took = []
    for query, own in zip(queries, query_classes):
        started = time.perf_counter()
        searcher.search(query, timed, 5, own, PROBS)
        took.append((time.perf_counter() - started) * 1000)
    key = gallery_index.record.key if gallery_index else "none (exact)"
    print("| rows | gallery index | auto's choice | auto validation | DBA of "
          + args.policy.split("+qe")[0].split("+", 1)[1] + " (approximate graph) | " + args.policy + " p50 / p95 ms |")
    print("|---|---|---|---|---|---|")
    print(f"| {count:,} | {key}: {index_seconds:.0f} s | {chosen} | {validation:.0f} s | {dba_seconds:.0f} s | "
          f"{np.percentile(took, 50):.1f} / {np.percentile(took, 95):.1f} |")
    print(f"\n`python scripts/auto_scale.py {' '.join(sys.argv[1:])}`; {QUERIES} queries; load average "
          f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()

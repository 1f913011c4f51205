"""Re-ranking cost (issue 11): ms per query of flat search, DBA+aQE and k-reciprocal on the benchmark's split of a
stored gallery, and seconds per leave-one-out evaluation of a few methods. Run with single-threaded BLAS
(OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1): numpy's threaded small products stall on a busy machine.

  OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 python scripts/rerank_timing.py --data ../shared/data/caltech101-22.zip \
      --cache runs/cache-cal [--loo]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from rerank_study import Method, Setting, per_query_ms, select_rows

from lookalike.cache.autopolicy import choose_policy, validation_split
from lookalike.cache.store import load_cache
from lookalike.pipeline.datasets import load_labelled, split_queries

TIMED = (Method(), Method(20, 3.0, 10, 1.0), Method(k1=5, k2=2), Method(k1=20, k2=6))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--cache", required=True)
    parser.add_argument("--loo", action="store_true", help="also time leave-one-out evaluations")
    args = parser.parse_args()
    gallery_set, query_set = split_queries(load_labelled(args.data), 0.2, 0)
    columns = load_cache(args.cache, mmap=False).columns
    row_of = {str(p): i for i, p in enumerate(columns["paths"])}
    gallery = select_rows(columns, np.array([row_of[p] for p in gallery_set.paths]))
    queries = select_rows(columns, np.array([row_of[p] for p in query_set.paths]))
    test = Setting(gallery, queries, choose_policy(gallery, 0, rerank=False), None)
    for method in TIMED:
        vectors = test.dba(method.dba_k, method.dba_alpha).augmented
        print(f"{method}: {per_query_ms(vectors, test.q, method):.3f} ms per query")
    if args.loo:
        _, rows = validation_split(gallery["labels"], 0)
        loo = Setting(gallery, select_rows(gallery, rows), test.policy, rows)
        for method in (*TIMED, Method(20, 3.0, 10, 1.0, classes="term")):
            started = time.perf_counter()
            score = loo.score(method)
            print(f"{method}: leave-one-out over {len(rows)} queries in {time.perf_counter() - started:.1f} s "
                  f"(MAP@R {score.map_at_r:.3f})")


if __name__ == "__main__":
    main()

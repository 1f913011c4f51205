"""Milvus Lite at N synthetic rows (the speed figures' clustered 512-d generator, 1,000 buckets): the export's time
and the p50 / p95 of one query under flat, top1 and topk:3, beside the local faiss search of the same rows (held in
memory; above 32,768 rows its flat search is the IVF index, Milvus's the FLAT one).

    python scripts/milvus_bench.py [--rows 100000] [--queries 100]

Milvus Lite is the tests' correctness backend, not a fast embedded one: the figures say what it costs.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import click
import numpy as np

from lookalike.cache.milvus import MilvusTarget, export
from lookalike.cache.milvus_search import MilvusSearcher
from lookalike.cache.policies import parse_policy
from lookalike.cache.search import Searcher
from lookalike.cache.store import CacheData
from lookalike.pipeline.evaluation.speed.measure import percentile
from lookalike.pipeline.evaluation.speed.synthetic import synthetic

POLICIES = ("flat", "top1", "topk:3")


def latencies_ms(searcher: Searcher, policy: str, queries, classes) -> dict:
    parsed = parse_policy(policy)
    searcher.search(queries[0], parsed, 5, classes[0])  # warm: indexes loaded, collection loaded
    took = []
    for query, query_classes in zip(queries, classes):
        start = time.perf_counter()
        searcher.search(query, parsed, 5, query_classes)
        took.append((time.perf_counter() - start) * 1000)
    return {"p50_ms": round(percentile(took, 50), 2), "p95_ms": round(percentile(took, 95), 2)}


@click.command()
@click.option("--rows", default=100_000, show_default=True)
@click.option("--queries", "count", default=100, show_default=True)
def main(rows: int, count: int) -> None:
    vectors, classes, sample_queries = synthetic(rows)
    # In memory: the columns a search and an export read (a cache written to disk is the speed figures' job)
    data = CacheData.in_memory({"paths": np.char.add("img", np.arange(rows).astype(str)),
                                "labels": classes[:, 0].astype(str), "label_classes": np.full(rows, -1, np.int32),
                                "classes": classes, "embeddings": vectors})
    with tempfile.TemporaryDirectory() as folder:
        target = MilvusTarget(str(Path(folder) / "rows.db"))
        start = time.perf_counter()
        export(data, target)
        exported_s = time.perf_counter() - start
        queries, query_classes = sample_queries(count)
        local, milvus = Searcher(data), MilvusSearcher(data, target)
        figures = {"rows": rows, "dim": data.manifest.dim, "queries": count, "export_s": round(exported_s, 1),
                   "faiss": {policy: latencies_ms(local, policy, queries, query_classes) for policy in POLICIES},
                   "milvus_lite": {policy: latencies_ms(milvus, policy, queries, query_classes) for policy in POLICIES}}
    click.echo(json.dumps(figures, indent=1))


if __name__ == "__main__":
    main()

"""`python -m lookalike.pipeline.evaluation.speed TASK JSON_ARGUMENTS`: one measurement in a fresh process (children.py)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from lookalike.pipeline.evaluation.speed.measure import naive_build, warm_queries
from lookalike.pipeline.evaluation.speed.synthetic import incremental_publish_benchmark, make_synthetic_cache, search_benchmark

TASKS = {
    "naive-build": lambda config, root, paths: naive_build(config, Path(root), paths),
    "warm-queries": lambda cache, paths, overrides: warm_queries(Path(cache), paths, overrides),
    "make-synthetic": lambda folder, count: make_synthetic_cache(Path(folder), count) or {},
    "search": lambda folder: search_benchmark(Path(folder)),
    "incremental-publish": lambda folder: incremental_publish_benchmark(Path(folder)),
}

if __name__ == "__main__":
    task, arguments = sys.argv[1], json.loads(sys.argv[2])
    print(json.dumps(TASKS[task](**arguments)))

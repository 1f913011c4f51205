"""Measurements that need a fresh process (clean memory figures, no thread pools or page cache left by a build)
run as `python -m lookalike.pipeline.evaluation.speed TASK JSON_ARGUMENTS`: a module entry with named tasks, no source strings."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def run_child(task: str, timeout: float = 1800, **arguments) -> dict | list:
    """Run one task of __main__.TASKS in a new Python process; its result is the last line it prints (JSON)."""
    result = subprocess.run([sys.executable, "-m", "lookalike.pipeline.evaluation.speed", task, json.dumps(arguments)],
                            capture_output=True, text=True, cwd=ROOT, timeout=timeout,
                            env=dict(os.environ, HF_HUB_OFFLINE="1"))
    if result.returncode != 0:
        raise RuntimeError(f"speed: the {task} process failed: {result.stderr.strip().splitlines()[-1:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])

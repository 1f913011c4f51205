"""Ctrl-C stops a build once and saves what was finished; a burst of further Ctrl-Cs while it saves is held, never
a traceback, an abort or a save cut short."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import SHAPES, TINY_CLASSIFIER, TINY_EMBEDDER, draw_shape

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def big_gallery(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("burst") / "gallery"
    for index, (label, (colour, shape)) in enumerate(SHAPES.items()):
        for i in range(150):
            draw_shape(root / label / f"{i}.png", colour, shape, seed=1000 * index + i, size=160)
    return root


def build_command(gallery: Path, out: Path) -> list[str]:
    return [sys.executable, str(ROOT / "cli.py"), "build-cache", "--gallery", str(gallery), "--out", str(out),
            "--classifier", TINY_CLASSIFIER, "--embedder", TINY_EMBEDDER, "--device", "cpu", "--runtime", "torch",
            "--batch-size", "8"]


@pytest.mark.parametrize("gap", [0.0, 0.02, 0.08])
def test_a_burst_of_ctrl_c_saves_the_finished_work_without_a_traceback(big_gallery, tmp_path, gap):
    out, log = tmp_path / "cache", tmp_path / "stderr.txt"
    env = dict(os.environ, PYTHONPATH=str(ROOT.parent))
    with open(log, "w") as stderr_file:
        process = subprocess.Popen(build_command(big_gallery, out), env=env, stdout=subprocess.DEVNULL,
                                   stderr=stderr_file)
        while "embedding:" not in log.read_text():  # the models are loaded and images are being embedded
            assert process.poll() is None, log.read_text()
            time.sleep(0.05)
        time.sleep(0.5)
        process.send_signal(signal.SIGINT)
        for _ in range(10):
            time.sleep(gap)
            process.send_signal(signal.SIGINT)
        process.wait(timeout=120)
    stderr = log.read_text()
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "terminate called" not in stderr, stderr[-3000:]
    assert stderr.strip().splitlines()[-1].startswith("interrupted: finished work is saved"), stderr[-3000:]
    resumed = subprocess.run(build_command(big_gallery, out), env=env, capture_output=True, text=True, check=False)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    reused = int(resumed.stdout.split(" reused")[0].rsplit(" ", 1)[1])
    assert reused > 0, resumed.stdout  # what the first run embedded was saved, not embedded again

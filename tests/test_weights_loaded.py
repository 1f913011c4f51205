"""The weights a fingerprint names are the weights that made the embeddings: each weight file is read once, hashed,
and loaded from those bytes, so a file replaced while a build or a query runs can never mix two models silently."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

from lookalike.cli import cli
from tests.conftest import TINY_EMBEDDER


def replace_after_first_load(monkeypatch, path: Path) -> None:
    """Once a model has taken its weights, swap the safetensors file `path` for other weights (scaled x1.5), as an
    `mv` of a new file would, at the worst moment: after the load, before anything else reads the file."""
    from safetensors.torch import load_file

    original = torch.nn.Module.load_state_dict
    swapped = []

    def load_then_swap(*args, **kwargs):
        result = original(*args, **kwargs)
        if not swapped:
            swapped.append(True)
            replacement = path.with_name("new-" + path.name)
            save_file({key: value * 1.5 if value.is_floating_point() else value
                       for key, value in load_file(path).items()}, replacement)
            os.replace(replacement, path)
        return result

    monkeypatch.setattr(torch.nn.Module, "load_state_dict", load_then_swap)


@pytest.fixture
def weight_file(tmp_path) -> Path:
    import timm

    path = tmp_path / "weights" / "test_efficientnet.safetensors"
    path.parent.mkdir()
    model = timm.create_model("test_efficientnet", pretrained=False)
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, path)
    return path


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_weight_file_replaced_during_a_build_is_caught_by_the_next_query(weight_file, gallery, tmp_path, monkeypatch):
    loaded = sha256(weight_file)
    replace_after_first_load(monkeypatch, weight_file)
    classifier = f"timm:test_efficientnet@{weight_file}"
    out = tmp_path / "cache"
    runner = CliRunner()
    built = runner.invoke(cli, ["build-cache", "--gallery", str(gallery), "--out", str(out), "--classifier", classifier,
                                "--embedder", TINY_EMBEDDER, "--device", "cpu", "--runtime", "torch"])
    assert built.exit_code == 0, built.output
    assert sha256(weight_file) != loaded, "the file was not replaced: the test did not run its hostile step"
    manifest = json.loads(next(out.glob("gen-*/manifest.json")).read_text())
    assert f"sha256:{loaded}" in json.dumps(manifest["fingerprint"]), \
        "the manifest must name the weights that made the embeddings, not the file found afterwards"
    monkeypatch.undo()
    answered = runner.invoke(cli, ["query", str(next(gallery.rglob("*.png"))), "--cache", str(out),
                                   "--classifier", classifier, "--embedder", TINY_EMBEDDER, "--device", "cpu",
                                   "--runtime", "torch"])
    assert answered.exit_code != 0 and "another pipeline" in answered.output, answered.output
    assert len(answered.output.strip().splitlines()) == 1


def test_a_fine_tuned_run_names_the_weights_it_loaded(tmp_path, monkeypatch):
    from lookalike.models.finetuned import CheckpointEmbedder
    from lookalike.models.run_directory import WEIGHTS_FILE
    from tests.test_one_line_errors import bad_run_dir

    run_dir = bad_run_dir(tmp_path, lambda config: None)
    loaded = sha256(run_dir / WEIGHTS_FILE)
    replace_after_first_load(monkeypatch, run_dir / WEIGHTS_FILE)
    embedder = CheckpointEmbedder(run_dir, "cpu")
    assert sha256(run_dir / WEIGHTS_FILE) != loaded
    assert embedder.describe()["weights_sha256"] == loaded


def test_a_detector_names_the_weights_it_loaded(real_weights, tmp_path, monkeypatch):
    import shutil

    from lookalike.models.detector import Detector
    from lookalike.models.registry import resolve_spec

    path = tmp_path / "yolov8n.pt"
    shutil.copy(real_weights / "yolov8n.pt", path)
    loaded = sha256(path)
    detector_spec = resolve_spec(str(path), "detector")
    original = torch.load

    def load_then_swap(*args, **kwargs):
        result = original(*args, **kwargs)
        if sha256(path) == loaded:
            path.write_bytes(path.read_bytes() + b"\0")  # other bytes under the same name
        return result

    monkeypatch.setattr(torch, "load", load_then_swap)
    detector = Detector(detector_spec, "cpu")
    assert sha256(path) != loaded
    assert detector.describe()["weights"] == f"sha256:{loaded}"

"""Model files a cache, a flag or a folder points at are data: they never run code, and a bad one is refused."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from cli import cli
from models.detector import Detector
from models.errors import UserError
from models.registry import resolve_spec
from tests.conftest import TINY_CLASSIFIER, TINY_EMBEDDER


class RunsCommand:
    """Unpickling this runs a shell command that leaves a marker file: what a hostile .pt would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.fixture
def hostile_pt(tmp_path) -> tuple[Path, Path]:
    """A YOLO-looking checkpoint whose model entry runs a command when unpickled, and the command's marker."""
    marker = tmp_path / "code-ran"
    path = tmp_path / "hostile" / "yolov8n.pt"
    path.parent.mkdir()
    torch.save({"model": RunsCommand(marker), "train_args": {}}, path)
    return path, marker


def test_detector_flag_never_unpickles_code(hostile_pt):
    path, marker = hostile_pt
    with pytest.raises(UserError) as error:
        Detector(resolve_spec(str(path), "detector"), "cpu")
    assert not marker.exists()
    assert str(path) in str(error.value) and "\n" not in str(error.value)


def test_detector_from_weights_folder_never_unpickles_code(hostile_pt, monkeypatch):
    path, marker = hostile_pt
    monkeypatch.setenv("LOOKALIKE_WEIGHTS", str(path.parent))
    with pytest.raises(UserError, match="not a plain YOLO checkpoint"):
        Detector(resolve_spec("yolov8n", "detector"), "cpu")
    assert not marker.exists()


def test_detector_named_in_a_cache_never_unpickles_code(hostile_pt, gallery, tmp_path):
    path, marker = hostile_pt
    out = tmp_path / "cache"
    runner = CliRunner()
    built = runner.invoke(cli, ["build-cache", "--gallery", str(gallery), "--out", str(out), "--classifier",
                                TINY_CLASSIFIER, "--embedder", TINY_EMBEDDER, "--device", "cpu"])
    assert built.exit_code == 0, built.output
    manifest_path = out / (out / "CURRENT").read_text().strip() / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["config"].update(crop=True, detector=str(path))
    manifest_path.write_text(json.dumps(manifest))
    result = runner.invoke(cli, ["query", str(gallery / "red_circles" / "0.png"), "--cache", str(out)])
    assert result.exit_code != 0
    assert not marker.exists()
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.real
def test_genuine_yolo_checkpoint_still_loads(real_weights):
    from PIL import Image

    detector = Detector(resolve_spec("yolov8n", "detector"), "cpu")
    assert detector.detect([Image.new("RGB", (64, 64), "grey")])[0].shape[1] == 4


def test_onnx_export_leaves_the_eager_model_unchanged(tmp_path, monkeypatch):
    from models.runtime import seeded
    from models.timm_net import TimmNet

    monkeypatch.setenv("LOOKALIKE_CACHE_DIR", str(tmp_path / "fresh"))  # no export yet: this process makes it
    spec = resolve_spec(TINY_CLASSIFIER, "classifier")
    exported = TimmNet(spec, torch.device("cpu"), "onnx")
    assert exported.onnx is not None
    fresh = TimmNet(spec, torch.device("cpu"), "torch")
    batch = seeded(lambda: torch.randn(3, *exported.data_config["input_size"]))
    with torch.inference_mode():
        for after_export, reference in zip(exported.features_and_logits(batch), fresh.features_and_logits(batch)):
            torch.testing.assert_close(after_export, reference)


def test_a_model_giving_non_finite_embeddings_is_refused_not_stored(gallery, tmp_path, monkeypatch):
    from models.timm_net import TimmNet

    forward = TimmNet.forward

    def broken(self, batch):
        pooled, logits = forward(self, batch)
        pooled = pooled.clone()
        pooled[0] = float("nan")
        return pooled, logits

    monkeypatch.setattr(TimmNet, "forward", broken)
    out = tmp_path / "cache"
    result = CliRunner().invoke(cli, ["build-cache", "--gallery", str(gallery), "--out", str(out), "--classifier",
                                      TINY_CLASSIFIER, "--embedder", TINY_EMBEDDER, "--device", "cpu"])
    assert result.exit_code == 1
    [error] = [line for line in result.stderr.split("\n") if "error" in line]  # the rest is the progress bar
    assert "zero or non-finite embedding" in error
    assert not (out / "CURRENT").exists()


def test_zero_vectors_are_refused_at_the_embedder_level():
    from models.embedders import l2_normalize

    with pytest.raises(UserError, match="m: gave a zero or non-finite embedding for 1 of 2 images"):
        l2_normalize(torch.tensor([[3.0, 4.0], [0.0, 0.0]]), "m")
    np.testing.assert_allclose(l2_normalize(torch.tensor([[3.0, 4.0]]), "m"), [[0.6, 0.8]])

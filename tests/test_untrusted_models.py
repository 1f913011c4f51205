"""Model files a cache, a flag or a folder points at are data: they never run code, and a bad one is refused."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from lookalike.cli import cli
from lookalike.models import runtime
from lookalike.models.detector import Detector
from lookalike.models.errors import UserError
from lookalike.models.registry import resolve_spec
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
    from lookalike.models.runtime import seeded
    from lookalike.models.timm_net import TimmNet

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
    from lookalike.models.timm_net import TimmNet

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
    from lookalike.models.outputs import l2_normalize

    with pytest.raises(UserError, match="m: gave a zero or non-finite embedding for 1 of 2 images"):
        l2_normalize(torch.tensor([[3.0, 4.0], [0.0, 0.0]]), "m")
    np.testing.assert_allclose(l2_normalize(torch.tensor([[3.0, 4.0]]), "m"), [[0.6, 0.8]])


class AgreesOnNoiseOnly(torch.nn.Module):
    """`net`'s outputs on noise (mean near 0), negated on photos: a planted export no noise probe can catch."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        sign = 1 - 2 * (x.mean(dim=(1, 2, 3)).abs() > 0.3).float()[:, None]
        return tuple(out * sign for out in self.net(x))


@pytest.fixture
def onnx_dir(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LOOKALIKE_CACHE_DIR", str(tmp_path / "user-cache"))
    return tmp_path / "user-cache" / "onnx"


def onnx_and_torch(tmp_path):
    """A tiny classifier under ONNX Runtime and in torch, and photo-like drawn images for both."""
    from lookalike.models.timm_net import TimmNet
    from tests.test_onnx_runtime import drawn_batch

    spec = resolve_spec(TINY_CLASSIFIER, "classifier")
    fast, eager = TimmNet(spec, torch.device("cpu"), "onnx"), TimmNet(spec, torch.device("cpu"), "torch")
    return fast, eager, drawn_batch(eager.transform, tmp_path)


def assert_same_answers(fast, eager, batch):
    for _ in range(2):  # the first batch is checked, later ones run in ONNX Runtime
        (pooled_fast, logits_fast), (pooled, logits) = fast.forward(batch), eager.forward(batch)
        assert torch.nn.functional.cosine_similarity(pooled_fast, pooled).min() >= 0.999
        assert torch.equal(logits_fast.argmax(-1), logits.argmax(-1))


def test_an_export_is_written_with_its_hash_beside_it(onnx_dir, tmp_path):
    from lookalike.models.files import sha256_of

    onnx_and_torch(tmp_path)
    [export] = onnx_dir.glob("*.onnx")
    assert sorted(p.name for p in onnx_dir.iterdir()) == [export.name, export.name + ".sha256"]  # no leftovers
    assert (onnx_dir / (export.name + ".sha256")).read_text() == sha256_of(export)


@pytest.mark.parametrize("damage", ["truncate", "garble", "drop hash"])
def test_a_damaged_export_is_exported_again_not_abandoned(onnx_dir, tmp_path, damage, capsys):
    onnx_and_torch(tmp_path)
    [export] = onnx_dir.glob("*.onnx")
    if damage == "truncate":
        export.write_bytes(export.read_bytes()[:1000])
    elif damage == "garble":
        export.write_bytes(export.read_bytes()[:-64] + b"\0" * 64)
    else:
        (onnx_dir / (export.name + ".sha256")).unlink()
    fast, eager, batch = onnx_and_torch(tmp_path)
    assert_same_answers(fast, eager, batch)
    assert fast.onnx.in_use and "not used" not in capsys.readouterr().err


def test_a_planted_export_that_agrees_on_noise_only_is_caught(onnx_dir, tmp_path):
    from lookalike.models import onnx_runtime

    first, _, _ = onnx_and_torch(tmp_path)
    [export] = onnx_dir.glob("*.onnx")
    onnx_runtime._export(AgreesOnNoiseOnly(first.features_and_logits), first.onnx.example, export, 2)  # hash too
    planted = onnx_runtime.OnnxSession(export, 1)
    fast, eager, batch = onnx_and_torch(tmp_path)
    probe = runtime.probe_batch(eager.data_config["input_size"])
    assert runtime.outputs_match(planted(probe), eager.forward(probe), (False, True)) is None
    assert runtime.outputs_match(planted(batch), eager.forward(batch), (False, True)) is not None
    assert_same_answers(fast, eager, batch)
    assert fast.onnx.in_use  # exported again from the model, checked on the photos, then used


class OtherBatchSizesNegated(torch.nn.Module):
    """`net`'s outputs at even batch sizes, negated at odd ones: a planted export that agrees on a first batch of 32."""

    def __init__(self, net: torch.nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x):
        sign = 1 - 2 * (x.shape[0] % 2)
        return tuple(out * sign for out in self.net(x))


def test_a_planted_export_that_misbehaves_at_other_batch_sizes_is_caught(onnx_dir, tmp_path):
    """The check runs the first real batch, a batch of one and an odd-sized batch."""
    from lookalike.models import onnx_runtime

    first, _, _ = onnx_and_torch(tmp_path)
    [export] = onnx_dir.glob("*.onnx")
    onnx_runtime._export(OtherBatchSizesNegated(first.features_and_logits), first.onnx.example, export, 2)
    fast, eager, batch = onnx_and_torch(tmp_path)
    assert len(batch) % 2 == 0
    planted = onnx_runtime.OnnxSession(export, 1)
    assert runtime.outputs_match(planted(batch), eager.forward(batch), (False, True)) is None  # the old check passed
    assert_same_answers(fast, eager, batch[:3])
    assert fast.onnx.in_use and fast.onnx.record()["sha256"] != planted.sha256  # exported again, and recorded so


@pytest.mark.parametrize("shared", ["writable by others", "another user's"])
def test_exports_are_trusted_only_from_a_private_folder(tmp_path, monkeypatch, capsys, shared):
    """A shared export folder (anyone could plant an export there) is never read: exports go to a private folder."""
    import os

    from lookalike.models import onnx_session

    folder = tmp_path / "shared-cache" / "onnx"
    folder.mkdir(parents=True)
    if shared == "writable by others":
        folder.chmod(0o777)
    else:
        os.chown(folder, 12345, -1)
    monkeypatch.setenv("LOOKALIKE_CACHE_DIR", str(tmp_path / "shared-cache"))
    onnx_session._private_export_dir.cache_clear()
    fast, eager, batch = onnx_and_torch(tmp_path)
    assert_same_answers(fast, eager, batch)
    assert fast.onnx.in_use and not fast.onnx.path.is_relative_to(folder) and list(folder.iterdir()) == []
    assert onnx_session.not_private(fast.onnx.path.parent) is None
    [line] = [line for line in capsys.readouterr().err.splitlines() if "private" in line]
    assert str(folder) in line and ("writable by other users" in line or "belongs to user id 12345" in line)

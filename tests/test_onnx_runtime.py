"""--runtime onnx: ONNX Runtime replaces torch on the CPU only where it gives the same answers."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from lookalike.cli import cli
from lookalike.models import onnx_runtime, runtime, timm_net
from lookalike.models.classifier import Classifier
from lookalike.models.embedders import create_embedder
from lookalike.models.registry import resolve_spec
from lookalike.models.runtime import outputs_match, seeded
from tests.conftest import TINY_CLASSIFIER, TINY_EMBEDDER, draw_shape


def drawn_batch(transform, tmp_path, count: int = 6) -> torch.Tensor:
    from PIL import Image

    paths = [draw_shape(tmp_path / f"{i}.png", (40 * i, 200 - 30 * i, 90), "ellipse", seed=i) for i in range(count)]
    return torch.stack([transform(Image.open(p).convert("RGB")) for p in paths])


@pytest.mark.parametrize("name", [TINY_CLASSIFIER, "timm:test_vit@random"])
def test_onnx_classifier_matches_torch(name, tmp_path):
    spec = resolve_spec(name, "classifier")
    eager = Classifier(spec, "cpu")
    fast = Classifier(spec, "cpu", "onnx")
    assert fast.net.onnx is not None and eager.net.onnx is None
    batch = drawn_batch(eager.transform, tmp_path)
    (pooled_fast, logits_fast), (pooled, logits) = fast.net.forward(batch), eager.net.forward(batch)
    assert torch.nn.functional.cosine_similarity(pooled_fast, pooled).min() >= 0.999
    assert torch.equal(logits_fast.argmax(-1), logits.argmax(-1))


@pytest.mark.parametrize("name", ["clip@random", TINY_EMBEDDER])
def test_onnx_embedders_match_torch(name, tmp_path):
    spec = resolve_spec(name, "embedder")
    eager, fast = create_embedder(spec, "cpu"), create_embedder(spec, "cpu", "onnx")
    batch = drawn_batch(eager.transform, tmp_path, count=3)
    assert (fast.embed(batch) * eager.embed(batch)).sum(axis=1).min() >= 0.999


def test_a_model_that_does_not_match_runs_in_torch_and_says_why(monkeypatch, capsys):
    monkeypatch.setattr(runtime, "MATCH_COSINE", 1.5)  # nothing can match: the check must refuse it
    timm_net._load.cache_clear()  # a fresh load, not the process-wide net an earlier test made
    classifier = Classifier(resolve_spec("timm:test_efficientnet@random", "classifier"), "cpu", "onnx")
    assert classifier.predict(seeded(lambda: torch.randn(2, 3, 64, 64)), 3).classes.shape == (2, 3)
    assert not classifier.net.onnx.in_use
    assert "--runtime onnx not used for timm:test_efficientnet" in capsys.readouterr().err


def test_outputs_match_names_the_difference():
    base = seeded(lambda: torch.randn(4, 10))
    assert outputs_match([base + 1e-6], [base], [True]) is None
    assert "cosine" in outputs_match([-base], [base], [False])
    logits = seeded(lambda: torch.randn(2, 10_000))
    changed = logits.clone()
    runner_up = logits[0].topk(2).indices[1]
    changed[0, runner_up] = logits[0].max() + 0.01  # another top-1 by a clear margin; cosine still > 0.999
    assert "top-1" in outputs_match([changed], [logits], [True])


def test_onnx_on_a_gpu_is_refused_clearly():
    with pytest.raises(ValueError, match="--runtime onnx runs on the CPU"):
        onnx_runtime.resolve_runtime("onnx", torch.device("cuda"))
    with pytest.raises(ValueError, match="use auto, torch, onnx"):
        onnx_runtime.resolve_runtime("tvm", torch.device("cpu"))
    assert onnx_runtime.resolve_runtime("auto", torch.device("cuda")) == "torch"
    assert onnx_runtime.resolve_runtime("auto", torch.device("cpu")) == "onnx"


def test_cache_built_with_onnx_answers_like_torch(gallery, tmp_path):
    runner = CliRunner()
    answers = {}
    for kind in ("torch", "onnx"):
        out = tmp_path / kind
        built = runner.invoke(cli, ["build-cache", "--gallery", str(gallery), "--out", str(out), "--classifier",
                                    TINY_CLASSIFIER, "--embedder", TINY_EMBEDDER, "--device", "cpu",
                                    "--runtime", kind])
        assert built.exit_code == 0, built.output
        query = runner.invoke(cli, ["query", str(gallery / "red_circles" / "2.png"), "--cache", str(out), "--json",
                                    "--buckets", "flat", "-k", "6"])
        assert query.exit_code == 0, query.output
        answers[kind] = json.loads(query.stdout)[0]["results"]
    assert [r["path"] for r in answers["onnx"]] == [r["path"] for r in answers["torch"]]
    np.testing.assert_allclose([r["score"] for r in answers["onnx"]], [r["score"] for r in answers["torch"]],
                               atol=1e-3)

"""Registry, weight resolution and every registered model built with random weights."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lookalike.models.classifier import Classifier
from lookalike.models.detector import choose_box, pad_box
from lookalike.models.embedders import create_embedder
from lookalike.models.registry import PRESETS, RANDOM, resolve_spec
from lookalike.models.weights import WeightsUnavailable, local_weights


def test_mobilenetv2_preset_describes_the_converted_weights():
    spec = resolve_spec("mobilenetv2", "classifier")
    assert spec == resolve_spec("mobilenetv2", "embedder")
    assert spec.model_id == "mobilenetv2_100" and spec.create_kwargs == {"pad_type": "same"}
    assert spec.cfg_overlay["mean"] == (0.5, 0.5, 0.5) and spec.weight_file.endswith(".safetensors")


@pytest.mark.parametrize("text, library, model_id, tag, weights", [
    ("timm:resnet50", "timm", "resnet50", None, None),
    ("timm:resnet50@/w/r50.safetensors", "timm", "resnet50", None, "/w/r50.safetensors"),
    ("clip:ViT-B-32/laion2b_s34b_b79k", "open_clip", "ViT-B-32", "laion2b_s34b_b79k", None),
    ("clip@random", "open_clip", "ViT-B-32-256", "datacomp_s34b_b86k", RANDOM),
    ("ckpt:runs/faces", "checkpoint", "runs/faces", None, None),
])
def test_embedder_names_resolve(text, library, model_id, tag, weights):
    spec = resolve_spec(text, "embedder")
    assert (spec.library, spec.model_id, spec.tag, spec.weights) == (library, model_id, tag, weights)


def test_unknown_name_lists_the_choices():
    with pytest.raises(ValueError, match="effnet-b7, eva02, mobilenetv2, none"):
        resolve_spec("resnet", "classifier")


def test_missing_explicit_weights_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothere.safetensors"):
        local_weights(resolve_spec(f"timm:resnet18@{tmp_path}/nothere.safetensors", "classifier"))


def test_weights_folder_is_searched(tmp_path, monkeypatch):
    (tmp_path / "tf_efficientnet_b7.ns_jft_in1k.safetensors").write_bytes(b"x")
    monkeypatch.setenv("LOOKALIKE_WEIGHTS", str(tmp_path))
    assert local_weights(resolve_spec("effnet-b7", "classifier")) == tmp_path / "tf_efficientnet_b7.ns_jft_in1k.safetensors"


def test_unavailable_weights_error_lists_every_place_tried(monkeypatch, tmp_path):
    monkeypatch.setenv("LOOKALIKE_WEIGHTS", str(tmp_path))
    with pytest.raises(WeightsUnavailable) as error:
        Classifier(resolve_spec("timm:test_vit", "classifier"), "cpu")
    message = str(error.value)
    assert "$LOOKALIKE_WEIGHTS/test_vit.safetensors" in message and "timm hub" in message and "To fix" in message


def photo() -> Image.Image:
    return Image.effect_noise((300, 200), 50).convert("RGB")


# Entries of the ImageNet-1k label list (first name of each description), as the checkpoints were trained on it.
IMAGENET_1K = {0: "tench", 1: "goldfish", 404: "airliner", 999: "toilet tissue"}
LARGE = {"eva02", "effnet-b7"}  # built at full size (EVA-02-L at 448 px): tens of seconds each


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in LARGE else n
                                  for n in sorted(PRESETS["classifier"])])
def test_every_classifier_preset_runs_with_random_weights(name):
    classifier = Classifier(resolve_spec(f"{name}@random", "classifier"), "cpu")
    prediction = classifier.predict(classifier.transform(photo())[None], k=5)
    assert prediction.classes.shape == (1, 5) and np.all(np.diff(prediction.probs[0]) <= 0)
    if classifier.net.imagenet_subset == "imagenet-1k":
        assert {i: classifier.class_name(i) for i in IMAGENET_1K} == IMAGENET_1K
        assert classifier.class_index("n01440764") == 0 and classifier.class_index("airliner") == 404
    else:
        assert classifier.class_name(classifier.class_index("n02084071")) == "dog"


@pytest.mark.parametrize("name", sorted(PRESETS["embedder"]))
def test_every_embedder_preset_tells_images_apart(name):
    """One image embedded twice in a batch gives one vector; another image gives another."""
    embedder = create_embedder(resolve_spec(f"{name}@random", "embedder"), "cpu")
    same, other = photo(), photo()
    vectors = embedder.embed(torch.stack([embedder.transform(same), embedder.transform(same),
                                          embedder.transform(other)]))
    assert vectors.shape == (3, embedder.dim)
    assert np.allclose(vectors[0], vectors[1], atol=1e-5)
    assert float(vectors[0] @ vectors[2]) < float(vectors[0] @ vectors[1]) - 1e-4


@pytest.mark.slow
def test_eva02_names_come_from_imagenet_22k():
    classifier = Classifier(resolve_spec("eva02@random", "classifier"), "cpu")
    assert classifier.net.imagenet_subset == "imagenet-22k"
    assert classifier.class_index("n02084071") is not None  # 'dog', a 22k-only synset


def test_preprocessing_follows_each_model():
    mobilenet = Classifier(resolve_spec("mobilenetv2@random", "classifier"), "cpu")
    assert tuple(mobilenet.net.data_config["mean"]) == (0.5, 0.5, 0.5)
    assert mobilenet.net.data_config["input_size"] == (3, 224, 224)
    clip = create_embedder(resolve_spec("clip@random", "embedder"), "cpu")
    assert clip.preprocessing["mean"][0] == pytest.approx(0.48145466)
    assert clip.transform(photo()).shape == (3, 256, 256)


def test_choose_box_prefers_large_and_central():
    width, height = 400, 300
    corner_big = [0, 0, 160, 120]  # area 0.16, d = 0.6: score 0.064
    central = [150, 100, 250, 200]  # area 0.083, d = 0: score 0.083
    tiny_central = [195, 145, 205, 155]
    assert choose_box(np.array([corner_big, central, tiny_central]), width, height) == tuple(map(float, central))
    assert choose_box(np.zeros((0, 4)), width, height) is None


def test_pad_box_grows_and_clips():
    assert pad_box((10, 10, 110, 60), 0.1, 115, 100) == (0.0, 5.0, 115.0, 65.0)

"""Shared fixtures: offline environment, drawn images and a tiny random-initialised pipeline."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from lookalike.pipeline.config import PipelineConfig

ASSETS = Path(os.environ.get("LOOKALIKE_ASSETS", Path(__file__).resolve().parents[1].parent / "shared"))
TINY_CLASSIFIER = "timm:test_efficientnet@random"
TINY_EMBEDDER = "timm:test_vit@random"
SHAPES = {"red_circles": ((220, 30, 30), "ellipse"), "blue_squares": ((30, 60, 220), "rectangle"),
          "green_triangles": ((30, 170, 60), "polygon")}


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path_factory):
    """Never reach a hub, and see no weights a hub cached on this machine (so "no CLIP weights" holds on a machine
    that has them too); keep lookalike's and ultralytics' config out of the home folder."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for variable in ("HF_HOME", "HF_HUB_CACHE", "TORCH_HOME", "XDG_CACHE_HOME"):
        monkeypatch.setenv(variable, str(tmp_path_factory.getbasetemp() / "empty-hub-cache" / variable))
    monkeypatch.setenv("LOOKALIKE_CONFIG_DIR", str(tmp_path_factory.getbasetemp() / "config"))
    monkeypatch.setenv("LOOKALIKE_DATA_CACHE", str(tmp_path_factory.getbasetemp() / "datasets"))
    monkeypatch.setenv("LOOKALIKE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "lookalike-cache"))


def draw_shape(path: Path, colour, shape: str, seed: int, size: int = 96) -> Path:
    """A coloured shape at a random place and size on a light background."""
    rng = np.random.default_rng(seed)
    image = Image.new("RGB", (size, size), tuple(int(v) for v in 235 - rng.integers(0, 20, 3)))
    draw = ImageDraw.Draw(image)
    half = int(rng.integers(size // 5, size // 3))
    cx, cy = (int(v) for v in rng.integers(half, size - half, 2))
    if shape == "polygon":
        draw.polygon([(cx, cy - half), (cx - half, cy + half), (cx + half, cy + half)], fill=colour)
    else:
        getattr(draw, shape)([cx - half, cy - half, cx + half, cy + half], fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


@pytest.fixture
def gallery(tmp_path) -> Path:
    """Folder-per-label gallery: 3 labels x 6 drawn images."""
    root = tmp_path / "gallery"
    for label, (colour, shape) in SHAPES.items():
        for i in range(6):
            draw_shape(root / label / f"{i}.png", colour, shape, seed=100 * list(SHAPES).index(label) + i)
    return root


@pytest.fixture
def tiny_config() -> PipelineConfig:
    return PipelineConfig(classifier=TINY_CLASSIFIER, embedder=TINY_EMBEDDER, device="cpu", batch_size=4,
                          buckets="topk:3")


@pytest.fixture
def assets() -> Path:
    if not (ASSETS / "weights").is_dir() or not (ASSETS / "data").is_dir():
        pytest.skip(f"real assets not found at {ASSETS} (set LOOKALIKE_ASSETS)")
    return ASSETS


@pytest.fixture
def real_weights(assets, monkeypatch) -> Path:
    monkeypatch.setenv("LOOKALIKE_WEIGHTS", str(assets / "weights"))
    return assets / "weights"

"""Real weights and photos from ../shared: right labels come back, YOLO crops the object."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lookalike.models.detector import Detector
from lookalike.models.registry import resolve_spec
from lookalike.pipeline.build import build_cache
from lookalike.pipeline.config import PipelineConfig
from lookalike.pipeline.datasets import load_labelled, split_queries
from lookalike.pipeline.pipeline import build_pipeline
from lookalike.pipeline.query import open_query_pipeline

pytestmark = pytest.mark.real
CLASSES = ("Leopards", "airplanes", "grand_piano", "llama", "pizza", "revolver", "starfish", "umbrella")


@pytest.fixture
def caltech_part(assets, tmp_path):
    """8 caltech101-22 classes, 14 images each, split 10 gallery / 4 queries per class (seeded)."""
    data = load_labelled(assets / "data" / "caltech101-22.zip")
    rows = [i for label in CLASSES for i in [j for j, lab in enumerate(data.labels) if lab == label][:14]]
    return split_queries(data.subset(rows), query_fraction=0.3, seed=0)


def test_mobilenetv2_cache_returns_the_right_labels(caltech_part, real_weights, tmp_path):
    gallery, queries = caltech_part
    gallery_dir = tmp_path / "gallery"
    for path in gallery.paths:
        (gallery_dir / path).parent.mkdir(parents=True, exist_ok=True)
        (gallery_dir / path).symlink_to(gallery.root / path)
    config = PipelineConfig(classifier="mobilenetv2", embedder="mobilenetv2", device="cpu")
    summary = build_cache(gallery_dir, tmp_path / "cache", config)
    assert summary.images == len(gallery) and summary.buckets >= len(CLASSES)
    again = build_cache(gallery_dir, tmp_path / "cache", config)
    assert (again.embedded, again.reused) == (0, len(gallery))  # same pipeline: nothing embedded twice
    for policy in ("flat", "topk:3"):
        pipeline, _ = open_query_pipeline(tmp_path / "cache", {"buckets": policy})
        items = list(pipeline.run([str(queries.root / p) for p in queries.paths]))
        top1 = np.mean([item.results[0].label == label for item, label in zip(items, queries.labels)])
        top5 = np.mean([np.mean([r.label == label for r in item.results]) for item, label in zip(items, queries.labels)])
        assert top1 >= 0.9 and top5 >= 0.8, (policy, top1, top5)
    assert items[0].class_names  # readable ImageNet names


def test_mobilenetv2_classifies_real_photos(assets, real_weights):
    data = load_labelled(assets / "data" / "caltech101-22.zip")
    picks = {label: data.paths[data.labels.index(label)] for label in ("airplanes", "pizza", "Leopards")}
    pipeline = build_pipeline(PipelineConfig(classifier="mobilenetv2", embedder="mobilenetv2", device="cpu"))
    items = list(pipeline.run([str(data.root / p) for p in picks.values()]))
    names = [item.class_names[:5] for item in items]
    assert "airliner" in names[0] and "pizza" in names[1] and "leopard" in names[2], names


def test_yolo_crop_finds_the_object_on_a_large_canvas(assets, real_weights, tmp_path):
    data = load_labelled(assets / "data" / "caltech101-22.zip")
    photo = Image.open(data.root / data.paths[data.labels.index("dalmatian")]).convert("RGB")
    canvas = Image.new("RGB", (photo.width * 3, photo.height * 3), (128, 128, 128))
    offset = (photo.width, photo.height)
    canvas.paste(photo, offset)
    canvas.save(tmp_path / "canvas.jpg")
    detector = Detector(resolve_spec("yolov8n", "detector"), "cpu")
    assert len(detector.detect([canvas])[0]) >= 1
    pipeline = build_pipeline(PipelineConfig(classifier="none", embedder="mobilenetv2", crop=True, device="cpu"))
    [item] = list(pipeline.run([str(tmp_path / "canvas.jpg")]))
    x0, y0, x1, y1 = item.box
    assert x0 >= offset[0] * 0.8 and y0 >= offset[1] * 0.8  # the crop left the empty border behind
    assert x1 <= (offset[0] + photo.width) * 1.1 and y1 <= (offset[1] + photo.height) * 1.1
    assert (x1 - x0) * (y1 - y0) >= 0.15 * photo.width * photo.height


@pytest.mark.parametrize("device, runtime", [
    ("cpu", "onnx"),
    pytest.param("cuda", "torch", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")),
])
def test_faster_runtimes_give_eager_fp32_answers_on_real_photos(caltech_part, real_weights, device, runtime):
    """ONNX Runtime on the CPU, and the GPU's half precision, against eager fp32 on the CPU: same embedding
    (cosine >= 0.999) and the same top-1 class wherever fp32's top two classes are not a near-tie."""
    gallery, _ = caltech_part
    paths = [str(gallery.root / p) for p in gallery.paths]
    answers = {}
    for key, (dev, rt) in {"eager": ("cpu", "torch"), "fast": (device, runtime)}.items():
        config = PipelineConfig(classifier="mobilenetv2", embedder="mobilenetv2", device=dev, runtime=rt)
        pipeline = build_pipeline(config)
        answers[key] = list(pipeline.run(paths))
    cosines = [float(np.dot(a.embedding, b.embedding)) for a, b in zip(answers["fast"], answers["eager"])]
    assert min(cosines) >= 0.999, min(cosines)
    clear = [b.probs[0] - b.probs[1] > 1e-3 for b in answers["eager"]]
    same = [a.classes[0] == b.classes[0] for a, b in zip(answers["fast"], answers["eager"])]
    assert all(s for s, c in zip(same, clear) if c) and sum(clear) >= 0.9 * len(clear)

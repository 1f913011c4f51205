"""The GPU path (`--device cuda`): the same pipeline and cache as on the CPU. Skips without a CUDA GPU."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lookalike.models.detector import Detector
from lookalike.models.registry import resolve_spec
from lookalike.pipeline.build import build_cache
from lookalike.pipeline.config import PipelineConfig
from lookalike.pipeline.query import open_query_pipeline

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")


def test_cuda_cache_answers_like_the_cpu_cache(gallery, tiny_config, tmp_path):
    queries = [str(p) for p in sorted(gallery.rglob("*.png"))[::5]]
    answers = {}
    for device in ("cpu", "cuda"):
        config = PipelineConfig(**dict(tiny_config.to_dict(), device=device, buckets="flat"))
        build_cache(gallery, tmp_path / device, config)
        pipeline, used = open_query_pipeline(tmp_path / device, {"device": device})
        assert used.device == device
        answers[device] = list(pipeline.run(queries))
    for gpu, cpu in zip(answers["cuda"], answers["cpu"]):
        assert gpu.results[0].path == cpu.results[0].path  # itself first
        assert float(np.dot(gpu.embedding, cpu.embedding)) >= 0.99
        assert {r.path for r in gpu.results[:3]} & {r.path for r in cpu.results[:3]}


@pytest.mark.real
def test_cuda_detector_finds_the_same_boxes(real_weights, assets):
    from PIL import Image

    from lookalike.pipeline.datasets import load_labelled

    data = load_labelled(assets / "data" / "caltech101-22.zip")
    photo = Image.open(data.root / data.paths[data.labels.index("dalmatian")]).convert("RGB")
    boxes = {device: Detector(resolve_spec("yolov8n", "detector"), device).detect([photo])[0]
             for device in ("cpu", "cuda")}
    assert len(boxes["cuda"]) == len(boxes["cpu"]) >= 1
    np.testing.assert_allclose(np.asarray(boxes["cuda"])[:, :4], np.asarray(boxes["cpu"])[:, :4], atol=4)

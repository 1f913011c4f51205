"""Big JPEGs are decoded at about the model's input size (DCT-domain downscale), and embed as before."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lookalike.models.outputs import l2_normalize
from lookalike.pipeline.config import PipelineConfig
from lookalike.pipeline.images import DECODE_SIDE, load_image
from lookalike.pipeline.pipeline import DRAFT_FACTOR, build_pipeline, load_item, output_shape


def test_a_camera_sized_jpeg_is_decoded_near_the_model_input_size(tiny_config, tmp_path):
    pipeline = build_pipeline(tiny_config)
    side = max(max(output_shape(t)[-2:]) for t in pipeline.transforms.values())
    assert pipeline.decode_side == DRAFT_FACTOR * side < DECODE_SIDE
    Image.effect_noise((4000, 3000), 50).convert("RGB").save(tmp_path / "camera.jpg", quality=85)
    item = load_item("camera.jpg", tmp_path, pipeline.decode_side, pipeline.transforms)
    assert item.error is None
    assert pipeline.decode_side <= min(item.image.size) < 2 * pipeline.decode_side  # not 4000x3000
    assert all(item.inputs[name].shape == output_shape(t) for name, t in pipeline.transforms.items())


@pytest.mark.real
def test_drafted_camera_photos_embed_as_the_previous_decode(assets, real_weights, tmp_path):
    """caltech photos re-encoded at 4000x3000: cosine >= 0.999 and the same top-1 class as the previous path
    (decoded at >= 1024 px, then the model's own resize)."""
    from lookalike.pipeline.datasets import load_labelled

    data = load_labelled(assets / "data" / "caltech101-22.zip")
    paths = []
    for i, path in enumerate(data.paths[::150][:16]):
        paths.append(tmp_path / f"{i}.jpg")
        Image.open(data.root / path).convert("RGB").resize((4000, 3000), Image.BICUBIC).save(paths[-1], quality=90)
    pipeline = build_pipeline(PipelineConfig(classifier="mobilenetv2", embedder="mobilenetv2", device="cpu"))
    stage = pipeline.stage("classify")

    def embed(side: int) -> tuple[np.ndarray, np.ndarray]:
        batch = torch.stack([stage.transform(load_image(path, side)) for path in paths])
        prediction = stage.classifier.predict(batch, 1)
        return l2_normalize(prediction.pooled, "mobilenetv2"), prediction.classes[:, 0]

    (before, before_top1), (now, now_top1) = embed(DECODE_SIDE), embed(pipeline.decode_side)
    assert np.sum(before * now, axis=1).min() >= 0.999
    np.testing.assert_array_equal(before_top1, now_top1)

"""Image embedders: L2-normalised vectors from open_clip CLIP, timm features or fine-tuned checkpoints."""
from __future__ import annotations

import json
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from PIL import Image

from lookalike.models.errors import UserError
from lookalike.models.onnx_runtime import embed_with, onnx_forward, resolve_runtime
from lookalike.models.preprocess import describe_transform
from lookalike.models.registry import RANDOM, ModelSpec
from lookalike.models.outputs import l2_normalize
from lookalike.models.runtime import (
    GpuPrecision,
    has_conv,
    prepare_for_inference,
    resolve_device,
    seeded,
    to_model_input,
)
from lookalike.models.timm_net import load_timm_net
from lookalike.models.weights import file_stamp, load_with_fallback, local_weights


class Embedder(Protocol):
    """What the embed stage needs: a per-image transform and a batched, normalised embedding."""

    spec: ModelSpec
    transform: Callable[[Image.Image], torch.Tensor]
    dim: int

    def embed(self, batch: torch.Tensor) -> np.ndarray: ...

    def export_record(self) -> dict | None: ...

    def describe(self) -> dict: ...


class TimmEmbedder:
    """Pooled (pre-logits) features of a timm model."""

    def __init__(self, spec: ModelSpec, device: str = "auto", runtime: str = "torch"):
        self.spec = spec
        self.net = load_timm_net(spec, device, runtime)
        self.transform = self.net.transform
        self.dim = self.net.num_features

    def embed(self, batch: torch.Tensor) -> np.ndarray:
        return l2_normalize(self.net.forward(batch)[0], self.spec.name)

    def export_record(self) -> dict | None:
        return self.net.export_record()

    def describe(self) -> dict:
        return self.net.describe()


def load_clip(spec: ModelSpec) -> tuple[torch.nn.Module, Callable[[Image.Image], torch.Tensor], dict, str]:
    """The process-wide open_clip model for `spec` (both towers), its image transform, the tag's preprocessing settings
    and the weights' identity (the sha256 of the bytes loaded, 'random' or the hub tag). The one place a CLIP spec
    becomes a model: the image embedder and the text encoder share it, so its weights load once (a weight file
    changed since is loaded again)."""
    return _load_clip(json.dumps(spec.describe(), sort_keys=True),
                      file_stamp(local_weights(spec)) if spec.weights != RANDOM else ())


@lru_cache(maxsize=2)
def _load_clip(spec_json: str, weights_stamp: tuple):
    import open_clip

    spec = ModelSpec(**json.loads(spec_json))
    # A file path as `pretrained` silently drops the tag's mean/std/resize: pass them explicitly.
    tag_cfg = open_clip.get_pretrained_cfg(spec.model_id, spec.tag) if spec.tag else {}
    preprocessing = {key: tag_cfg[key] for key in ("mean", "std", "interpolation", "resize_mode") if key in tag_cfg}
    options = {f"image_{key}": preprocessing.get(key) for key in ("mean", "std", "interpolation", "resize_mode")}

    def create(pretrained: str | None):
        return open_clip.create_model_and_transforms(spec.model_id, pretrained=pretrained, **options)

    if spec.weights == RANDOM:
        (model, _, transform), weights = seeded(lambda: create(None)), RANDOM
    else:
        (model, _, transform), weights = load_with_fallback(spec, lambda path: create(str(path)), lambda: create(spec.tag))
    return model.eval(), transform, preprocessing, weights


class ClipEmbedder:
    """The image tower of an open_clip model with its pretrained tag's preprocessing."""

    def __init__(self, spec: ModelSpec, device: str = "auto", runtime: str = "torch"):
        self.spec = spec
        self.device = resolve_device(device)
        model, transform, self.preprocessing, self.weights = load_clip(spec)
        self.transform = transform
        self.visual = prepare_for_inference(model.visual, self.device)
        self.channels_last = has_conv(self.visual)
        self.dim = model.visual.output_dim
        self.image_size = model.visual.image_size
        self.precision = GpuPrecision(self.device, logits=(False,))  # half precision only where it matches fp32
        size = tuple(np.broadcast_to(np.atleast_1d(self.image_size), 2).tolist())
        self.onnx = onnx_forward(resolve_runtime(runtime, self.device), self.visual, (3, *size), self.describe, logits=(False,),
                                 name=spec.name)

    def export_record(self) -> dict | None:
        """The checked ONNX export of the image tower with its preprocessing as data, or None (see TimmNet)."""
        record = self.onnx.record() if self.onnx is not None else None
        steps = describe_transform(self.transform)
        return dict(record, preprocess=steps) if record and steps else None

    def embed(self, batch: torch.Tensor) -> np.ndarray:
        return embed_with(self.onnx, self._eager, batch, self.spec.name)

    def _eager(self, batch: torch.Tensor) -> torch.Tensor:
        (features,) = self.precision.run(self.visual, to_model_input(batch, self.device, self.channels_last))
        return features

    def describe(self) -> dict:
        return {"spec": self.spec.describe(), "weights": self.weights, "preprocessing": self.preprocessing,
                "image_size": list(np.atleast_1d(self.image_size).tolist())}


def _checkpoint_embedder(spec: ModelSpec, device: str, runtime: str) -> Embedder:
    from lookalike.models.finetuned import CheckpointEmbedder  # torch-heavy training code only when asked for

    return CheckpointEmbedder(Path(spec.model_id), device, runtime)


# The embedder each library's specs make: the one place a library name chooses code.
EMBEDDERS: dict[str, Callable[[ModelSpec, str, str], Embedder]] = {
    "timm": TimmEmbedder, "open_clip": ClipEmbedder, "checkpoint": _checkpoint_embedder}


def create_embedder(spec: ModelSpec, device: str = "auto", runtime: str = "torch") -> Embedder:
    """The factory for every embedder kind; `runtime` 'onnx' runs it under ONNX Runtime where it matches."""
    if spec.library not in EMBEDDERS:
        raise UserError(f"{spec.name}: no embedder for library {spec.library}")
    return EMBEDDERS[spec.library](spec, device, runtime)

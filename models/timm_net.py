"""A timm network loaded once per process, giving pooled features and class logits in one forward."""
from __future__ import annotations

import json
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import torch
from PIL import Image

from lookalike.models.onnx_runtime import onnx_forward, resolve_runtime
from lookalike.models.onnx_session import export_dir
from lookalike.models.preprocess import describe_transform
from lookalike.models.registry import RANDOM, ModelSpec
from lookalike.models.runtime import GpuPrecision, has_conv, prepare_for_inference, resolve_device, seeded, to_model_input
from lookalike.models.weights import file_stamp, load_with_fallback, local_weights


def create_timm_model(spec: ModelSpec) -> tuple[torch.nn.Module, str]:
    """(a timm model from `spec`, its weights' identity): random (seeded), a local weight file (identity: the sha256
    of the bytes loaded), or the hub (one clear error)."""
    import timm

    def from_file(path: Path) -> torch.nn.Module:
        overlay = dict(spec.cfg_overlay, file=str(path))
        return timm.create_model(spec.model_id, pretrained=True, pretrained_cfg_overlay=overlay,
                                 **spec.create_kwargs)

    def from_hub() -> torch.nn.Module:
        return timm.create_model(spec.model_id, pretrained=True,
                                 pretrained_cfg_overlay=spec.cfg_overlay or None, **spec.create_kwargs)

    if spec.weights == RANDOM:
        return seeded(lambda: timm.create_model(spec.model_id, pretrained=False,
                                                pretrained_cfg_overlay=spec.cfg_overlay or None,
                                                **spec.create_kwargs)), RANDOM
    return load_with_fallback(spec, from_file, from_hub)


class FeaturesAndLogits(torch.nn.Module):
    """(pooled features, class logits) of a timm model in one forward: what TimmNet exports to ONNX."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = self.model.forward_head(self.model.forward_features(x), pre_logits=True)
        return pooled, self.model.get_classifier()(pooled)


class TimmNet:
    """One timm model in inference mode with its own eval preprocessing (torch, or ONNX Runtime on the CPU)."""

    def __init__(self, spec: ModelSpec, device: torch.device, runtime: str = "torch"):
        import timm.data

        runtime = resolve_runtime(runtime, device)
        self.spec = spec
        self.device = device
        model, self.weights = create_timm_model(spec)
        self.data_config = timm.data.resolve_data_config({}, model=model)
        self.transform: Callable[[Image.Image], torch.Tensor] = timm.data.create_transform(**self.data_config)
        self.imagenet_subset = timm.data.infer_imagenet_subset(model)
        self.num_features = model.num_features
        self.num_classes = model.num_classes
        self.channels_last = has_conv(model)
        self.model = prepare_for_inference(model, device)
        self.features_and_logits = FeaturesAndLogits(self.model)
        self.precision = GpuPrecision(device, logits=(False, True))  # half precision only where it matches fp32
        self.onnx = onnx_forward(runtime, self.features_and_logits, self.data_config["input_size"], self.describe,
                                 logits=(False, True), name=spec.name)

    def describe(self) -> dict:
        """The spec, the weights' identity (hash of the bytes loaded) and the resolved preprocessing: for cache
        fingerprints."""
        return {"spec": self.spec.describe(), "weights": self.weights,
                "preprocessing": json.loads(json.dumps(self.data_config, default=list))}

    def export_record(self) -> dict | None:
        """The checked ONNX export with its preprocessing as data (outputs: pooled features, logits), for the
        cache's manifest; None when the model runs in torch or its transform has steps ArrayTransform lacks."""
        record = self.onnx.record() if self.onnx is not None else None
        steps = describe_transform(self.transform)
        return dict(record, preprocess=steps) if record and steps else None

    @torch.inference_mode()
    def forward(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled features, class logits) for a preprocessed batch, both float32 on the CPU."""
        if self.onnx is not None:
            return self.onnx(batch)
        x = to_model_input(batch, self.device, self.channels_last)
        pooled, logits = self.precision.run(self.features_and_logits, x)
        return pooled.float().cpu(), logits.float().cpu()


@lru_cache(maxsize=4)
def _load(spec_json: str, device: str, runtime: str, exports: str, weights_stamp: tuple) -> TimmNet:
    return TimmNet(ModelSpec(**json.loads(spec_json)), torch.device(device), runtime)


def load_timm_net(spec: ModelSpec, device: str = "auto", runtime: str = "torch") -> TimmNet:
    """The process-wide TimmNet for `spec`: a classifier and an embedder naming the same model share it (per export
    folder too, since its ONNX export lives there; a weight file changed since is loaded again)."""
    return _load(json.dumps(spec.describe(), sort_keys=True), str(resolve_device(device)), runtime, str(export_dir()),
                 file_stamp(local_weights(spec)) if spec.weights != RANDOM else ())

"""Embedding networks for fine-tuning: a backbone plus a linear projection, and each one's preprocessing.

Backbones: `small-cnn` (four conv blocks, sized for small greyscale faces), `pixels` (the resized
pixels themselves: a baseline, or a linear embedding with a head) and any timm model
(`timm:<name>[@weights]` or a registry preset such as `mobilenetv2`).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
from PIL import Image
from torch import nn

from lookalike.models.errors import UserError
from lookalike.models.registry import RANDOM, ModelSpec, resolve_spec

SMALL_CNN = "small-cnn"
PIXELS = "pixels"


@dataclass(frozen=True)
class Preprocessing:
    """How an image becomes the net's input: colour mode, resize to (height, width), mean/std.

    Training decodes and resizes each image once (`resize`), then augments the uint8 tensor and
    normalises it (`normalize`); inference runs both in one `__call__`, so the two never differ.
    """

    mode: str  # "L" (one channel) or "RGB"
    size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def channels(self) -> int:
        return 1 if self.mode == "L" else 3

    def resize(self, image: Image.Image) -> torch.Tensor:
        """uint8 CHW tensor of the image in this mode and size (bilinear, antialiased)."""
        height, width = self.size
        resized = image.convert(self.mode).resize((width, height), Image.Resampling.BILINEAR)
        array = np.asarray(resized, dtype=np.uint8).reshape(height, width, self.channels)
        return torch.from_numpy(array.copy()).permute(2, 0, 1)

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [..., C, H, W] -> float32, scaled to [0, 1] then standardised."""
        mean = torch.tensor(self.mean).view(-1, 1, 1)
        std = torch.tensor(self.std).view(-1, 1, 1)
        return (pixels.float() / 255.0 - mean) / std

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.normalize(self.resize(image))

    def describe(self) -> dict:
        return asdict(self) | {"size": list(self.size), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_dict(cls, data: dict) -> Preprocessing:
        return cls(data["mode"], tuple(data["size"]), tuple(data["mean"]), tuple(data["std"]))


class SmallCNN(nn.Module):
    """Four conv-BN-ReLU-pool blocks and global average pooling: 128 features, fast on a CPU."""

    def __init__(self, in_channels: int, widths: tuple[int, ...] = (32, 64, 128, 128)):
        super().__init__()
        layers: list[nn.Module] = []
        for width in widths:
            layers += [nn.Conv2d(in_channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                       nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            in_channels = width
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.num_features = widths[-1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


class Pixels(nn.Module):
    """The input pixels as a flat vector (no parameters): the raw-pixel baseline."""

    def __init__(self, preprocessing: Preprocessing):
        super().__init__()
        self.num_features = preprocessing.channels * preprocessing.size[0] * preprocessing.size[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


class EmbeddingNet(nn.Module):
    """backbone -> pooled features -> linear projection (or none when embedding_size is 0)."""

    def __init__(self, backbone: nn.Module, num_features: int, embedding_size: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(num_features, embedding_size) if embedding_size else nn.Identity()
        self.dim = embedding_size or num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.backbone(x))


def _timm_backbone(spec: ModelSpec, pretrained: bool) -> nn.Module:
    """A timm model without its classifier; starting weights (or @random) resolve as for every other model."""
    import timm

    from lookalike.models.timm_net import create_timm_model  # the one place that resolves timm weights

    if pretrained:
        model, _ = create_timm_model(spec)
        model.reset_classifier(0)
        return model
    return timm.create_model(spec.model_id, pretrained=False, num_classes=0, **spec.create_kwargs)


def _timm_preprocessing(model: nn.Module, image_size: tuple[int, int] | None) -> Preprocessing:
    import timm.data

    config = timm.data.resolve_data_config({}, model=model)
    size = image_size or tuple(config["input_size"][1:])
    return Preprocessing("RGB", tuple(size), tuple(config["mean"]), tuple(config["std"]))


def describe_backbone(backbone: str, image_size: tuple[int, int] | None) -> dict:
    """The JSON model description for a user's backbone choice (validated here, built by build_net)."""
    if backbone in (SMALL_CNN, PIXELS):
        size = image_size or ((64, 64) if backbone == SMALL_CNN else (32, 32))
        return {"kind": backbone, "preprocessing": Preprocessing("L", tuple(size), (0.5,), (0.5,)).describe()}
    try:
        spec = resolve_spec(backbone, "embedder")
    except ValueError:
        raise UserError(f"--backbone {backbone}: use {SMALL_CNN}, {PIXELS}, a timm preset (mobilenetv2) "
                         f"or timm:<name>[@weights.safetensors|@random]") from None
    if spec.library != "timm":
        raise UserError(f"--backbone {backbone}: only timm models can be fine-tuned (got {spec.library})")
    return {"kind": "timm", "spec": spec.describe(), "image_size": list(image_size) if image_size else None}


def build_net(model: dict, embedding_size: int, pretrained: bool) -> tuple[EmbeddingNet, Preprocessing]:
    """The network and preprocessing a model description names.

    `pretrained` loads the backbone's starting weights (training); a checkpoint is rebuilt with
    `pretrained=False` and then gets its own weights, so it never needs the original file.
    """
    if model["kind"] == "timm":
        spec = ModelSpec(**model["spec"])
        backbone = _timm_backbone(spec, pretrained)
        preprocessing = (Preprocessing.from_dict(model["preprocessing"]) if "preprocessing" in model
                         else _timm_preprocessing(backbone, tuple(model["image_size"] or ()) or None))
        num_features = backbone.num_features
    else:
        preprocessing = Preprocessing.from_dict(model["preprocessing"])
        backbone = SmallCNN(preprocessing.channels) if model["kind"] == SMALL_CNN else Pixels(preprocessing)
        num_features = backbone.num_features
    return EmbeddingNet(backbone, num_features, embedding_size), preprocessing


def is_pretrained(model: dict) -> bool:
    """Whether the backbone starts from trained weights (its BatchNorm statistics are then kept)."""
    return model["kind"] == "timm" and model["spec"]["weights"] != RANDOM

"""Fine-tuned embedders: a backbone plus a linear projection, rebuilt from a training run directory.

A run directory (written by `pipeline.training`) holds `config.json`, which says how to build the
network and its preprocessing, and `model.safetensors`, the best weights. `CheckpointEmbedder`
turns such a directory into an embed stage (`--embedder ckpt:RUN_DIR`).

Backbones: `small-cnn` (four conv blocks, sized for small greyscale faces), `pixels` (the resized
pixels themselves: a baseline, or a linear embedding with a head) and any timm model
(`timm:<name>[@weights]` or a registry preset such as `mobilenetv2`).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from models.errors import UserError, one_line
from models.onnx_runtime import check_runtime, onnx_forward
from models.registry import RANDOM, ModelSpec, resolve_spec
from models.runtime import l2_normalize, resolve_device
from models.weights import file_sha256

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
SMALL_CNN = "small-cnn"
PIXELS = "pixels"
FORMAT_VERSION = 1


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

    from models.timm_net import create_timm_model  # the one place that resolves timm weights

    if pretrained:
        model = create_timm_model(spec)
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


def read_run_config(run_dir: Path) -> dict:
    """config.json of a run directory; one-line errors for a missing or garbled one."""
    path = run_dir / CONFIG_FILE
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: checkpoint run directory does not exist")
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no {CONFIG_FILE} (not a training run directory)")
    try:
        config = json.loads(path.read_text())
        missing = {"format", "model", "embedding_size"} - set(config)
    except (OSError, ValueError) as err:
        raise UserError(f"{run_dir}: {CONFIG_FILE} is not valid JSON ({err})") from None
    if missing:
        raise UserError(f"{run_dir}: {CONFIG_FILE} lacks {', '.join(sorted(missing))}")
    if config["format"] != FORMAT_VERSION:
        raise UserError(f"{run_dir}: run format {config['format']} is not {FORMAT_VERSION}; retrain or upgrade")
    _refuse_unknown_keys(path, config)
    return config


RUN_KEYS = {"format", "model", "embedding_size", "training"}
MODEL_KEYS = {"timm": {"kind", "spec", "image_size", "preprocessing"}, SMALL_CNN: {"kind", "preprocessing"},
              PIXELS: {"kind", "preprocessing"}}


def _refuse_unknown_keys(path: Path, config: dict) -> None:
    """UserError naming the first key this version does not know: a config is read strictly, never guessed at."""
    model = config["model"]
    if not isinstance(model, dict) or model.get("kind") not in MODEL_KEYS:
        kind = model.get("kind") if isinstance(model, dict) else model
        raise UserError(f"{path}: model kind {kind!r} is not one of {', '.join(MODEL_KEYS)}")
    spec_keys = set(ModelSpec.__dataclass_fields__)
    for where, data, known in [("", config, RUN_KEYS), ("model.", model, MODEL_KEYS[model["kind"]]),
                               ("model.spec.", model.get("spec") or {}, spec_keys)]:
        if not isinstance(data, dict):
            raise UserError(f"{path}: {where.rstrip('.') or 'the file'} is not a JSON object")
        unknown = sorted(set(data) - known)
        if unknown:
            raise UserError(f"{path}: unknown key {where}{unknown[0]} (known: {', '.join(sorted(known))})")


def rebuild_net(run_dir: Path, config: dict) -> tuple[EmbeddingNet, Preprocessing]:
    """The network a run's config describes, without its starting weights; UserError when it cannot be built
    (a bad `act_layer` or size: timm and torch report these with KeyError, TypeError, AssertionError...)."""
    try:
        return build_net(config["model"], config["embedding_size"], pretrained=False)
    except (KeyError, TypeError, ValueError, AssertionError, AttributeError, RuntimeError) as err:
        raise UserError(f"{run_dir / CONFIG_FILE}: cannot build the network it describes "
                        f"({one_line(err)})") from None


def load_weights(net: nn.Module, path: Path) -> None:
    """Strictly load a safetensors state dict; a garbled or mismatched file is a one-line ValueError."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"{path.parent}: no {path.name} (training has not saved weights yet)")
    try:
        net.load_state_dict(load_file(str(path)), strict=True)
    except Exception as err:  # safetensors and torch raise several types for bad files
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"{path}: weights do not fit the network in {CONFIG_FILE} ({first})") from None


class CheckpointEmbedder:
    """The embed stage for a fine-tuned run directory (`ckpt:RUN_DIR`)."""

    def __init__(self, run_dir: Path, device: str = "auto", runtime: str = "torch"):
        run_dir = Path(run_dir).expanduser()
        config = read_run_config(run_dir)
        self.weights_path = run_dir / WEIGHTS_FILE
        self.net, self.preprocessing = rebuild_net(run_dir, config)
        load_weights(self.net, self.weights_path)
        self.device = resolve_device(device)
        self.net = self.net.eval().to(self.device)
        self.model = config["model"]
        self.spec = ModelSpec(name=f"ckpt:{run_dir}", library="checkpoint", model_id=str(run_dir))
        self.transform = self.preprocessing
        self.dim = self.net.dim
        check_runtime(runtime, self.device)
        self.onnx = onnx_forward(runtime, self.net, (self.preprocessing.channels, *self.preprocessing.size),
                                 self.describe, logits=(False,), name=self.spec.name)

    def embed(self, batch: torch.Tensor) -> np.ndarray:
        if self.onnx is not None:
            return l2_normalize(self.onnx(batch)[0], self.spec.name)
        with torch.inference_mode():
            return l2_normalize(self.net(batch.to(self.device)).cpu(), self.spec.name)

    def describe(self) -> dict:
        """What changes an embedding: the network, its preprocessing and the weights' hash (not the path)."""
        return {"library": "checkpoint", "model": self.model, "embedding_size": self.dim,
                "preprocessing": self.preprocessing.describe(),
                "weights_sha256": file_sha256(self.weights_path)}

"""Options of a training run: plain data with validation, importable without torch (the CLI reads its defaults)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from lookalike.models.errors import UserError

LOSSES = ("contrastive", "triplet")
MINERS = ("batch-hard", "semi-hard", "all")
AUGMENTS = ("off", "trivial")
DEFAULT_MARGIN = {"triplet": 0.2, "contrastive": 0.5}
DEFAULT_LR = {"pretrained": 1e-4, "scratch": 1e-3}  # fine-tuning needs gentler steps than training anew
RESUME_OVERRIDES = ("epochs", "patience", "device")  # what --resume may change; the rest is the run's


@dataclass
class TrainConfig:
    """Every option of a training run (stored in config.json; defaults suit small CPU runs)."""

    loss: str
    data: str
    out: str
    val_data: str | None = None
    labels_file: str | None = None
    backbone: str = "mobilenetv2"
    embedding_size: int = 128
    image_size: tuple[int, int] | None = None
    margin: float | None = None
    miner: str = "semi-hard"
    pair_ratio: str = "1:1"
    classes_per_batch: int = 8
    images_per_class: int = 4
    epochs: int = 30
    patience: int = 5
    lr: float | None = None  # default: DEFAULT_LR by whether the backbone starts pretrained
    weight_decay: float = 5e-4
    augment: str = "off"
    seed: int = 0
    holdout_labels: int | None = None
    holdout_images: float | None = None
    device: str = "auto"

    def __post_init__(self) -> None:
        choices = {"loss": LOSSES, "miner": MINERS, "augment": AUGMENTS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise UserError(f"--{name} {getattr(self, name)}: use one of {', '.join(allowed)}")
        if self.holdout_labels is not None and self.holdout_images is not None:
            raise UserError("--holdout-labels and --holdout-images: choose one way to split validation")
        for name in ("margin", "lr", "weight_decay", "holdout_images"):
            value = getattr(self, name)
            if value is not None and not math.isfinite(value):
                raise UserError(f"--{name.replace('_', '-')} {value}: must be a finite number")
        positive = {"embedding_size": 0, "classes_per_batch": 2, "images_per_class": 2, "epochs": 0,
                    "patience": 1}
        for name, least in positive.items():
            if getattr(self, name) < least:
                raise UserError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be at least {least}")
        if self.margin is None:
            self.margin = DEFAULT_MARGIN[self.loss]
        if self.image_size is not None:
            self.image_size = tuple(self.image_size)
        parse_ratio(self.pair_ratio)


def parse_ratio(text: str) -> tuple[int, int]:
    """'1:3' -> (1, 3): at most 3 negative pairs per positive pair (and vice versa)."""
    try:
        pos, neg = (int(part) for part in text.split(":"))
    except ValueError:
        raise UserError(f"--pair-ratio {text}: use POSITIVE:NEGATIVE, e.g. 1:1 or 1:3") from None
    if pos < 1 or neg < 1:
        raise UserError(f"--pair-ratio {text}: both parts must be at least 1")
    return pos, neg


def parse_size(text: str | None) -> tuple[int, int] | None:
    """'64' -> (64, 64); '112x92' -> (112, 92) as height x width."""
    if not text:
        return None
    try:
        parts = [int(part) for part in text.lower().split("x")]
    except ValueError:
        parts = []
    if len(parts) not in (1, 2) or min(parts) < 8:
        raise UserError(f"--image-size {text}: use SIZE or HEIGHTxWIDTH, at least 8 pixels")
    return (parts[0], parts[-1])

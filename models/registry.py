"""Named models: a short name (or a `timm:`/`clip:`/`ckpt:` string) maps to a full ModelSpec.

Nothing else in lookalike decides which network, tag, creation arguments or weight file a
name means; the factories in this package only read specs.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace
from typing import Literal

from lookalike.models.errors import UserError

Kind = Literal["classifier", "embedder", "detector"]
Library = Literal["timm", "open_clip", "checkpoint", "ultralytics"]

RANDOM = "random"  # weights suffix: random initialisation with a fixed seed (tests, smoke runs)


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to create one model and its preprocessing.

    `weights` is an explicit local path, `RANDOM`, or None (look in $LOOKALIKE_WEIGHTS for
    `weight_file`, then the library's hub). `cfg_overlay` overrides the model's own
    preprocessing config (timm's pretrained_cfg), e.g. mean/std of converted weights.
    """

    name: str
    library: Library
    model_id: str
    tag: str | None = None
    weight_file: str | None = None
    weights: str | None = None
    create_kwargs: dict = field(default_factory=dict)
    cfg_overlay: dict = field(default_factory=dict)

    def describe(self) -> dict:
        """A JSON-able description, used in cache fingerprints and run configs."""
        return asdict(self)


MOBILENETV2 = ModelSpec(
    name="mobilenetv2",
    library="timm",
    model_id="mobilenetv2_100",
    weight_file="mobilenetv2_100.tf2_ptq_in1k.safetensors",
    # Converted from TF: TF-style 'same' padding and inputs scaled to [-1, 1].
    create_kwargs={"pad_type": "same"},
    cfg_overlay={"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)},
)

PRESETS: dict[Kind, dict[str, ModelSpec]] = {
    "classifier": {
        "effnet-b7": ModelSpec(
            "effnet-b7", "timm", "tf_efficientnet_b7.ns_jft_in1k",
            weight_file="tf_efficientnet_b7.ns_jft_in1k.safetensors",
        ),
        "eva02": ModelSpec(
            "eva02", "timm", "eva02_large_patch14_448.mim_m38m_ft_in22k",
            weight_file="eva02_large_patch14_448.mim_m38m_ft_in22k.safetensors",
        ),
        "mobilenetv2": MOBILENETV2,
    },
    "embedder": {
        "clip": ModelSpec(
            "clip", "open_clip", "ViT-B-32-256", tag="datacomp_s34b_b86k",
            weight_file="ViT-B-32-256.datacomp_s34b_b86k.safetensors",
        ),
        "mobilenetv2": MOBILENETV2,
    },
    "detector": {
        "yolov8n": ModelSpec("yolov8n", "ultralytics", "yolov8n.pt", weight_file="yolov8n.pt"),
    },
}

NO_CLASSIFIER = "none"


def _split_weights(text: str) -> tuple[str, str | None]:
    """'name@weights' -> ('name', 'weights'); the weights part may be a path or 'random'."""
    name, sep, weights = text.partition("@")
    return name, (weights if sep else None)


def resolve_spec(text: str, kind: Kind) -> ModelSpec:
    """Turn a user's model name into a ModelSpec.

    Accepts a preset name, `timm:<model>`, `clip:<arch>/<tag>`, `ckpt:<run_dir>` (embedders) or
    a `.pt` path (detectors); any of them may end in `@<weights path>` or `@random`.
    """
    base, weights = _split_weights(text)
    presets = PRESETS[kind]
    if base in presets:
        spec = presets[base]
    elif base.startswith("timm:") and kind in ("classifier", "embedder"):
        model_id = base[len("timm:"):]
        spec = ModelSpec(base, "timm", model_id, weight_file=f"{model_id}.safetensors")
    elif base.startswith("clip:") and kind == "embedder":
        arch, _, tag = base[len("clip:"):].partition("/")
        spec = ModelSpec(base, "open_clip", arch, tag=tag or None,
                         weight_file=f"{arch}.{tag}.safetensors" if tag else None)
    elif base.startswith("ckpt:") and kind == "embedder":
        spec = ModelSpec(base, "checkpoint", base[len("ckpt:"):])
    elif kind == "detector" and base.endswith(".pt"):
        spec = ModelSpec(base, "ultralytics", base, weight_file=base, weights=base)
    else:
        forms = {
            "classifier": "timm:<model>",
            "embedder": "timm:<model>, clip:<arch>/<tag> or ckpt:<run_dir>",
            "detector": "a .pt path",
        }[kind]
        choices = ", ".join(sorted(presets) + ([NO_CLASSIFIER] if kind == "classifier" else []))
        raise UserError(f"unknown {kind} '{text}': use one of {choices}, or {forms}")
    return replace(spec, weights=weights) if weights else spec


def has_text_tower(spec: ModelSpec) -> bool:
    return spec.library == "open_clip"


def require_text_tower(spec: ModelSpec) -> None:
    """UserError naming the embedder when it cannot embed text."""
    if not has_text_tower(spec):
        raise UserError(f"text queries need a CLIP embedder (open_clip, with a text tower); "
                        f"the embedder '{spec.name}' embeds images only")

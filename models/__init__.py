"""Model registry and factories: classifiers (timm), embedders (open_clip, timm, checkpoints), detectors (YOLO)."""
from lookalike.models.registry import NO_CLASSIFIER, PRESETS, RANDOM, ModelSpec, resolve_spec
from lookalike.models.weights import WeightsUnavailable

__all__ = ["NO_CLASSIFIER", "PRESETS", "RANDOM", "ModelSpec", "WeightsUnavailable", "resolve_spec"]

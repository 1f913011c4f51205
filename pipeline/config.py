"""PipelineConfig: the one description from which the CLI, the cache builder and the benchmark build pipelines."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from lookalike.models.registry import NO_CLASSIFIER

# Fields that change what is stored in a cache (embeddings, classes, crops); the rest are query-time.
CACHE_FIELDS = ("classifier", "embedder", "crop", "detector", "crop_margin", "crop_confidence", "class_topk")


@dataclass
class PipelineConfig:
    classifier: str = "effnet-b7"
    embedder: str = "clip"
    crop: bool = False
    detector: str = "yolov8n"
    crop_margin: float = 0.1
    crop_confidence: float = 0.25
    class_topk: int = 10  # classes kept per image: buckets, top-m soft assignment and fused scores use them
    buckets: str = "auto"  # the policy chosen on the gallery at build time (cache/autopolicy.py)
    k: int = 5
    device: str = "auto"
    runtime: str = "auto"  # ONNX Runtime on a CPU where it matches torch, torch on a GPU (models/onnx_runtime.py)
    batch_size: int = 32
    workers: int = 2

    @property
    def uses_classifier(self) -> bool:
        return self.classifier != NO_CLASSIFIER

    def cache_part(self) -> dict:
        return {name: getattr(self, name) for name in CACHE_FIELDS}

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PipelineConfig:
        known = {f.name for f in fields(cls)}
        return cls(**{key: value for key, value in data.items() if key in known})

"""Item: one image as it travels through the stages, enriched by each."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image


@dataclass
class Result:
    """One gallery image found for a query. `score` is always its cosine similarity to the query;
    `rank_score` is what a policy ranked by when that is something else (fused: cosine + W * agreement)."""

    rank: int
    score: float
    path: str
    label: str | None
    bucket: str | None
    row: int
    rank_score: float | None = None

    def to_dict(self) -> dict:
        return {"rank": self.rank, "score": round(self.score, 6),
                "rank_score": None if self.rank_score is None else round(self.rank_score, 6),
                "row": self.row, "path": self.path, "label": self.label, "bucket": self.bucket}


@dataclass
class Item:
    path: str
    image: Image.Image | None = None
    error: str | None = None
    box: tuple[float, float, float, float] | None = None
    inputs: dict = field(default_factory=dict)  # per stage: its preprocessed input (array or tensor)
    classes: np.ndarray | None = None  # top-k class indices, most probable first
    probs: np.ndarray | None = None
    class_names: list[str] = field(default_factory=list)
    embedding: np.ndarray | None = None
    results: list[Result] = field(default_factory=list)
    candidates: int | None = None  # how many gallery items were searched
    note: str | None = None

"""What every model's raw output becomes, in numpy: unit-length embeddings and top-k classes.

Torch-free, so the torch path and a cache's recorded ONNX exports (models/recorded.py) share one rule each.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from lookalike.models.errors import UserError


@dataclass
class Prediction:
    """Top-k classes of a batch: indices and probabilities [B, k], plus the pooled features [B, D]."""

    classes: np.ndarray
    probs: np.ndarray
    pooled: np.ndarray


def unit_rows(vectors, in_place: bool = False) -> np.ndarray:
    """Rows scaled to unit length, as float32; a zero row stays zero. The one L2 normalisation: of every model output
    (l2_normalize, which first refuses a zero one) and of the sums of stored vectors that re-ranking makes (DBA,
    query expansion: cache/rerank.py), where a sum that cancels out must not fail a build or a query. `in_place`:
    scale a float32 array the caller made for it, not a copy (a fresh 2 GB array costs seconds of page faults)."""
    vectors = np.asarray(vectors, dtype=np.float32)
    norms = np.sqrt(np.einsum("...i,...i->...", vectors, vectors))[..., None]  # no [n, dim] square: 10x np.linalg.norm
    return np.divide(vectors, np.maximum(norms, np.finfo(np.float32).tiny), out=vectors if in_place else None)


def l2_normalize(features, model: str) -> np.ndarray:
    """Unit-length float32 rows of a model's output, the normalisation every embedding goes through (`features` is
    a numpy array or a CPU tensor). UserError when `model` gave a zero or non-finite vector, which no normalisation
    can turn into a meaningful embedding (stored, it would match nothing or everything)."""
    if hasattr(features, "detach"):  # a torch tensor, on any device, in any precision
        features = features.detach().float().cpu().numpy()
    features = np.asarray(features, dtype=np.float32)
    norms = np.linalg.norm(features, axis=-1)
    broken = int((~np.isfinite(norms) | (norms == 0)).sum())
    if broken:
        raise UserError(f"{model}: gave a zero or non-finite embedding for {broken} of {len(features)} images; "
                        "its weights or runtime are broken (try --runtime torch or other weights)")
    return unit_rows(features)


def top_classes(logits, pooled, k: int) -> Prediction:
    """The k most probable classes of each row of `logits` (softmax), most probable first; ties go to the lower
    class index."""
    logits = np.asarray(logits, dtype=np.float32)
    exp = np.exp(logits - logits.max(axis=-1, keepdims=True))
    probs = exp / exp.sum(axis=-1, keepdims=True)
    classes = np.argsort(-probs, axis=-1, kind="stable")[:, :min(k, probs.shape[-1])]
    return Prediction(classes.astype(np.int32), np.take_along_axis(probs, classes, axis=-1).astype(np.float32),
                      np.asarray(pooled, dtype=np.float32))

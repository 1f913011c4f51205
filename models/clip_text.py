"""The text tower of an open_clip model: L2-normalised text embeddings in its image tower's space.

Made from the same spec (same weights) as the cache's CLIP image embedder, so a text and a gallery image
can be compared by cosine. Only open_clip models have a text tower; any other embedder is refused.
"""
from __future__ import annotations

import numpy as np
import torch

from lookalike.models.embedders import load_clip
from lookalike.models.errors import UserError
from lookalike.models.registry import ModelSpec, require_text_tower
from lookalike.models.outputs import l2_normalize
from lookalike.models.runtime import resolve_device

MAX_TEXT_CHARS = 1000  # a longer text is refused; the tokenizer keeps its first 77 tokens anyway


class ClipTextEncoder:
    """open_clip's tokenizer (shipped with the package) and the text tower of the process's one model for `spec`."""

    def __init__(self, spec: ModelSpec, device: str = "auto"):
        import open_clip

        require_text_tower(spec)
        self.spec = spec
        self.device = resolve_device(device)
        model, _, _, _ = load_clip(spec)  # the image embedder's model too: one set of weights in the process
        self.model = model.to(self.device)
        self.tokenizer = open_clip.get_tokenizer(spec.model_id)

    def embed(self, texts: list[str]) -> np.ndarray:
        """One unit vector per text (float32)."""
        for text in texts:
            if not text.strip() or len(text) > MAX_TEXT_CHARS:
                raise UserError(f"text query {text[:40]!r}: give 1 to {MAX_TEXT_CHARS} characters")
        with torch.inference_mode():
            features = self.model.encode_text(self.tokenizer(texts).to(self.device))
        return l2_normalize(features, f"{self.spec.name} (text tower)")

"""The embed stage of a fine-tuned run directory (`--embedder ckpt:RUN_DIR`)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from lookalike.models.onnx_runtime import embed_with, onnx_forward, resolve_runtime
from lookalike.models.registry import ModelSpec
from lookalike.models.run_directory import WEIGHTS_FILE, load_weights, read_run_config, rebuild_net
from lookalike.models.runtime import resolve_device


class CheckpointEmbedder:
    """The embed stage for a fine-tuned run directory (`ckpt:RUN_DIR`)."""

    def __init__(self, run_dir: Path, device: str = "auto", runtime: str = "torch"):
        run_dir = Path(run_dir).expanduser()
        config = read_run_config(run_dir)
        self.weights_path = run_dir / WEIGHTS_FILE
        self.net, self.preprocessing = rebuild_net(run_dir, config)
        self.weights_sha256 = load_weights(self.net, self.weights_path)
        self.device = resolve_device(device)
        self.net = self.net.eval().to(self.device)
        self.model = config["model"]
        self.spec = ModelSpec(name=f"ckpt:{run_dir}", library="checkpoint", model_id=str(run_dir))
        self.transform = self.preprocessing
        self.dim = self.net.dim
        self.onnx = onnx_forward(resolve_runtime(runtime, self.device), self.net, (self.preprocessing.channels, *self.preprocessing.size),
                                 self.describe, logits=(False,), name=self.spec.name)

    def export_record(self) -> None:
        """None: a fine-tuned net's preprocessing is its own, so its queries run in torch (README, Runtimes)."""
        return None

    def embed(self, batch: torch.Tensor) -> np.ndarray:
        return embed_with(self.onnx, lambda inputs: self.net(inputs.to(self.device)), batch, self.spec.name)

    def describe(self) -> dict:
        """What changes an embedding: the network, its preprocessing and the weights' hash (not the path)."""
        return {"library": "checkpoint", "model": self.model, "embedding_size": self.dim,
                "preprocessing": self.preprocessing.describe(),
                "weights_sha256": self.weights_sha256}

"""A cache's recorded ONNX exports as models, without torch: what a query runs when the build checked an export of
every model and recorded it in the manifest (models/onnx_runtime.py `record`).

The manifest is the trust root: an export is used only when the bytes read hash to the recorded sha256, and the
session is made from those very bytes. Preprocessing is the recorded steps run in PIL + numpy
(models/preprocess.py), and outputs go through the same numpy rules as the torch path (models/outputs.py).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from lookalike.models.errors import one_line
from lookalike.models.machine import usable_cpus
from lookalike.models.files import read_hashed
from lookalike.models.onnx_session import export_dir, session_from_bytes
from lookalike.models.outputs import Prediction, l2_normalize, top_classes
from lookalike.models.preprocess import ArrayTransform
from lookalike.models.registry import ModelSpec


class ExportRefused(Exception):
    """A recorded export that cannot be used (missing, changed since the build, unreadable); the query then loads
    the models in torch."""


class RecordedNet:
    """One recorded export in an ONNX Runtime session, with its recorded preprocessing."""

    def __init__(self, record: dict, spec: ModelSpec):
        try:
            path = export_dir() / Path(record["file"]).name
            data, sha256 = read_hashed(path)
            if sha256 != record["sha256"]:
                raise ExportRefused(f"{path} is not the export the cache recorded for {spec.name} (its sha256 differs)")
            self.session = session_from_bytes(data, usable_cpus())
            self.transform = ArrayTransform(record["preprocess"])
        except ExportRefused:
            raise
        except Exception as err:  # noqa: BLE001 - a missing file, a damaged record or session: the torch path answers
            raise ExportRefused(f"the export recorded for {spec.name} cannot be used ({one_line(err)})") from None
        self.spec = spec
        self.record = record
        self.input_name = self.session.get_inputs()[0].name

    def forward(self, batch: np.ndarray) -> list[np.ndarray]:
        return self.session.run(None, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})

    def describe(self) -> dict:
        return {"spec": self.spec.describe(), "export": {key: self.record[key] for key in ("file", "sha256")}}

    def export_record(self) -> dict:
        return self.record


class RecordedClassifier(RecordedNet):
    """A classifier's export: (pooled features, logits) per image, and the class names recorded with it."""

    def __init__(self, record: dict, spec: ModelSpec):
        super().__init__(record, spec)
        self.names = record.get("class_names")
        if not isinstance(self.names, list):
            raise ExportRefused(f"the export recorded for {spec.name} has no class names")

    def predict(self, batch: np.ndarray, k: int) -> Prediction:
        pooled, logits = self.forward(batch)[:2]
        return top_classes(logits, pooled, k)

    def class_name(self, index: int) -> str:
        return str(self.names[int(index)])


class RecordedEmbedder(RecordedNet):
    """An embedder's export: its first output, L2-normalised."""

    def embed(self, batch: np.ndarray) -> np.ndarray:
        return l2_normalize(self.forward(batch)[0], self.spec.name)

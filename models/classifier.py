"""ImageNet classifiers (any timm model): top-k classes with probabilities and readable names."""
from __future__ import annotations

import torch

from lookalike.models.outputs import Prediction, top_classes
from lookalike.models.registry import ModelSpec
from lookalike.models.timm_net import TimmNet, load_timm_net


class Classifier:
    """Predicts ImageNet classes with a timm model and its own preprocessing."""

    def __init__(self, spec: ModelSpec, device: str = "auto", runtime: str = "torch"):
        self.spec = spec
        self.net: TimmNet = load_timm_net(spec, device, runtime)
        self.transform = self.net.transform
        self._info = None
        self._lookup: dict[str, int] | None = None
        if self.net.imagenet_subset:
            from timm.data import ImageNetInfo

            self._info = ImageNetInfo(self.net.imagenet_subset)

    def describe(self) -> dict:
        return self.net.describe()

    def export_record(self) -> dict | None:
        """The net's checked export (models/timm_net.py) plus every class name, so a query needs no timm."""
        record = self.net.export_record()
        return dict(record, class_names=[self.class_name(i) for i in range(self.net.num_classes)]) if record else None

    def predict(self, batch: torch.Tensor, k: int) -> Prediction:
        pooled, logits = self.net.forward(batch)
        return top_classes(logits, pooled, k)

    def class_name(self, index: int) -> str:
        """Readable class name ('airliner'), or the index when the label set is unknown."""
        if self._info is None:
            return str(index)
        return self._info.index_to_description(int(index)).split(",")[0]

    def class_index(self, label: str) -> int | None:
        """The class index for a synset id ('n02690373') or readable name, None when unknown."""
        if self._info is None:
            return int(label) if label.isdigit() else None
        if self._lookup is None:
            self._lookup = {name.split(",")[0].lower(): i for i, name in enumerate(self._info.label_descriptions())}
            self._lookup.update({synset: i for i, synset in enumerate(self._info.label_names())})
        return self._lookup.get(label, self._lookup.get(label.replace("_", " ").lower()))

"""The Stage objects: each takes a batch of Items and returns them enriched. Stages know nothing of each other."""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from lookalike.cache.buckets import bucket_keys
from lookalike.cache.policies import BucketPolicy
from lookalike.cache.search import WHOLE_GALLERY, Searcher
from lookalike.models.detector import choose_box, pad_box
from lookalike.models.errors import one_line
from lookalike.models.outputs import l2_normalize
from lookalike.pipeline.images import MAX_ASPECT
from lookalike.pipeline.items import Item, Result

if TYPE_CHECKING:  # the models: torch ones, or a cache's recorded ONNX exports (models/recorded.py)
    from lookalike.models.classifier import Classifier
    from lookalike.models.detector import Detector
    from lookalike.models.embedders import Embedder

Batch = np.ndarray  # or a torch.Tensor: each model's transform decides


class Stage(ABC):
    """One job over a batch of items."""

    name: str

    @abstractmethod
    def __call__(self, items: list[Item]) -> list[Item]: ...

    def describe(self) -> dict:
        """What this stage does to an image, for cache fingerprints."""
        return {}


class TensorStage(Stage):
    """A stage whose model eats a batch made by its own per-image transform."""

    def __init__(self, name: str, transform: Callable[[Image.Image], Batch], pool: ThreadPoolExecutor):
        self.name = name
        self.transform = transform
        self.pool = pool

    @abstractmethod
    def export_record(self) -> dict | None:
        """This stage's model as a checked ONNX export (models/onnx_runtime.py), or None when it runs in torch."""

    def prepare(self, item: Item) -> None:
        """This stage's input from the item's image (the loader threads make it ahead, from Pipeline.transforms;
        here when a crop made theirs stale)."""
        item.inputs[self.name] = self.transform(item.image)

    def _prepare_or_skip(self, item: Item) -> None:
        try:
            self.prepare(item)
        except Exception as err:  # noqa: BLE001 - one image that cannot be preprocessed is skipped, never the batch
            item.error = f"cannot preprocess ({one_line(err)})"

    def batch(self, items: list[Item]) -> tuple[list[Item], Batch | None]:
        """The items whose input is ready and their stacked batch. Inputs missing (a crop made the loader's copy
        stale) are prepared here; an image whose preprocessing fails gets `error` and is left out."""
        missing = [item for item in items if self.name not in item.inputs]
        list(self.pool.map(self._prepare_or_skip, missing))
        ready = [item for item in items if item.error is None]
        if not ready:
            return ready, None
        inputs = [item.inputs.pop(self.name) for item in ready]
        if isinstance(inputs[0], np.ndarray):
            return ready, np.stack(inputs)
        import torch

        return ready, torch.stack(inputs)


class CropStage(Stage):
    """Replace each image by its large, central detected object (padded); whole image if none."""

    name = "crop"

    def __init__(self, detector: Detector, margin: float):
        self.detector = detector
        self.margin = margin

    def __call__(self, items: list[Item]) -> list[Item]:
        for item, boxes in zip(items, self.detector.detect([item.image for item in items])):
            width, height = item.image.size
            box = choose_box(boxes, width, height)
            if box is not None and _sane(box):
                item.box = pad_box(box, self.margin, width, height)
                item.image = item.image.crop(tuple(round(v) for v in item.box))
            item.inputs.clear()  # anything prepared from the uncropped image is stale
        return items

    def describe(self) -> dict:
        return {"detector": self.detector.describe(), "margin": self.margin}


def _sane(box: tuple[float, float, float, float]) -> bool:
    """A box worth cropping to: at least 2 px a side and no thinner than the images accepted (MAX_ASPECT)."""
    width, height = box[2] - box[0], box[3] - box[1]
    return min(width, height) >= 2 and max(width, height) <= MAX_ASPECT * min(width, height)


class ClassifyStage(TensorStage):
    """Top-k ImageNet classes; with `embed=True` the same forward also gives the embedding."""

    def __init__(self, classifier: Classifier, classes_kept: int, pool: ThreadPoolExecutor, embed: bool = False):
        super().__init__("classify", classifier.transform, pool)
        self.classifier = classifier
        self.classes_kept = classes_kept
        self.embed = embed

    def __call__(self, items: list[Item]) -> list[Item]:
        ready, batch = self.batch(items)
        if batch is None:
            return items
        prediction = self.classifier.predict(batch, self.classes_kept)
        if self.embed:
            embeddings = l2_normalize(prediction.pooled, self.classifier.spec.name)
        for i, item in enumerate(ready):
            item.classes, item.probs = prediction.classes[i], prediction.probs[i]
            item.class_names = [self.classifier.class_name(c) for c in item.classes[:5]]
            if self.embed:
                item.embedding = embeddings[i]
        return items

    def describe(self) -> dict:
        return {"classifier": self.classifier.describe(), "k": self.classes_kept, "embeds": self.embed}

    def export_record(self) -> dict | None:
        return self.classifier.export_record()


class EmbedStage(TensorStage):
    """L2-normalised embeddings."""

    def __init__(self, embedder: Embedder, pool: ThreadPoolExecutor):
        super().__init__("embed", embedder.transform, pool)
        self.embedder = embedder

    def __call__(self, items: list[Item]) -> list[Item]:
        ready, batch = self.batch(items)
        if batch is not None:
            for item, vector in zip(ready, self.embedder.embed(batch)):
                item.embedding = vector
        return items

    def describe(self) -> dict:
        return {"embedder": self.embedder.describe()}

    def export_record(self) -> dict | None:
        return self.embedder.export_record()


class RetrieveStage(Stage):
    """Top-k gallery images for each item's embedding, searching the buckets its policy picks."""

    name = "retrieve"

    def __init__(self, searcher: Searcher, policy: BucketPolicy, k: int, bucket_name: Callable[[int], str]):
        self.searcher = searcher
        self.policy = policy
        self.k = k
        self.bucket_name = bucket_name

    def __call__(self, items: list[Item]) -> list[Item]:
        columns = self.searcher.data.columns
        for item in items:
            hits = self.searcher.search(item.embedding, self.policy, self.k, item.classes, item.probs)
            item.candidates, item.note = hits.candidates, hits.note
            item.results = []
            ranked_by = [None] * len(hits.rows) if hits.rank_scores is None else hits.rank_scores.tolist()
            for rank, (row, score, rank_score) in enumerate(zip(hits.rows, hits.scores, ranked_by), start=1):
                label = str(columns["labels"][row]) or None
                bucket = self._bucket_of(int(row), hits.buckets)
                item.results.append(Result(rank, float(score), str(columns["paths"][row]), label, bucket, int(row),
                                           rank_score))
        return items

    def _bucket_of(self, row: int, searched: list[int]) -> str | None:
        """The searched bucket this gallery image was found in (its own top class for flat search)."""
        data = self.searcher.data
        own = bucket_keys({name: data.columns[name][row:row + 1] for name in ("classes", "label_classes")},
                          data.manifest.bucket_by, self.policy.gallery_classes)[0].tolist()
        if not own:
            return None
        found = [key for key in own if key in searched] if WHOLE_GALLERY not in searched else []
        return self.bucket_name(found[0] if found else own[0])

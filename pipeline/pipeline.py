"""Pipeline: an ordered list of stages run over batches, with image decoding overlapped in threads."""
from __future__ import annotations

import json
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from PIL.Image import Image

from lookalike.cache.policies import parse_policy
from lookalike.cache.search import Searcher
from lookalike.models.errors import UserError, one_line
from lookalike.models.registry import resolve_spec
from lookalike.pipeline.config import PipelineConfig
from lookalike.pipeline.images import DECODE_SIDE, MAX_PIXELS, ImageLoadError, load_image
from lookalike.pipeline.items import Item
from lookalike.pipeline.stages import Batch, ClassifyStage, CropStage, EmbedStage, RetrieveStage, Stage, TensorStage

# How big a JPEG is decoded (recorded in cache fingerprints): without a crop, at least DRAFT_FACTOR x the largest
# model input side (DCT-domain downscale, then the model's own resize); with a crop, at least DECODE_SIDE, so a
# small crop keeps its detail.
DRAFT_FACTOR = 2
DECODE_RULE = f"jpeg draft to {DRAFT_FACTOR}x the model input side; {DECODE_SIDE} with crop"


def fingerprint(description: dict, bucket_by: str) -> dict:
    """Everything that changes a stored embedding, class or bucket, in its JSON form (as stored): build-cache writes
    it, a query checks it (from here, not pipeline.build: a query imports no build and no validation code)."""
    return json.loads(json.dumps({"stages": description, "bucket_by": bucket_by, "decode": DECODE_RULE}))


def _single_threaded_torch() -> None:
    torch = sys.modules.get("torch")  # the torch path imported it before any image is decoded; ONNX queries never do
    if torch is not None:
        torch.set_num_threads(1)


def loader_pool(workers: int) -> ThreadPoolExecutor:
    """Threads that decode and preprocess images. Their torch ops (to tensor, normalise) run on one thread
    each: with torch's default, each loader thread got its own OpenMP team, and the model's batch-1 forward
    in the main thread stayed 2x slower afterwards (35 -> 79 ms for mobilenetv2 on 2 cores; BENCHMARKS.md)."""
    return ThreadPoolExecutor(max(1, workers), initializer=_single_threaded_torch)


def output_shape(transform: Callable[[Image], Batch]) -> tuple[int, ...]:
    """The tensor shape a per-image transform makes, whatever library made it (probed on a tiny image)."""
    from PIL import Image as PILImage

    return tuple(transform(PILImage.new("RGB", (8, 8))).shape)


def decode_side(stages: list[Stage]) -> int:
    """The side a JPEG is decoded at (DECODE_RULE): big photos are never decoded at full size only to shrink."""
    if any(isinstance(stage, CropStage) for stage in stages):
        return DECODE_SIDE
    sides = [max(output_shape(stage.transform)[-2:]) for stage in stages if isinstance(stage, TensorStage)]
    return DRAFT_FACTOR * max(sides) if sides else DECODE_SIDE


def load_item(path: str, root: Path | None, side: int, transforms: dict[str, Callable[[Image], Batch]],
              max_pixels: int = MAX_PIXELS) -> Item:
    """Decode one image and apply the per-image transforms (by stage name); unreadable -> `error` set."""
    item = Item(path)
    try:
        item.image = load_image(root / path if root else path, side, max_pixels)
        for name, transform in transforms.items():
            item.inputs[name] = transform(item.image)
    except ImageLoadError as err:
        item.error = err.reason
    except Exception as err:  # noqa: BLE001 - whatever preprocessing one odd image raises, skip that image
        item.error = f"cannot preprocess ({one_line(err)})"
    return item


class Pipeline:
    """Runs stages in order over batches; batches are decoded ahead while the models work."""

    def __init__(self, stages: list[Stage], batch_size: int = 32, workers: int = 2,
                 pool: ThreadPoolExecutor | None = None):
        self.stages = stages
        self.batch_size = batch_size
        self.pool = pool or loader_pool(workers)
        self.decode_side = decode_side(stages)
        # Per-image preprocessing can run while loading, up to the first stage that changes the image.
        self.transforms: dict[str, Callable] = {}
        for stage in stages:
            if isinstance(stage, CropStage):
                break
            if isinstance(stage, TensorStage):
                self.transforms[stage.name] = stage.transform

    def stage(self, name: str) -> Stage | None:
        return next((s for s in self.stages if s.name == name), None)

    def describe(self) -> dict:
        """What the stages that shape a stored row do (models, weights, preprocessing): the cache fingerprint's core.
        The retrieve stage stores nothing and is left out."""
        return {stage.name: stage.describe() for stage in self.stages if not isinstance(stage, RetrieveStage)}

    def export_records(self) -> dict[str, dict]:
        """Each model stage's checked ONNX export, for the manifest; empty unless every stage has one (a query
        then runs them without torch) and no stage runs only in torch (the crop's detector)."""
        if any(isinstance(stage, CropStage) for stage in self.stages):
            return {}
        records = {stage.name: stage.export_record() for stage in self.stages if isinstance(stage, TensorStage)}
        return records if records and all(records.values()) else {}

    def _load(self, path: str, root: Path | None) -> Item:
        return load_item(path, root, self.decode_side, self.transforms)

    def process(self, items: list[Item]) -> list[Item]:
        """Run the stages over the loaded items (those with an error pass through); drop decoded pixels."""
        run_stages(self.stages, items)
        for item in items:
            item.image = None  # decoded pixels are not needed past the stages
        return items

    def run(self, paths: Iterable[str], root: Path | None = None, prefetch: int = 2,
            on_batch: Callable[[list[Item]], None] | None = None) -> Iterator[Item]:
        """Yield every path's Item in order; unreadable images come back with `error` set."""
        pending: deque[list[Future]] = deque()

        def finish(futures: list[Future]) -> list[Item]:
            items = self.process([f.result() for f in futures])
            if on_batch:
                on_batch(items)
            return items

        batch: list[str] = []
        for path in paths:
            batch.append(path)
            if len(batch) == self.batch_size:
                pending.append([self.pool.submit(self._load, p, root) for p in batch])
                batch = []
                if len(pending) > prefetch:
                    yield from finish(pending.popleft())
        if batch:
            pending.append([self.pool.submit(self._load, p, root) for p in batch])
        while pending:
            yield from finish(pending.popleft())


def run_stages(stages: list[Stage], items: list[Item]) -> list[Item]:
    """Run `stages` in order over the items without an error; an item a stage marks with `error` (an image that
    cannot be preprocessed) leaves the batch, the rest go on. Returns the items given."""
    good = [item for item in items if item.error is None]
    for stage in stages:
        if not good:
            break
        good = [item for item in stage(good) if item.error is None]
    return items


def _query_policy(config: PipelineConfig, searcher: Searcher | None):
    """The parsed bucket policy when the pipeline retrieves (parsed before any model loads), else None."""
    policy = parse_policy(config.buckets) if searcher is not None else None
    if policy is not None and policy.uses_buckets and not config.uses_classifier:
        raise UserError(f"bucket policy '{config.buckets}' needs a classifier; use --buckets flat")
    return policy


def _assemble(config: PipelineConfig, searcher: Searcher | None, policy, pool: ThreadPoolExecutor,
              make_classifier: Callable, make_embedder: Callable, crop: list[Stage]) -> Pipeline:
    """Crop stages, then classify -> embed (one forward for both when they name the same model) -> retrieve."""
    stages = list(crop)
    embed_spec = resolve_spec(config.embedder, "embedder")
    classifier = None
    if config.uses_classifier:
        classifier_spec = resolve_spec(config.classifier, "classifier")
        classifier = make_classifier(classifier_spec)
        stages.append(ClassifyStage(classifier, config.class_topk, pool, embed=classifier_spec == embed_spec))
    if classifier is None or classifier.spec != embed_spec:
        stages.append(EmbedStage(make_embedder(embed_spec), pool))
    if searcher is not None:
        names = searcher.data.manifest.class_names
        stages.append(RetrieveStage(searcher, policy, config.k,
                                    lambda key: names.get(str(key), classifier.class_name(key)
                                                          if classifier else str(key))))
    return Pipeline(stages, config.batch_size, config.workers, pool)


def build_pipeline(config: PipelineConfig, searcher: Searcher | None = None) -> Pipeline:
    """Crop -> classify -> embed (-> retrieve when a searcher is given), from one config, with the models in torch
    (or ONNX Runtime, checked against torch: `config.runtime`)."""
    from lookalike.models.classifier import Classifier
    from lookalike.models.detector import Detector
    from lookalike.models.embedders import create_embedder

    policy = _query_policy(config, searcher)
    crop = [CropStage(Detector(resolve_spec(config.detector, "detector"), config.device, config.crop_confidence),
                      config.crop_margin)] if config.crop else []
    return _assemble(config, searcher, policy, loader_pool(config.workers),
                     lambda spec: Classifier(spec, config.device, config.runtime),
                     lambda spec: create_embedder(spec, config.device, config.runtime), crop)


def recorded_pipeline(config: PipelineConfig, searcher: Searcher) -> Pipeline:
    """The cache's models as the ONNX exports its build checked and recorded (Manifest.exports), with a retrieve
    stage: no torch. ExportRefused when any of them cannot be used as recorded."""
    from lookalike.models.recorded import ExportRefused, RecordedClassifier, RecordedEmbedder

    exports = searcher.data.manifest.exports
    policy = _query_policy(config, searcher)

    def recorded(kind: str, make: Callable) -> Callable:
        def load(spec):
            if kind not in exports:
                raise ExportRefused(f"the cache records no export for its {kind} stage")
            return make(exports[kind], spec)

        return load

    return _assemble(config, searcher, policy, loader_pool(config.workers), recorded("classify", RecordedClassifier),
                     recorded("embed", RecordedEmbedder), crop=[])

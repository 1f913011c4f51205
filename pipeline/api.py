"""The public Python API: `lookalike.build`, `lookalike.open` and the typed answers they give.

cli.py and `serve` call these same functions, so a script, the command line and the web page take one path.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Union

import numpy as np
from PIL import Image

from lookalike.cache.indexes import DEFAULT_MEMORY
from lookalike.cache.milvus import ExportReport, MilvusTarget, export
from lookalike.cache.store import CacheData, load_cache
from lookalike.models.errors import UserError
from lookalike.pipeline.config import PipelineConfig
from lookalike.pipeline.duplicates import DuplicateReport, cache_duplicates
from lookalike.pipeline.images import MAX_PIXELS, ImageLoadError, image_in_memory, load_image
from lookalike.pipeline.items import Item, Result
from lookalike.pipeline.pipeline import load_item
from lookalike.pipeline.session import QuerySession, query_policy

if TYPE_CHECKING:  # a query imports no build code (nor, through it, auto's validation)
    from lookalike.pipeline.build import BuildReport, Progress

# A query image: a file path, the file's bytes, a PIL image, or an HxWx3 uint8 RGB array.
ImageInput = Union[str, Path, bytes, Image.Image, np.ndarray]
PREDICTIONS_SHOWN = 5  # classes an answer lists


@dataclass(frozen=True)
class Prediction:
    """A class the classifier predicted for a query image."""

    index: int  # the classifier's class index
    name: str
    prob: float

    def to_json(self) -> dict:
        return {"class": self.index, "name": self.name, "prob": round(self.prob, 6)}


@dataclass
class Answer:
    """One query's answer. Each result's `path` is relative to `gallery_root`; its `score` is the cosine similarity,
    and `rank_score` what a `fused` policy ranked by (None otherwise)."""

    query: str  # the query's path, or a name for an image given in memory
    gallery_root: Path
    policy: str  # the bucket policy searched (the cache's own choice when the query named none)
    results: list[Result] = field(default_factory=list)
    predicted: list[Prediction] = field(default_factory=list)  # most probable first
    candidates: int | None = None  # gallery images compared
    note: str | None = None  # e.g. an empty bucket that fell back to flat search
    error: str | None = None  # why this query image could not be used (then there are no results)

    @classmethod
    def of(cls, item: Item, gallery_root: Path, policy: str) -> Answer:
        predicted = [] if item.classes is None else [
            Prediction(int(index), name, float(prob)) for index, name, prob in
            zip(item.classes[:PREDICTIONS_SHOWN], item.class_names[:PREDICTIONS_SHOWN], item.probs[:PREDICTIONS_SHOWN])]
        return cls(item.path, gallery_root, policy, list(item.results), predicted, item.candidates, item.note,
                   item.error)

    def to_json(self, absolute_paths: bool = True) -> dict:
        """What `query --json` prints for this query: result paths joined to the gallery root, or left relative to it
        (serve's default: no path of the machine leaves it)."""
        return {"query": self.query, "predicted": [p.to_json() for p in self.predicted], "buckets": self.policy,
                "candidates": self.candidates, "note": self.note,
                "results": [dict(r.to_dict(), path=str(self.gallery_root / r.path)) if absolute_paths else r.to_dict()
                            for r in self.results]}


def _is_one(images) -> bool:
    return isinstance(images, (str, Path, bytes, Image.Image, np.ndarray))


def _known_options(where: str, options: dict) -> None:
    unknown = sorted(set(options) - {f.name for f in fields(PipelineConfig)})
    if unknown:
        raise UserError(f"{where}: unknown option {', '.join(unknown)} (options: "
                        f"{', '.join(f.name for f in fields(PipelineConfig))})")


class Index:
    """A cache opened for queries. The cache is read here; its image models load at the first image query (or
    `load()`), once, and serve every query after it; rows and texts need none (a text loads CLIP's text tower only).
    Queries from several threads are safe. With `milvus` the rows are searched in that Milvus collection."""

    def __init__(self, cache_dir: str | Path, milvus: MilvusTarget | None = None, **options):
        _known_options("lookalike.open", options)
        self.data: CacheData = load_cache(cache_dir)
        self.session = QuerySession(self.data, options, milvus)

    def load(self) -> Index:
        """Load the image models now (a server does, before its first request); a pipeline other than the cache's
        (other weights, say) is refused here."""
        _ = self.session.pipeline
        return self

    def limit_preparation(self, seconds: float) -> Index:
        """Refuse, rather than queue, a query whose policy needs a new DBA matrix: while another query makes one it
        raises PreparationBusy, and when making it would take over `seconds` on this gallery, UserError. A server's
        guard against one client's policies stalling the rest; a script leaves it unset and waits."""
        self.session.searcher.prepare_budget_s = seconds
        return self

    def __len__(self) -> int:
        return len(self.data)

    @property
    def gallery_root(self) -> Path:
        return self.data.gallery_root

    @property
    def info(self) -> dict:
        """What the cache holds and how it was made: gallery size and root, models, default policy, fingerprint."""
        manifest = self.data.manifest
        return {"gallery_images": len(self), "gallery_root": str(self.gallery_root),
                "pipeline": {name: manifest.config.get(name) for name in ("classifier", "embedder", "crop")},
                "policy": manifest.default_policy, "built": manifest.built, "fingerprint": manifest.fingerprint}

    def query(self, images: ImageInput | Sequence[ImageInput], k: int | None = 5, buckets: str | None = None,
              max_pixels: int = MAX_PIXELS) -> Answer | list[Answer]:
        """The k most similar gallery images to an image, or to each of several (then a list comes back).
        `buckets` is a bucket policy (default: the cache's own choice). One unusable image raises ImageLoadError;
        in a list, its Answer carries the `error` instead. Images over `max_pixels` are refused from their header."""
        query_policy(self.data, buckets, k)  # a bad policy or k fails before the models load
        one = _is_one(images)
        inputs = [images] if one else list(images)
        session = self.session
        answers = []
        for start in range(0, len(inputs), session.config.batch_size):
            chunk = inputs[start:start + session.config.batch_size]
            items = list(session.pipeline.pool.map(lambda pair: self._item(*pair, max_pixels, raising=one),
                                                   enumerate(chunk, start)))
            items, used = session.images(items, buckets, k)
            answers += [Answer.of(item, self.gallery_root, used) for item in items]
            for item in items:
                item.image = None  # decoded pixels are not needed past the stages
        if one and answers[0].error:
            raise ImageLoadError(answers[0].query, answers[0].error)
        return answers[0] if one else answers

    def _item(self, number: int, image: ImageInput, max_pixels: int, raising: bool) -> Item:
        """A query image decoded (and preprocessed, from a file) as the pipeline decodes gallery files."""
        pipeline = self.session.pipeline
        if isinstance(image, (str, Path)):
            return load_item(str(image), None, pipeline.decode_side, pipeline.transforms, max_pixels)
        name = f"image {number}" if not isinstance(image, bytes) else f"bytes {number}"
        try:
            if isinstance(image, bytes):
                return Item(name, image=load_image(image, pipeline.decode_side, max_pixels, name=name))
            if isinstance(image, (Image.Image, np.ndarray)):
                return Item(name, image=image_in_memory(image, name, max_pixels))
            raise ImageLoadError(name, f"a query image is a path, bytes, a PIL image or an array, not "
                                       f"{type(image).__name__}")
        except ImageLoadError as err:
            if raising:
                raise
            return Item(name, error=err.reason)

    def query_text(self, texts: str | Sequence[str], k: int | None = 5) -> Answer | list[Answer]:
        """Gallery images for a text, or each of several, through a CLIP cache's text tower (UserError for other
        embedders). Texts search the whole gallery."""
        one = isinstance(texts, str)
        items, used = self.session.texts([texts] if one else list(texts), k)
        answers = [Answer.of(item, self.gallery_root, used) for item in items]
        return answers[0] if one else answers

    def more_like(self, row: int, k: int | None = 5, buckets: str | None = None) -> Answer:
        """Gallery row `row` as the query, from its stored embedding and classes (it finds itself first)."""
        query_policy(self.data, buckets, k)
        item, used = self.session.row(row, buckets, k)
        return Answer.of(item, self.gallery_root, used)

    def duplicates(self, threshold: float | None = None) -> DuplicateReport:
        """Groups of near-duplicate gallery images, from the stored embeddings (no model runs)."""
        return cache_duplicates(self.data, threshold)


def open(cache_dir: str | Path, milvus: MilvusTarget | None = None, **options) -> Index:  # noqa: A001 - as PIL names it
    """A cache for queries. `options` are query-time pipeline settings (runtime, device, batch_size); a model
    setting that differs from the cache's is refused. With `milvus` (written by `export_milvus`) its rows are searched
    there; the cache still gives the pipeline, the policies and the rows re-ranking reads."""
    return Index(cache_dir, milvus, **options)


def export_milvus(cache_dir: str | Path, target: MilvusTarget, replace: bool = False, index_type: str = "FLAT",
                  progress: Progress | None = None) -> ExportReport:
    """Write the cache's rows to a Milvus collection (resumable; repeating it writes nothing). A collection of
    another pipeline is refused unless `replace`."""
    return export(load_cache(cache_dir), target, replace, index_type, progress)


def build(gallery: str | Path, out: str | Path, *, classifier: str = PipelineConfig.classifier,
          embedder: str = PipelineConfig.embedder, crop: bool = False, labels: str | Path | None = None,
          bucket_by: str = "classifier", rebuild: bool = False, progress: Progress | None = None,
          engine: str = "local", ray_address: str | None = None, index: str = "auto",
          index_memory: str = DEFAULT_MEMORY, float16: bool = False, exact_max_rows: int | None = None,
          **options) -> BuildReport:
    """Build or update the cache `out` over the images under `gallery` (resumable, incremental).

    `labels` is a JSON {"file": "label"} map for a flat gallery (folder names are labels otherwise); `progress` is
    called with (embedded, total) after each batch; `index` (auto, exact, ivf, ivfpq[:MEMORY]) and `index_memory`
    choose the gallery index for large searches (cache/indexes.py); `float16` stores the vectors in half the space;
    `exact_max_rows` is where the large-gallery path starts (default 32,768; lower forces it on a small set);
    `options` are further pipeline settings (runtime, device, batch_size, detector, ...). Unreadable images are
    skipped and listed in the report; when nothing changed the cache is kept as it is (`report.unchanged`)."""
    from lookalike.pipeline.build import build_cache
    from lookalike.pipeline.engines import create_engine

    _known_options("lookalike.build", options)
    config = PipelineConfig(classifier=classifier, embedder=embedder, crop=crop, **options)
    return build_cache(gallery, out, config, labels, bucket_by, rebuild, progress=progress,
                       engine=create_engine(engine, config, ray_address), index=index, index_memory=index_memory,
                       float16=float16, exact_max_rows=exact_max_rows)

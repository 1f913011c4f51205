"""build-cache: embed a gallery into a cache, resuming an interrupted build and updating incrementally.

An image is embedded again only when it is new or its (size, mtime) changed; rows of deleted images are
dropped. Embedded rows are saved in chunks (every CHUNK_ROWS images or CHUNK_SECONDS, and on Ctrl-C), so an
interruption loses at most the batch in flight. The new generation is written by streaming the previous one
and the pending chunks through memory-mapped reads: one copy of the embedding matrix is never held.
"""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Protocol

import numpy as np

from lookalike.cache import rerank
from lookalike.cache.autopolicy import choose_policy
from lookalike.cache.buckets import bucket_keys
from lookalike.cache.columns import COLUMNS, DBA_COLUMN, WHITE_COLUMN, empty_columns
from lookalike.cache.generations import write_generation
from lookalike.cache.indexes import (DEFAULT_MEMORY, EXACT_MAX_ROWS, RECORD_FILE, GalleryIndex, factory_key,
                                    ivf_lists, make_gallery_index, make_index, open_gallery_index, parse_index)
from lookalike.cache.lock import BuildLock
from lookalike.cache.manifest import BUCKET_BY, FORMAT_VERSION, CacheError, Manifest, refuse_other_pipeline
from lookalike.cache.mapped import StackedRows, take_rows
from lookalike.cache.pending import PendingChunks
from lookalike.cache.store import CacheData, load_cache
from lookalike.cache.whitening import fit_whitening, whiten
from lookalike.models.errors import UserError
from lookalike.pipeline.config import PipelineConfig
from lookalike.pipeline.gallery import GalleryEntry, scan_gallery
from lookalike.pipeline.items import Item
from lookalike.pipeline.pipeline import Pipeline, build_pipeline, fingerprint

CHUNK_ROWS = 256  # embedded rows saved together (the most a crash can lose)
CHUNK_SECONDS = 30.0  # ... or after this long, for slow models

Progress = Callable[[int, int], None]  # called with (images embedded so far, images to embed) after each batch


class ProgressBar:
    """A Progress drawn as a tqdm bar on stderr (the command line's); use it `with`, so an interrupted build ends its
    line before the next message."""

    def __init__(self, desc: str = "embedding"):
        self.desc = desc
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        from tqdm import tqdm

        self.bar = self.bar or tqdm(total=total, desc=self.desc, unit="img")
        self.bar.update(done - self.bar.n)
        if done >= total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Engine(Protocol):
    """What embeds a build's images: the local Pipeline, or a distributed engine with the same contract
    (pipeline/engines/). Its `pipeline` is a local copy of the models, used for class names only."""

    pipeline: Pipeline

    def describe(self) -> dict:
        """The stages' description (the cache fingerprint's part that names models and preprocessing)."""

    def run(self, paths: list[str], root: Path, on_batch: Callable[[list[Item]], None]) -> None:
        """Deliver every path exactly once to `on_batch`, embedded or with `error` set."""


class LocalEngine:
    """The pipeline in this process, decoding in its loader threads."""

    def __init__(self, pipeline: Pipeline):
        self.pipeline = pipeline

    def describe(self) -> dict:
        return self.pipeline.describe()

    def run(self, paths: list[str], root: Path, on_batch: Callable[[list[Item]], None]) -> None:
        for _ in self.pipeline.run(paths, root=root, on_batch=on_batch):
            pass


@dataclass
class BuildReport:
    """What a build did: images in the cache, embedded now, reused from before, removed, skipped (with reasons)."""

    images: int = 0
    embedded: int = 0
    reused: int = 0
    removed: int = 0
    buckets: int = 0
    seconds: float = 0.0
    skipped: list[dict] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)  # seconds: embed, choose_policy, publish, index
    index: dict | None = None  # the gallery index made (cache/indexes.IndexRecord), None for exact search
    auto_path: str | None = None  # how `auto` was validated: "exact" score matrices or "search path" (large galleries)
    unchanged: bool = False  # nothing to do: the previous generation was kept as it was

    @property
    def images_per_s(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        index = (f", index {self.index['key']} (nprobe {self.index['nprobe']}, {self.index['candidates']} candidates, "
                 f"recall@5 {self.index['recall_at_5']:.3f})" if self.index else "")
        return (f"{self.images} images in cache ({self.embedded} embedded, {self.reused} reused, "
                f"{self.removed} removed), {self.buckets} buckets, {len(self.skipped)} skipped{index}, "
                f"{self.seconds:.1f} s" + (f", {self.images_per_s:.1f} images/s" if self.embedded else "")
                + ("; unchanged: the cache is kept as it was (build-cache --rebuild makes it anew)"
                   if self.unchanged else ""))


def _row_columns(items: list[Item], labels: dict[str, str | None], stats: dict[str, os.stat_result],
                 topk: int) -> dict[str, np.ndarray]:
    columns = empty_columns(len(items[0].embedding), topk)
    columns.update(
        paths=np.array([item.path for item in items]),
        sizes=np.array([stats[item.path].st_size for item in items], np.int64),
        mtimes=np.array([stats[item.path].st_mtime_ns for item in items], np.int64),
        labels=np.array([labels[item.path] or "" for item in items]),
        label_classes=np.full(len(items), -1, np.int32),
        boxes=np.array([item.box or (np.nan,) * 4 for item in items], np.float32),
        embeddings=np.stack([item.embedding for item in items]).astype(np.float32),
    )
    if topk:
        columns.update(classes=np.stack([item.classes for item in items]).astype(np.int32),
                       probs=np.stack([item.probs for item in items]).astype(np.float32))
    else:
        columns.update(classes=np.zeros((len(items), 0), np.int32), probs=np.zeros((len(items), 0), np.float32))
    return columns


def _label_classes(labels: np.ndarray, pipeline: Pipeline, cache: Path) -> np.ndarray:
    """Classifier class index of each folder label, for `--bucket-by label`."""
    stage = pipeline.stage("classify")
    if stage is None:
        raise CacheError(f"{cache}: --bucket-by label needs a classifier")
    lookup = {label: stage.classifier.class_index(label) for label in set(labels.tolist())}
    unknown = sorted(label for label, index in lookup.items() if index is None)
    if unknown:
        raise CacheError(f"{cache}: --bucket-by label needs labels that are the classifier's classes "
                         f"(synset ids or class names); unknown: {', '.join(unknown[:5])}"
                         + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""))
    return np.array([lookup[label] for label in labels.tolist()], np.int32)


class ChunkWriter:
    """Collects embedded items and saves them as pending chunks by size or by time; flush() saves the rest."""

    def __init__(self, pending: PendingChunks, labels: dict[str, str | None], stats: dict[str, os.stat_result],
                 topk: int):
        self.pending, self.labels, self.stats, self.topk = pending, labels, stats, topk
        self.items: list[Item] = []
        self.saved_at = time.monotonic()

    def add(self, items: list[Item]) -> None:
        self.items.extend(items)
        if len(self.items) >= CHUNK_ROWS or time.monotonic() - self.saved_at >= CHUNK_SECONDS:
            self.flush()

    def flush(self) -> None:
        if self.items:
            self.pending.append(_row_columns(self.items, self.labels, self.stats, self.topk))
            self.items = []
        self.saved_at = time.monotonic()


def _embed_missing(engine: Engine, todo: list[str], gallery: Path, writer: ChunkWriter, summary: BuildReport,
                   progress: Progress | None) -> None:
    """Embed `todo` into pending chunks; on any interruption the finished items are saved first."""
    done = 0

    def on_batch(items: list[Item]) -> None:
        nonlocal done
        writer.add([item for item in items if item.error is None])
        summary.skipped.extend({"path": item.path, "reason": item.error} for item in items if item.error)
        done += len(items)
        if progress:
            progress(done, len(todo))

    try:
        engine.run(todo, gallery, on_batch)
    finally:
        writer.flush()  # Ctrl-C included: what was embedded is kept for the next run


def merge_rows(previous: CacheData | None, chunks: list[dict[str, np.ndarray]],
               entries: list[GalleryEntry]) -> tuple[dict[str, np.ndarray | StackedRows], int]:
    """Every current gallery image's newest row (pending chunks win over the previous generation), in gallery
    order, without copying the embedding matrix: (columns with embeddings as StackedRows, rows kept)."""
    parts = ([previous.columns] if previous else []) + chunks
    if not parts:
        return {}, 0
    latest = {}
    offset = 0
    for part in parts:
        for row, path in enumerate(part["paths"].tolist()):
            latest[path] = offset + row
        offset += len(part["paths"])
    rows = np.array([latest[e.relpath] for e in entries if e.relpath in latest], np.int64)
    columns: dict[str, np.ndarray | StackedRows] = {
        name: np.concatenate([np.asarray(p[name]) for p in parts])[rows] for name in COLUMNS if name != "embeddings"}
    columns["embeddings"] = StackedRows([p["embeddings"] for p in parts], rows)
    return columns, len(rows)


def build_cache(gallery: str | Path, out: str | Path, config: PipelineConfig, labels_file: str | Path | None = None,
                bucket_by: str = "classifier", rebuild: bool = False, progress: Progress | None = None,
                pipeline: Pipeline | None = None, engine: Engine | None = None, index: str = "auto",
                index_memory: str = DEFAULT_MEMORY, float16: bool = False,
                exact_max_rows: int | None = None) -> BuildReport:
    """Create or update the cache at `out` for the images under `gallery` (one build per `out` at a time), with the
    gallery index `index` chooses under `index_memory` (cache/indexes.py), and the vectors stored as float16 when
    asked (half the disk and page cache). Above `exact_max_rows` images (default EXACT_MAX_ROWS) `auto` is validated
    through the search path and DBA made from an approximate k-NN graph, as searches then take an index's
    candidates: set lower, it forces that large-gallery path on a small set."""
    started = time.perf_counter()
    gallery, out = Path(gallery).resolve(), Path(out)
    index_kind, memory = parse_index(index, index_memory)
    if bucket_by not in BUCKET_BY:
        raise CacheError(f"--bucket-by {bucket_by}: use {' or '.join(BUCKET_BY)}")
    entries, skipped = scan_gallery(gallery, labels_file)
    pipeline = pipeline or (engine.pipeline if engine else build_pipeline(config))
    engine = engine or LocalEngine(pipeline)
    wanted = fingerprint(engine.describe(), bucket_by)
    with BuildLock(out):
        previous: CacheData | None = None
        if (out / "CURRENT").is_file() and not rebuild:
            previous = load_cache(out)
            refuse_other_pipeline(previous.manifest, wanted, out)
        pending = PendingChunks(out, wanted)
        resumed, first_new = pending.load(), pending.count
        todo, stats, labels, summary = _new_or_changed(gallery, entries, skipped, previous, resumed)
        topk = config.class_topk if config.uses_classifier else 0
        embedding_started = time.perf_counter()
        _embed_missing(engine, todo, gallery, ChunkWriter(pending, labels, stats, topk), summary, progress)
        summary.phases["embed"] = time.perf_counter() - embedding_started
        summary.embedded = len(todo) - (len(summary.skipped) - len(skipped))
        settings = BuildSettings(wanted, config.cache_part(), str(gallery), bucket_by, exact_max_rows,
                                 str(labels_file) if labels_file else None)
        if previous is not None and not resumed and _unchanged(previous, summary, labels, settings, float16,
                                                               index_kind, memory):
            pending.clear()
            summary.unchanged = True
            summary.index = _index_record(previous.generation)
            return _finished(summary, previous.columns, previous.manifest.count, bucket_by, topk, started)

        columns, count = merge_rows(previous, resumed + pending.load(first=first_new), entries)
        if count == 0:
            raise CacheError(f"{gallery}: no usable images ({len(summary.skipped)} skipped)")
        # the index key: an impossible budget is refused before anything is published
        indexed = factory_key(index_kind, count, columns["embeddings"].shape[1], memory)
        columns["labels"] = np.array([labels[p] or "" for p in columns["paths"].tolist()])
        if bucket_by == "label":
            columns["label_classes"] = _label_classes(columns["labels"], pipeline, out)
        choosing = bool(topk) and bucket_by == "classifier"
        large = count > (exact_max_rows or EXACT_MAX_ROWS)
        # auto's validation of a large gallery searches every row: gathered in memory once, for it and the index; the
        # index alone reads the rows where they are (10^7 rows of 512 dimensions gathered would take 20 GB)
        vectors = take_rows(columns["embeddings"], np.arange(count)) if choosing and large else None
        gallery_index = (_made_index(columns["embeddings"] if vectors is None else vectors, index_kind, memory, summary)
                         if indexed else None)
        default_policy, fused_weight, dba, whitening, white_index = "flat", None, None, None, None
        if choosing:
            default_policy, fused_weight, dba, whitening, white_index = _choose_auto(
                columns, count, summary, exact_max_rows or EXACT_MAX_ROWS, vectors, gallery_index)
        del vectors  # 2 GB at 10^6 rows of 512 dimensions: not held while the generation is written
        manifest = Manifest(
            **asdict(settings), count=count, dim=int(columns["embeddings"].shape[1]),
            class_names=_class_names(columns, pipeline, bucket_by), default_policy=default_policy,
            fused_weight=fused_weight, dba=dba, whitening=whitening is not None,
            skipped=summary.skipped, exports=_exports(pipeline, previous, summary),
            built=time.strftime("%Y-%m-%dT%H:%M:%S"))
        generation = write_generation(out, manifest, columns, np.float16 if float16 else np.float32, whitening,
                                      gallery_index, white_index)
        pending.clear()
        summary.phases["publish"] = time.perf_counter() - started - sum(summary.phases.values())
        summary.index = _index_record(generation)
    return _finished(summary, columns, count, bucket_by, topk, started)


def _finished(summary: BuildReport, columns: dict, count: int, bucket_by: str, topk: int,
              started: float) -> BuildReport:
    """The report completed with the cache's size, its buckets and the build's seconds."""
    summary.images = count
    summary.buckets = len(np.unique(bucket_keys(columns, bucket_by)[:, :1])) if topk else 0
    summary.seconds = time.perf_counter() - started
    return summary


def _index_record(generation: Path) -> dict | None:
    """The IndexRecord of a generation's gallery index as the report shows it; None without one."""
    record = generation / RECORD_FILE
    return json.loads(record.read_text()) if record.is_file() else None


@dataclass(frozen=True)
class BuildSettings:
    """The manifest fields a build takes from its arguments (Manifest's names), as opposed to its rows and its
    choice of `auto`."""

    fingerprint: dict
    config: dict
    gallery_root: str
    bucket_by: str
    exact_max_rows: int | None
    labels_file: str | None


def _unchanged(previous: CacheData, summary: BuildReport, labels: dict[str, str | None], settings: BuildSettings,
               float16: bool, index_kind: str, memory: int) -> bool:
    """Whether the previous generation is what this build would write: no image embedded or removed, the same
    labels, skipped files, settings and vector type, an index of the same kind that opens. It is then kept, and
    `auto` not validated again (about a minute at 10^6 rows); --rebuild makes it anew."""
    manifest = previous.manifest
    if summary.embedded or summary.removed or manifest.format_version != FORMAT_VERSION:
        return False
    stored = BuildSettings(**{f.name: getattr(manifest, f.name) for f in fields(BuildSettings)})
    if (_as_json(stored) != _as_json(settings) or _skips(manifest.skipped) != _skips(summary.skipped)
            or (previous.columns["embeddings"].dtype == np.float16) != float16):
        return False
    if [labels.get(path) or "" for path in previous.columns["paths"].tolist()] != previous.columns["labels"].tolist():
        return False
    try:
        kept_index = open_gallery_index(previous.generation, manifest.count, manifest.dim)
    except UserError:  # damaged: made again
        return False
    key = kept_index.record.key if kept_index else None
    return key == factory_key(index_kind, manifest.count, manifest.dim, memory)


def _as_json(settings: BuildSettings) -> str:
    """`settings` as the manifest stores them (JSON: tuples read back as lists)."""
    return json.dumps(asdict(settings), sort_keys=True)


def _skips(skipped: list) -> list[str]:
    """The skipped files' entries in one order, each as JSON: any manifest's entries compare (a planted one too)."""
    return sorted(json.dumps(item, sort_keys=True) for item in skipped)


def _made_index(vectors: np.ndarray | StackedRows, kind: str, memory: int, summary: BuildReport) -> GalleryIndex:
    """The gallery index (cache/indexes.py) of the rows, made and tuned before `auto` is chosen: above exact_max_rows
    the validation searches through it, as the cache's queries will, and the DBA's k-NN graph reads it (one index
    where a build made three); published with the generation."""
    started = time.perf_counter()
    gallery_index = make_gallery_index(vectors, kind, memory)
    summary.phases["index"] = time.perf_counter() - started
    return gallery_index


def _new_or_changed(gallery: Path, entries: list[GalleryEntry], skipped: list, previous: CacheData | None,
                    resumed: list[dict[str, np.ndarray]]) -> tuple[list[str], dict, dict[str, str], BuildReport]:
    """The images to embed: those whose (size, mtime) no row of the previous generation or of the resumed chunks
    has; with every image's stat and label, and the build's report so far (reused, skipped, removed)."""
    known: dict[str, tuple[int, int]] = {}
    for part in ([previous.columns] if previous else []) + resumed:
        known.update(zip(part["paths"].tolist(), zip(part["sizes"].tolist(), part["mtimes"].tolist())))
    stats = {e.relpath: (gallery / e.relpath).stat() for e in entries}
    labels = {e.relpath: e.label for e in entries}
    todo = [e.relpath for e in entries
            if known.get(e.relpath) != (stats[e.relpath].st_size, stats[e.relpath].st_mtime_ns)]
    summary = BuildReport(reused=len(entries) - len(todo), skipped=list(skipped))
    summary.removed = len(set(known) - set(labels)) if previous else 0
    return todo, stats, labels, summary


def _choose_auto(columns: dict, count: int, summary: BuildReport, exact_max_rows: int, vectors: np.ndarray | None,
                 gallery_index: GalleryIndex | None) -> tuple[str, float | None, list | None, np.ndarray | None,
                                                              object | None]:
    """What `--buckets auto` means for this gallery, chosen on its labelled images (flat without labels): (default
    policy, fused weight, DBA, whitening, the IVF index of the whitened rows); the DBA and whitened vectors the choice
    uses are added to `columns`. Above `exact_max_rows` the validation searches every row (pooled_scores) through the
    gallery index, so `vectors` holds them gathered in memory for it, the whitening and the DBA; a +white choice
    there searches an IVF index of the whitened rows, made here (its DBA graph reads it) and published with them: a
    query process on a read-only cache of 10^6 rows made it again, 10 s, at its first search."""
    started = time.perf_counter()
    large = count > exact_max_rows
    chosen = choose_policy({**columns, "embeddings": vectors} if large else columns, exact_max_rows=exact_max_rows,
                           gallery_index=gallery_index)
    default_policy = str(chosen) if chosen else "flat"
    fused_weight = chosen.weight if chosen and chosen.kind == "fused" else None
    dba = whitening = white_index = None
    if chosen and (chosen.dba or chosen.white):  # stored beside the embeddings: a query needs no k-NN pass nor fit
        vectors = vectors if vectors is not None else take_rows(columns["embeddings"], np.arange(count))
        graph_index = gallery_index.flat_index if gallery_index and not chosen.white else None
        if chosen.white:
            whitening = fit_whitening(vectors, columns["labels"])
            vectors = columns[WHITE_COLUMN] = whiten(vectors, whitening)
            graph_index = white_index = make_index(vectors, f"IVF{ivf_lists(count)},Flat") if large else None
        if chosen.dba:
            dba = list(chosen.dba)
            truth = gallery_index.truth if gallery_index and not chosen.white else None  # of the plain rows
            columns[DBA_COLUMN] = rerank.dba(vectors, *chosen.dba, exact_max_rows=exact_max_rows, index=graph_index,
                                             truth=truth)
    summary.phases["choose_policy"] = time.perf_counter() - started
    summary.auto_path = "search path, approximate k-NN graph" if large else "exact"
    return default_policy, fused_weight, dba, whitening, white_index


def _exports(pipeline: Pipeline, previous: CacheData | None, summary: BuildReport) -> dict[str, dict]:
    """The checked ONNX exports that embedded this build's rows; the previous generation's when none were embedded
    (no model ran, so none was checked)."""
    if summary.embedded == 0 and previous is not None:
        return previous.manifest.exports
    return pipeline.export_records()


def _class_names(columns: dict, pipeline: Pipeline, bucket_by: str) -> dict[str, str]:
    """Readable names of every class that can name a bucket in this cache."""
    stage = pipeline.stage("classify")
    if stage is None:
        return {}
    keys = np.unique(columns["label_classes"] if bucket_by == "label" else columns["classes"])
    return {str(int(key)): stage.classifier.class_name(int(key)) for key in keys}

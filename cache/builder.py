"""build-cache: embed a gallery into a cache, resuming an interrupted build and updating incrementally.

An image is embedded again only when it is new or its (size, mtime) changed; rows of deleted
images are dropped. Progress is saved in chunks, so an interrupted build loses at most one chunk.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cache.gallery import GalleryEntry, scan_gallery
from cache.store import CacheData, CacheError, PendingChunks, concat_columns, empty_columns, load_cache, \
    select_rows, write_generation
from pipeline.config import PipelineConfig
from pipeline.fusion import choose_policy
from pipeline.items import Item
from pipeline.pipeline import DECODE_RULE, Pipeline, build_pipeline


@dataclass
class BuildSummary:
    images: int = 0
    embedded: int = 0
    reused: int = 0
    removed: int = 0
    buckets: int = 0
    seconds: float = 0.0
    skipped: list[dict] = field(default_factory=list)
    phases: dict[str, float] = field(default_factory=dict)  # seconds: embed, choose_policy, publish (the rest)

    @property
    def images_per_s(self) -> float:
        return self.embedded / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        return (f"{self.images} images in cache ({self.embedded} embedded, {self.reused} reused, "
                f"{self.removed} removed), {self.buckets} buckets, {len(self.skipped)} skipped, "
                f"{self.seconds:.1f} s, {self.images_per_s:.1f} images/s")


def fingerprint(pipeline: Pipeline, bucket_by: str) -> dict:
    """Everything that changes a stored embedding, class or bucket, in its JSON form (as stored)."""
    return json.loads(json.dumps({"stages": pipeline.describe(), "bucket_by": bucket_by, "decode": DECODE_RULE}))


def differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Readable 'key: old -> new' lines for two nested fingerprints."""
    lines = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            lines += differences(a, b, f"{prefix}{key}.")
        elif a != b:
            lines.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return lines


def _row_columns(items: list[Item], labels: dict[str, str | None], stats: dict[str, os.stat_result],
                 dim: int, topk: int) -> dict[str, np.ndarray]:
    good = [item for item in items if item.error is None]
    columns = empty_columns(dim, topk)
    if not good:
        return columns
    columns.update(
        paths=np.array([item.path for item in good]),
        sizes=np.array([stats[item.path].st_size for item in good], np.int64),
        mtimes=np.array([stats[item.path].st_mtime_ns for item in good], np.int64),
        labels=np.array([labels[item.path] or "" for item in good]),
        label_classes=np.full(len(good), -1, np.int32),
        boxes=np.array([item.box or (np.nan,) * 4 for item in good], np.float32),
        embeddings=np.stack([item.embedding for item in good]).astype(np.float32),
    )
    if topk:
        columns.update(classes=np.stack([item.classes for item in good]).astype(np.int32),
                       probs=np.stack([item.probs for item in good]).astype(np.float32))
    else:
        columns.update(classes=np.zeros((len(good), 0), np.int32), probs=np.zeros((len(good), 0), np.float32))
    return columns


def _label_classes(entries_labels: np.ndarray, pipeline: Pipeline, cache: Path) -> np.ndarray:
    """Classifier class index of each folder label, for `--bucket-by label`."""
    stage = pipeline.stage("classify")
    if stage is None:
        raise ValueError("--bucket-by label needs a classifier")
    lookup = {label: stage.classifier.class_index(label) for label in set(entries_labels.tolist())}
    unknown = sorted(label for label, index in lookup.items() if index is None)
    if unknown:
        raise ValueError(f"{cache}: --bucket-by label needs labels that are the classifier's classes "
                         f"(synset ids or class names); unknown: {', '.join(unknown[:5])}"
                         + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else ""))
    return np.array([lookup[label] for label in entries_labels.tolist()], np.int32)


def build_cache(gallery: str | Path, out: str | Path, config: PipelineConfig, labels_file: str | Path | None = None,
                bucket_by: str = "classifier", rebuild: bool = False, progress: bool = True,
                pipeline: Pipeline | None = None, chunk_rows: int = 256, engine=None) -> BuildSummary:
    """Create or update the cache at `out` for the images under `gallery`.

    Progress is saved every `chunk_rows` embedded images (the most an interruption can lose). `engine` (default:
    `pipeline` in this process) embeds the images: `run(paths, root, on_batch)` delivers each path once as an
    Item, `describe()` gives the stages' description (the fingerprint), `pipeline` names the classes.
    """
    started = time.perf_counter()
    gallery, out = Path(gallery).resolve(), Path(out)
    if bucket_by not in ("classifier", "label"):
        raise ValueError(f"--bucket-by {bucket_by}: use classifier or label")
    entries = scan_gallery(gallery, labels_file)
    pipeline = pipeline or (engine.pipeline if engine else build_pipeline(config))
    wanted = fingerprint(engine or pipeline, bucket_by)

    previous: CacheData | None = None
    if (out / "CURRENT").is_file() and not rebuild:
        previous = load_cache(out, mmap=False)
        changed = differences(previous.manifest["fingerprint"], wanted)
        if changed:
            raise CacheError(f"{out}: this cache was built with another pipeline ({'; '.join(changed[:3])}); "
                             "use another --out, or --rebuild to replace it")
    pending = PendingChunks(out, wanted)

    # Rows already embedded (by the previous generation or an interrupted build), keyed by path.
    parts = ([previous.columns] if previous else []) + pending.load()
    known = concat_columns(parts) if parts else None
    index = {}
    if known is not None:
        for row, path in enumerate(known["paths"].tolist()):
            index[path] = row  # later parts (pending chunks) win
    stats = {e.relpath: (gallery / e.relpath).stat() for e in entries}
    labels = {e.relpath: e.label for e in entries}

    def is_current(entry: GalleryEntry) -> bool:
        row = index.get(entry.relpath)
        return row is not None and known["sizes"][row] == stats[entry.relpath].st_size \
            and known["mtimes"][row] == stats[entry.relpath].st_mtime_ns

    todo = [e.relpath for e in entries if not is_current(e)]
    summary = BuildSummary(reused=len(entries) - len(todo))
    summary.removed = len(set(index) - set(labels)) if previous else 0

    topk = config.class_topk if config.uses_classifier else 0
    chunk: list[Item] = []
    bar = tqdm(total=len(todo), desc="embedding", unit="img", disable=not progress or not todo)

    def save(items: list[Item]) -> None:
        dim = items[0].embedding.shape[0] if items else 0
        pending.append(_row_columns(items, labels, stats, dim, topk))

    def on_batch(items: list[Item]) -> None:
        chunk.extend(item for item in items if item.error is None)
        summary.skipped.extend({"path": item.path, "reason": item.error} for item in items if item.error)
        bar.update(len(items))
        if len(chunk) >= chunk_rows:
            save(chunk)
            chunk.clear()

    embedding_started = time.perf_counter()
    if engine is not None:
        engine.run(todo, root=gallery, on_batch=on_batch)
    else:
        for _ in pipeline.run(todo, root=gallery, on_batch=on_batch):
            pass
    if chunk:
        save(chunk)
    bar.close()
    summary.phases["embed"] = time.perf_counter() - embedding_started
    summary.embedded = len(todo) - len(summary.skipped)

    # Publish: every current gallery image's newest row, in gallery order.
    parts = ([previous.columns] if previous else []) + pending.load()
    merged = concat_columns(parts) if parts else None
    latest = {path: row for row, path in enumerate(merged["paths"].tolist())} if merged is not None else {}
    rows = np.array([latest[e.relpath] for e in entries if e.relpath in latest], np.int64)
    if merged is None or len(rows) == 0:
        raise CacheError(f"{gallery}: no usable images ({len(summary.skipped)} skipped)")
    columns = select_rows(merged, rows)
    columns["labels"] = np.array([labels[p] or "" for p in columns["paths"].tolist()])
    if bucket_by == "label":
        columns["label_classes"] = _label_classes(columns["labels"], pipeline, out)
    manifest = {
        "fingerprint": wanted, "config": config.cache_part(), "gallery_root": str(gallery),
        "labels_file": str(labels_file) if labels_file else None, "bucket_by": bucket_by,
        "dim": int(columns["embeddings"].shape[1]), "skipped": summary.skipped,
        "class_names": _class_names(columns, pipeline, bucket_by), "built": time.strftime("%Y-%m-%dT%H:%M:%S"),
    }
    if topk and bucket_by == "classifier":
        # What `--buckets auto` means for this gallery, chosen on its labelled images (flat without labels).
        choosing_started = time.perf_counter()
        chosen = choose_policy(columns)
        manifest["default_buckets"] = str(chosen) if chosen else "flat"
        manifest["fused_weight"] = chosen.weight if chosen and chosen.kind == "fused" else None
        summary.phases["choose_policy"] = time.perf_counter() - choosing_started
    write_generation(out, manifest, columns)
    pending.clear()
    summary.phases["publish"] = time.perf_counter() - started - sum(summary.phases.values())
    summary.images = len(rows)
    summary.buckets = len(np.unique(columns["label_classes"] if bucket_by == "label" else columns["classes"][:, :1])) \
        if topk else 0
    summary.seconds = time.perf_counter() - started
    return summary


def _class_names(columns: dict[str, np.ndarray], pipeline: Pipeline, bucket_by: str) -> dict[str, str]:
    """Readable names of every class that can name a bucket in this cache."""
    stage = pipeline.stage("classify")
    if stage is None:
        return {}
    keys = np.unique(columns["label_classes"] if bucket_by == "label" else columns["classes"])
    return {str(int(key)): stage.classifier.class_name(int(key)) for key in keys}

"""Labelled image sets for benchmarks and training: folders or zips (extracted once, never written into).

A labelled set is a list of (path relative to a root, label); an image's label is its parent
folder's name (`<label>/img.jpg`, `train/<label>/img.jpg`, `faces/training/s1/1.pgm`) unless a
JSON label map is given.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lookalike.models.errors import UserError
from lookalike.models.files import user_cache_dir
from lookalike.pipeline.gallery import labels_of, list_images


@dataclass(frozen=True)
class LabelledSet:
    root: Path
    paths: list[str]
    labels: list[str]

    def __len__(self) -> int:
        return len(self.paths)

    def subset(self, indices) -> LabelledSet:
        return LabelledSet(self.root, [self.paths[i] for i in indices], [self.labels[i] for i in indices])


def datasets_dir() -> Path:
    """Where zips are extracted: $LOOKALIKE_DATA_CACHE, else datasets/ in lookalike's user cache."""
    return Path(os.environ.get("LOOKALIKE_DATA_CACHE") or user_cache_dir() / "datasets")


def extract_zip(archive: Path) -> Path:
    """Extract `archive` once into lookalike's dataset cache (keyed by name, size and mtime)."""
    stat = archive.stat()
    key = hashlib.sha1(f"{archive.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:10]
    target = datasets_dir() / f"{archive.stem}-{key}"
    if target.is_dir():
        return target
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with zipfile.ZipFile(archive) as zipped:
            zipped.extractall(staging)
    except zipfile.BadZipFile as err:
        raise UserError(f"{archive}: not a readable zip ({err})") from None
    os.replace(staging, target)  # atomic: a crash mid-extraction leaves no half folder behind
    return target


def resolve_data(spec: str | Path) -> Path:
    """A folder, a .zip, or 'archive.zip::inner/folder' -> a folder on disk."""
    text = str(spec)
    archive, _, inner = text.partition("::")
    path = Path(archive).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path}: data folder or zip does not exist")
    root = extract_zip(path) if path.suffix.lower() == ".zip" else path
    folder = root / inner if inner else root
    if not folder.is_dir():
        raise FileNotFoundError(f"{text}: no folder '{inner}' inside")
    return folder


def load_labelled(spec: str | Path, labels_file: str | Path | None = None) -> LabelledSet:
    """Every image under the data folder/zip with its label; images without one are left out."""
    root = resolve_data(spec)
    paths, _ = list_images(root)  # a data set's unusable entries are left out, as unlabelled ones are
    pairs = [(p, label) for p, label in zip(paths, labels_of(paths, labels_file or None)) if label is not None]
    if not pairs:
        raise UserError(f"{spec}: no labelled images (expected <label>/<image> folders or a label map)")
    return LabelledSet(root, [p for p, _ in pairs], [label for _, label in pairs])


def split_queries(data: LabelledSet, query_fraction: float, seed: int) -> tuple[LabelledSet, LabelledSet]:
    """(gallery, queries): a seeded per-label split; each label with 2+ images gives at least one query."""
    if not 0 < query_fraction < 1:
        raise UserError(f"--query-fraction {query_fraction}: must be between 0 and 1")
    rng = np.random.default_rng(seed)
    labels = np.array(data.labels)
    query_rows = []
    for label in sorted(set(data.labels)):
        rows = np.flatnonzero(labels == label)
        if len(rows) < 2:
            continue
        count = min(len(rows) - 1, max(1, round(query_fraction * len(rows))))
        query_rows += rng.permutation(rows)[:count].tolist()
    chosen = set(query_rows)
    return (data.subset([i for i in range(len(data)) if i not in chosen]), data.subset(sorted(query_rows)))


def split_labels(data: LabelledSet, holdout: int, seed: int) -> tuple[LabelledSet, LabelledSet]:
    """(seen, held out): `holdout` labels chosen with `seed` never appear in the first set."""
    names = sorted(set(data.labels))
    if not 0 < holdout < len(names):
        raise UserError(f"--holdout-labels {holdout}: must be between 1 and {len(names) - 1}")
    held = set(np.random.default_rng(seed).permutation(names)[:holdout].tolist())
    return (data.subset([i for i, label in enumerate(data.labels) if label not in held]),
            data.subset([i for i, label in enumerate(data.labels) if label in held]))

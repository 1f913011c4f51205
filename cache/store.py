"""The on-disk cache: generations written atomically, pending chunks for resume, memory-mapped reads.

Layout of a cache directory:
  CURRENT              name of the live generation (replaced atomically, last step of a build)
  gen-000N/            manifest.json + one .npy per column; embeddings.npy is memory-mapped
  pending/             chunk-*.npz of an unfinished build (each written atomically) + fingerprint.json
A crash at any point leaves CURRENT naming the last complete generation; a re-run resumes from
the pending chunks.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FORMAT_VERSION = 1
# Per-image columns; every one has the image count as its first dimension.
# label_classes: the classifier's index of the folder label (`--bucket-by label`), -1 otherwise.
COLUMNS = ("paths", "sizes", "mtimes", "labels", "label_classes", "classes", "probs", "boxes", "embeddings")


class CacheError(ValueError):
    """A cache that cannot be used as asked; the message names the cache and the problem."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


@dataclass
class CacheData:
    """A loaded generation: its manifest and columns (embeddings memory-mapped)."""

    root: Path
    manifest: dict
    columns: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.columns["paths"])

    @property
    def gallery_root(self) -> Path:
        return Path(self.manifest["gallery_root"])


def empty_columns(dim: int, topk: int) -> dict[str, np.ndarray]:
    return {
        "paths": np.array([], dtype=str), "sizes": np.zeros(0, np.int64), "mtimes": np.zeros(0, np.int64),
        "labels": np.array([], dtype=str), "label_classes": np.zeros(0, np.int32), "classes": np.zeros((0, topk), np.int32),
        "probs": np.zeros((0, topk), np.float32), "boxes": np.zeros((0, 4), np.float32),
        "embeddings": np.zeros((0, dim), np.float32),
    }


def concat_columns(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    return {name: np.concatenate([p[name] for p in parts]) for name in COLUMNS}


def select_rows(columns: dict[str, np.ndarray], rows: np.ndarray) -> dict[str, np.ndarray]:
    return {name: np.asarray(columns[name][rows]) for name in COLUMNS}


def current_generation(root: Path) -> Path | None:
    pointer = root / "CURRENT"
    if not pointer.is_file():
        return None
    return root / pointer.read_text().strip()


def load_cache(root: str | Path, mmap: bool = True) -> CacheData:
    """Open the live generation of a cache; CacheError when there is none or it is unreadable."""
    root = Path(root)
    generation = current_generation(root)
    if generation is None:
        raise CacheError(f"{root}: not a lookalike cache (no CURRENT file); run build-cache first")
    try:
        manifest = json.loads((generation / "manifest.json").read_text())
        if manifest.get("format_version") != FORMAT_VERSION:
            raise CacheError(f"{root}: cache format {manifest.get('format_version')} is not "
                             f"{FORMAT_VERSION}; rebuild it with build-cache --rebuild")
        columns = {name: np.load(generation / f"{name}.npy", mmap_mode="r" if mmap else None,
                                 allow_pickle=False) for name in COLUMNS}
    except (OSError, ValueError, KeyError) as err:
        if isinstance(err, CacheError):
            raise
        raise CacheError(f"{root}: cache generation {generation.name} is unreadable ({err})") from None
    return CacheData(root, manifest, columns)


def write_generation(root: Path, manifest: dict, columns: dict[str, np.ndarray]) -> Path:
    """Write a complete new generation, then switch CURRENT to it and delete older ones."""
    root.mkdir(parents=True, exist_ok=True)
    previous = current_generation(root)
    number = int(previous.name.split("-")[1]) + 1 if previous else 1
    generation = root / f"gen-{number:06d}"
    staging = root / f"{generation.name}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    for name in COLUMNS:
        with open(staging / f"{name}.npy", "wb") as handle:
            np.save(handle, np.ascontiguousarray(columns[name]), allow_pickle=False)
            handle.flush()
            os.fsync(handle.fileno())
    manifest = dict(manifest, format_version=FORMAT_VERSION, count=int(len(columns["paths"])))
    write_text_atomic(staging / "manifest.json", json.dumps(manifest, indent=1))
    os.replace(staging, generation)
    _fsync_dir(root)
    write_text_atomic(root / "CURRENT", generation.name)
    for old in root.glob("gen-*"):
        if old != generation:
            shutil.rmtree(old, ignore_errors=True)
    return generation


class PendingChunks:
    """Embedded-but-not-yet-published rows of an unfinished build, tied to one fingerprint."""

    def __init__(self, root: Path, fingerprint: dict):
        self.folder = root / "pending"
        self.fingerprint = fingerprint
        stamp = self.folder / "fingerprint.json"
        if self.folder.is_dir() and (not stamp.is_file() or json.loads(stamp.read_text()) != fingerprint):
            shutil.rmtree(self.folder)  # left by a build of another configuration: useless
        self.folder.mkdir(parents=True, exist_ok=True)
        if not stamp.is_file():
            write_text_atomic(stamp, json.dumps(fingerprint))
        self.count = len(list(self.folder.glob("chunk-*.npz")))

    def load(self) -> list[dict[str, np.ndarray]]:
        chunks = []
        for path in sorted(self.folder.glob("chunk-*.npz")):
            try:
                with np.load(path, allow_pickle=False) as data:
                    chunks.append({name: data[name] for name in COLUMNS})
            except (OSError, ValueError, KeyError):
                path.unlink()  # a chunk cut short by a crash: its images are embedded again
        return chunks

    def append(self, columns: dict[str, np.ndarray]) -> None:
        path = self.folder / f"chunk-{self.count:06d}.npz"
        tmp = self.folder / f"partial-{self.count:06d}.npz"
        with open(tmp, "wb") as handle:
            np.savez(handle, **columns)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        self.count += 1

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

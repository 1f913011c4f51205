"""The on-disk cache, opened for reading: the live generation's manifest and columns, memory-mapped.

Layout of a cache directory:
  CURRENT              name of the live generation (replaced atomically, the last step of a publish)
  gen-N/               manifest.json + one .npy per column, rows grouped by top-1 bucket; embeddings memory-mapped
  pending/             chunk-*.npz of an unfinished build (each written atomically) + fingerprint.json
  .build.lock          held by the one build writing this cache (.build.holder says who)
Writing is cache/generations.py (publish), cache/pending.py (resume) and cache/lock.py (one build at a time).
Readers retry when a publish removes the generation they were opening.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lookalike.cache.columns import WHITENING_FILE, check_columns, stored_columns
from lookalike.cache.generations import current_generation, read_text
from lookalike.cache.manifest import CacheError, Manifest


@dataclass
class CacheData:
    """A loaded generation: its manifest and columns (embeddings memory-mapped)."""

    root: Path
    manifest: Manifest
    columns: dict[str, np.ndarray]
    generation: Path | None = None  # the generation folder these rows were read from (None: held in memory)
    whitening: np.ndarray | None = None  # the learned whitening, when the cache stores one (cache/whitening.py)

    def __len__(self) -> int:
        return len(self.columns["paths"])

    @property
    def gallery_root(self) -> Path:
        return self.manifest.root

    @classmethod
    def in_memory(cls, columns: dict[str, np.ndarray], root: Path = Path("."), **manifest_fields) -> CacheData:
        """A cache held in memory over `columns` (tests, synthetic search measurements)."""
        manifest = Manifest(fingerprint={}, config={}, gallery_root=str(root), count=len(columns["paths"]),
                            dim=int(columns["embeddings"].shape[1]), **manifest_fields)
        return cls(root, manifest, columns)


def _load_generation(root: Path, generation: Path, mmap_mode: str | None) -> CacheData:
    where = f"{root} ({generation.name})"
    manifest = Manifest.from_json(read_text(generation / "manifest.json", where), where)
    columns = {}
    for name in stored_columns(manifest):
        try:
            columns[name] = np.load(generation / f"{name}.npy", mmap_mode=mmap_mode, allow_pickle=False)
        except ValueError as err:  # object arrays (pickles) and malformed headers
            raise CacheError(f"{where}: column {name} is unreadable ({err})") from None
    check_columns(where, columns, manifest.count, manifest.dim)
    return CacheData(root, manifest, columns, generation, _whitening(generation, manifest, where))


def _whitening(generation: Path, manifest: Manifest, where: str) -> np.ndarray | None:
    """The generation's learned whitening ([dim + 1, dim], finite), None when it has none; CacheError otherwise."""
    if not manifest.whitening:
        return None
    try:  # an OSError (a publish removed the generation) is load_cache's to retry
        whitening = np.load(generation / WHITENING_FILE, allow_pickle=False)
    except ValueError as err:
        raise CacheError(f"{where}: {WHITENING_FILE} is unreadable ({type(err).__name__}); rebuild with "
                         "build-cache --rebuild") from None
    if whitening.shape != (manifest.dim + 1, manifest.dim) or whitening.dtype.kind != "f" or \
            not np.isfinite(whitening).all():
        raise CacheError(f"{where}: {WHITENING_FILE} is not a finite [{manifest.dim + 1}, {manifest.dim}] matrix; "
                         "rebuild with build-cache --rebuild")
    return whitening


def load_cache(root: str | Path, mmap: bool = True, attempts: int = 5) -> CacheData:
    """Open the live generation of a cache; CacheError when there is none or it is unreadable.

    A build may publish while this opens the cache and delete the generation it was reading: then CURRENT has
    moved on, and the new generation is opened instead.
    """
    root = Path(root)
    for _ in range(attempts):
        generation = current_generation(root)
        if generation is None:
            raise CacheError(f"{root}: not a lookalike cache (no CURRENT file); run build-cache first")
        try:
            return _load_generation(root, generation, "r" if mmap else None)
        except OSError as err:
            if current_generation(root) == generation:
                raise CacheError(f"{root}: cache generation {generation.name} is unreadable ({err})") from None
    raise CacheError(f"{root}: the cache changed {attempts} times while opening it; try again")

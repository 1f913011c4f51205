"""Path safety: which stored paths could reach outside the gallery root (one rule for the cache and serve)."""
from __future__ import annotations

import numpy as np

from lookalike.cache.manifest import CacheError


def unsafe_paths(paths: np.ndarray) -> np.ndarray:
    """Rows whose path is absolute or climbs out of the gallery root ('..' as a path component)."""
    paths = np.asarray(paths, dtype=str)
    if len(paths) == 0:  # numpy's string replace fails on an empty array
        return np.zeros(0, np.int64)
    wrapped = np.char.add(np.char.add("/", np.char.replace(paths, "\\", "/")), "/")
    return np.flatnonzero(np.char.startswith(paths, "/") | np.char.startswith(paths, "\\")
                          | (np.char.find(wrapped, "/../") >= 0) | (np.char.str_len(paths) == 0))


def refuse_unsafe_paths(where: str, paths: np.ndarray, rows: np.ndarray | None = None) -> None:
    """CacheError naming the first of `rows` (all when None) of the `paths` column that leaves the gallery root."""
    chosen = np.arange(len(paths)) if rows is None else np.asarray(rows)
    bad = unsafe_paths(paths[chosen])
    if len(bad):
        row = int(chosen[bad[0]])
        raise CacheError(f"{where}: row {row} names {str(paths[row])[:80]!r}, outside the gallery root; the cache is "
                         "corrupt or was tampered with")

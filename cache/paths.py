"""Path safety: which stored paths could reach outside the gallery root (one rule for the cache and serve)."""
from __future__ import annotations

import numpy as np


def unsafe_paths(paths: np.ndarray) -> np.ndarray:
    """Rows whose path is absolute or climbs out of the gallery root ('..' as a path component)."""
    paths = np.asarray(paths, dtype=str)
    wrapped = np.char.add(np.char.add("/", np.char.replace(paths, "\\", "/")), "/")
    return np.flatnonzero(np.char.startswith(paths, "/") | np.char.startswith(paths, "\\")
                          | (np.char.find(wrapped, "/../") >= 0) | (np.char.str_len(paths) == 0))

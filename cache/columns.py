"""The per-image columns of a cache, their kinds and shapes, and the checks every loaded column passes."""
from __future__ import annotations

import numpy as np

from lookalike.cache.manifest import CacheError, Manifest
from lookalike.cache.mapped import nonfinite_row
from lookalike.cache.paths import refuse_unsafe_paths

# Per-image columns; every one has the image count as its first dimension.
# label_classes: the classifier's index of the folder label (`--bucket-by label`), -1 otherwise.
COLUMNS = ("paths", "sizes", "mtimes", "labels", "label_classes", "classes", "probs", "boxes", "embeddings")
DBA_COLUMN = "dba"  # optional: DBA vectors of the embeddings (manifest.dba says with which K and a)
WHITE_COLUMN = "white"  # optional: the embeddings whitened (manifest.whitening; cache/whitening.py)
WHITENING_FILE = "whitening.npy"  # beside them: the whitening itself, [dim + 1, dim] (a query is whitened with it)
VECTOR_COLUMNS = ("embeddings", DBA_COLUMN, WHITE_COLUMN)  # unit vectors: every row finite
KINDS = {DBA_COLUMN: "f", WHITE_COLUMN: "f", "paths": "U", "sizes": "i", "mtimes": "i", "labels": "U", "label_classes": "i", "classes": "i",
         "probs": "f", "boxes": "f", "embeddings": "f"}
# Vector (and path) columns up to this size are checked when a cache opens (~0.1 s); a larger one (10^7 rows are
# 10 GB of vectors, 1 GB of paths) was checked when its generation was written, and a search refuses any row it
# scores that is not finite, or returns whose path leaves the gallery (Searcher).
CHECKED_AT_OPEN_BYTES = 256 << 20
# Rows are vectors (one row per image) or matrices of a fixed width.
NDIM = {"classes": 2, "probs": 2, "boxes": 2, "embeddings": 2, DBA_COLUMN: 2, WHITE_COLUMN: 2}


def stored_columns(manifest: Manifest) -> tuple[str, ...]:
    """The columns a generation with this manifest holds: COLUMNS, then DBA and whitened vectors when it has them."""
    return COLUMNS + ((DBA_COLUMN,) if manifest.dba else ()) + ((WHITE_COLUMN,) if manifest.whitening else ())


def empty_columns(dim: int, topk: int) -> dict[str, np.ndarray]:
    return {
        "paths": np.array([], dtype=str), "sizes": np.zeros(0, np.int64), "mtimes": np.zeros(0, np.int64),
        "labels": np.array([], dtype=str), "label_classes": np.zeros(0, np.int32),
        "classes": np.zeros((0, topk), np.int32), "probs": np.zeros((0, topk), np.float32),
        "boxes": np.zeros((0, 4), np.float32), "embeddings": np.zeros((0, dim), np.float32),
    }


def check_columns(where: str, columns: dict[str, np.ndarray], count: int, dim: int) -> None:
    """Every column `count` rows long, of the expected kind and shape (vectors 1-D; classes and probs of one width;
    boxes 4 wide; embeddings and dba `dim` wide and finite); no path outside the gallery (these two up to
    CHECKED_AT_OPEN_BYTES). CacheError otherwise."""
    for name, column in columns.items():
        if column.dtype.kind != KINDS[name]:
            raise CacheError(f"{where}: column {name} has dtype {column.dtype}, not a {KINDS[name]!r} array")
        if column.ndim != NDIM.get(name, 1):
            raise CacheError(f"{where}: column {name} is {column.ndim}-D {column.shape}, not {NDIM.get(name, 1)}-D")
        if len(column) != count:
            raise CacheError(f"{where}: column {name} has {len(column)} rows, the manifest says {count}")
    widths = {"boxes": 4, "embeddings": dim, DBA_COLUMN: dim, WHITE_COLUMN: dim, "probs": columns["classes"].shape[1]}
    for name, width in widths.items():
        if name in columns and columns[name].shape[1] != width:
            raise CacheError(f"{where}: column {name} is {columns[name].shape}, not {width} wide")
    if columns["paths"].nbytes <= CHECKED_AT_OPEN_BYTES:
        refuse_unsafe_paths(where, columns["paths"])
    for name in VECTOR_COLUMNS:
        row = nonfinite_row(columns[name]) if name in columns and columns[name].nbytes <= CHECKED_AT_OPEN_BYTES else None
        if row is not None:
            raise CacheError(f"{where}: column {name} row {row} ({str(columns['paths'][row])[:80]!r}) is not finite; "
                             "the cache is corrupt: rebuild with build-cache --rebuild")

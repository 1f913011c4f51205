"""Generations: each build publishes a complete new folder gen-N and switches CURRENT to it last, atomically.

A crash at any point leaves CURRENT naming the last complete generation; the next publish removes any
half-published generation (and its gen-N.tmp staging folder). The gen-N name rule is here, once.
"""
from __future__ import annotations

import errno
import os
import re
import shutil
from pathlib import Path

import numpy as np

from lookalike.cache.buckets import grouped_order
from lookalike.cache.columns import DBA_COLUMN, WHITE_COLUMN, WHITENING_FILE, stored_columns
from lookalike.cache.indexes import GalleryIndex, ivf_file, renumber, save_gallery_index, write_index
from lookalike.cache.manifest import CacheError, Manifest
from lookalike.cache.mapped import StackedRows, first_nonfinite, slice_rows, take_rows
from lookalike.models.files import fsync_dir, write_text_atomic

_NAME = re.compile(r"gen-(\d+)")  # a generation's folder; what a publish leaves under its name starts so too


def generation_name(number: int) -> str:
    """The folder name of generation `number`."""
    return f"gen-{number:06d}"


def _number(name: str) -> int | None:
    """N of gen-N, or of a file a publish of gen-N left (its staging folder gen-N.tmp); None for anything else."""
    match = _NAME.match(name)
    return int(match[1]) if match else None


def read_text(path: Path, where: str | Path) -> str:
    """A cache's text file as UTF-8; CacheError naming `where` and the file when it is not UTF-8 (a damaged byte)."""
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise CacheError(f"{where}: {path.name} is damaged (not UTF-8 text at byte {err.start}); "
                         "rebuild with build-cache --rebuild") from None


def current_generation(root: Path) -> Path | None:
    pointer = root / "CURRENT"
    if not pointer.is_file():
        return None
    name = read_text(pointer, root).strip()
    if not _NAME.fullmatch(name):
        raise CacheError(f"{root}: CURRENT names {name[:40]!r}, not a generation; rebuild with build-cache --rebuild")
    return root / name


def _write_npy(path: Path, array: np.ndarray | StackedRows, order: np.ndarray, vectors: np.dtype | None) -> None:
    """`array[order]` as a .npy file; a 2-D float matrix is gathered and written a slice at a time (written from
    the slice itself: a bytes copy of it would double what is held). A column of vectors (embeddings, DBA: `vectors`
    is the dtype they are stored in) must be finite; other float columns may hold NaN (a crop box without a crop)."""
    with open(path, "wb") as handle:
        matrix = len(array.shape) == 2
        step = slice_rows(array.shape[1]) if matrix else len(order)
        dtype = np.dtype(vectors or np.float32)
        if isinstance(array, StackedRows) or (matrix and array.dtype.kind == "f" and len(order) > step):
            header = {"descr": np.lib.format.dtype_to_descr(dtype), "fortran_order": False,
                      "shape": (len(order), array.shape[1])}
            np.lib.format.write_array_header_1_0(handle, header)
            for start in range(0, len(order), step):
                block = take_rows(array, order[start:start + step])
                row = first_nonfinite(block) if vectors else None
                if row is not None:  # never published: no query could rank such a row
                    raise CacheError(f"{path.parent.parent}: {path.stem} row {start + row} is not finite; "
                                     "nothing was published")
                handle.write(memoryview(np.ascontiguousarray(block, dtype)).cast("B"))
                del block  # before the next slice is gathered: one slice held at a time
        else:
            rows = np.asarray(array)[order]
            np.save(handle, np.ascontiguousarray(rows, vectors) if vectors else rows, allow_pickle=False)
        handle.flush()
        os.fsync(handle.fileno())


def _nbytes(column: np.ndarray | StackedRows) -> int:
    return column.shape[0] * column.shape[1] * 4 if isinstance(column, StackedRows) else column.nbytes


def _mount_point(path: Path) -> Path:
    path = path.resolve()
    while not os.path.ismount(path) and path != path.parent:
        path = path.parent
    return path


def remove_leftovers(root: Path) -> None:
    """Remove what failed publishes left (staging folders, generations CURRENT does not name): under the build lock
    nothing else writes them, and no reader opens a generation CURRENT does not name."""
    try:
        live = current_generation(root)
    except CacheError:  # a damaged CURRENT names nothing readable (build-cache --rebuild replaces it)
        live = None
    for path in root.iterdir():
        if _number(path.name) is not None and path != live:
            shutil.rmtree(path, ignore_errors=True)


def _generation_numbers(root: Path) -> list[int]:
    return [number for path in root.iterdir() if (number := _number(path.name)) is not None]


def write_generation(root: Path, manifest: Manifest, columns: dict[str, np.ndarray | StackedRows],
                     vector_dtype: type = np.float32, whitening: np.ndarray | None = None,
                     gallery_index: GalleryIndex | None = None, white_index=None) -> Path:
    """Write a complete new generation (rows grouped by top-1 bucket), switch CURRENT to it, delete the others.
    The embeddings are stored as `vector_dtype` (float16: half the disk and page cache; read back as float32);
    `whitening` (cache/whitening.py) beside them when the manifest says it has one; `gallery_index` and
    `white_index` (the whole gallery's IVF index of the whitened rows), made for `columns`' rows, published with them
    (their ids renumbered to the stored order): no query searches the new rows exactly, or makes an index, while one
    is being made.

    Its number is above every generation on disk, so one left half-published by a crash never blocks the
    publish, and is removed with the rest. The caller holds the build lock.
    """
    root.mkdir(parents=True, exist_ok=True)
    remove_leftovers(root)
    number = max(_generation_numbers(root), default=0) + 1
    generation = root / generation_name(number)
    staging = root / f"{generation.name}.tmp"
    staging.mkdir()
    order = grouped_order(columns, manifest.bucket_by)
    names = stored_columns(manifest)
    # The DBA vectors stay float32: stored as float16 they changed the order of 2 of the 22 demo answers under auto.
    vector_dtypes = {"embeddings": vector_dtype, DBA_COLUMN: np.float32, WHITE_COLUMN: np.float32}
    try:
        for name in names:
            _write_npy(staging / f"{name}.npy", columns[name], order, vector_dtypes.get(name))
        if manifest.whitening:
            np.save(staging / WHITENING_FILE, np.asarray(whitening, np.float32), allow_pickle=False)
        if gallery_index is not None:
            renumber(gallery_index.index, order)
            save_gallery_index(staging, gallery_index._replace(row_lists=np.asarray(gallery_index.row_lists)[order]))
        if white_index is not None:
            renumber(white_index, order)
            write_index(staging / ivf_file("flat", white=True), white_index)
        write_text_atomic(staging / "manifest.json", manifest.to_json())
    except BaseException as err:  # Ctrl-C included: no staging is left behind
        shutil.rmtree(staging, ignore_errors=True)
        needed, free = sum(_nbytes(columns[name]) for name in names), shutil.disk_usage(root).free
        if isinstance(err, OSError) and (err.errno == errno.ENOSPC or free < needed):
            raise CacheError(f"{root}: no space left on {_mount_point(root)}: need about {needed / 2**20:.1f} MB "
                             f"for the new generation ({free / 2**20:.0f} MB free); "
                             "the embedded images are kept in pending/, so a re-run after freeing space resumes") from None
        raise
    os.replace(staging, generation)
    fsync_dir(root)
    write_text_atomic(root / "CURRENT", generation.name)
    remove_leftovers(root)
    return generation

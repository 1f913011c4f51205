"""Reading memory-mapped matrices without holding them: rows read with pread, pages released after a large read,
several matrices read as one (`StackedRows`), and non-finite rows found a slice at a time."""
from __future__ import annotations

import mmap
import os

import numpy as np

from lookalike.cache.buckets import as_slice

SLICE_BYTES = 8 << 20  # large matrices are read, gathered and written in slices of about this size
MERGE_BYTES = 64 << 10  # read_rows reads rows closer than this in one call


def slice_rows(width: int) -> int:
    """Rows of a float32 matrix `width` wide in one slice."""
    return max(1, SLICE_BYTES // (4 * max(1, width)))
RELEASE_ABOVE_BYTES = 256 << 20  # a smaller mapped matrix keeps its pages (re-mapping it per query costs ms)


def release_pages(matrix: np.ndarray) -> None:
    """Unmap the pages of a large memory-mapped matrix after reading what was needed (they stay in the page cache,
    shared and reclaimable): the kernel maps whole large folios on a read fault, so even a few scattered rows would
    otherwise leave most of the file counted in this process's memory."""
    handle = getattr(matrix, "_mmap", None)
    if isinstance(matrix, np.memmap) and handle is not None and matrix.nbytes > RELEASE_ABOVE_BYTES:
        handle.madvise(mmap.MADV_DONTNEED)


def read_rows(matrix: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """`matrix[rows]` as float32. A memory-mapped matrix is read with pread, one call per stretch of rows closer than
    MERGE_BYTES apart (the rows between are read and dropped): gathering scattered rows through the mapping faults
    whole large folios in, so a sample of 20,000 rows of a 2 GB file made all of it resident in this process (an
    incremental build peaked at 1.34 x the matrix); and one call per row cost 4 ms for the 1,024 candidates of a
    bucket of 10^4 rows, 90 % of a search through the gallery index at 10^7 rows. StackedRows (a build's rows, in
    the previous generation and the pending chunks) gather from their parts."""
    if isinstance(matrix, StackedRows):
        return matrix.take(np.asarray(rows))
    if not isinstance(matrix, np.memmap) or not matrix.filename or len(rows) == 0:
        run = as_slice(rows)
        return np.asarray(matrix[run if run else rows], np.float32)  # one run of rows: a view, not a gather
    order = np.argsort(rows, kind="stable")
    ordered = np.asarray(rows)[order]
    width = matrix.shape[1] * matrix.itemsize
    ends = np.append(np.flatnonzero(np.diff(ordered) > max(1, MERGE_BYTES // width)) + 1, len(ordered))
    out = np.empty((len(rows), matrix.shape[1]), matrix.dtype)
    with open(matrix.filename, "rb") as handle:
        start = 0
        for end in ends.tolist():
            first, last = int(ordered[start]), int(ordered[end - 1])
            data = os.pread(handle.fileno(), width * (last - first + 1), matrix.offset + first * width)
            stretch = np.frombuffer(data, matrix.dtype).reshape(last - first + 1, -1)
            out[order[start:end]] = stretch[ordered[start:end] - first]
            start = end
    return out.astype(np.float32, copy=False)


class StackedRows:
    """The rows of several matrices (memory-mapped generations, pending chunks) read as one, without copying them
    into one: `take` gathers the rows asked for, so a build holds one slice at a time. With `selection`, row i is
    row selection[i] of the stack (the rows a build keeps)."""

    def __init__(self, parts: list[np.ndarray], selection: np.ndarray | None = None):
        self.parts = parts
        self.offsets = np.cumsum([0, *(len(p) for p in parts)])
        self.selection = selection
        count = int(self.offsets[-1]) if selection is None else len(selection)
        self.shape = (count, parts[0].shape[1] if parts else 0)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, rows: np.ndarray) -> np.ndarray:
        return self.take(np.asarray(rows))

    def take(self, rows: np.ndarray) -> np.ndarray:
        if self.selection is not None:
            rows = self.selection[rows]
        out = np.empty((len(rows), self.shape[1]), np.float32)
        part_of = np.searchsorted(self.offsets, rows, side="right") - 1
        for i, part in enumerate(self.parts):
            chosen = np.flatnonzero(part_of == i)
            if len(chosen):
                out[chosen] = read_rows(part, rows[chosen] - self.offsets[i])
        return out


def take_rows(matrix: np.ndarray | StackedRows, rows: np.ndarray) -> np.ndarray:
    return matrix.take(rows) if isinstance(matrix, StackedRows) else np.asarray(matrix[rows], np.float32)


def first_nonfinite(block: np.ndarray) -> int | None:
    """The first row of `block` holding a NaN or an infinity; None when all are finite."""
    bad = np.flatnonzero(~np.isfinite(block).all(axis=1))
    return int(bad[0]) if len(bad) else None


def nonfinite_row(matrix: np.ndarray | StackedRows) -> int | None:
    """The first row holding a NaN or an infinity, read a slice at a time; None when all are finite."""
    step = slice_rows(matrix.shape[1])
    for start in range(0, len(matrix), step):
        row = first_nonfinite(take_rows(matrix, np.arange(start, min(len(matrix), start + step))))
        if row is not None:
            return start + row
    if isinstance(matrix, np.ndarray):
        release_pages(matrix)
    return None

"""The on-disk cache: generations published atomically, pending chunks for resume, memory-mapped reads.

Layout of a cache directory:
  CURRENT              name of the live generation (replaced atomically, the last step of a publish)
  gen-N/               manifest.json + one .npy per column, rows grouped by top-1 bucket; embeddings memory-mapped
  pending/             chunk-*.npz of an unfinished build (each written atomically) + fingerprint.json
  .build.lock          held by the one build writing this cache (.build.holder says who)
A crash at any point leaves CURRENT naming the last complete generation; the next publish removes any
half-published generation, and a re-run resumes from the pending chunks. Readers retry when a publish
removes the generation they were opening.
"""
from __future__ import annotations

import errno
import json
import mmap
import os
import re
import shutil
import socket
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lookalike.cache.buckets import grouped_order
from lookalike.cache.manifest import CacheError, Manifest
from lookalike.models.errors import one_line
from lookalike.models.files import atomic_write, fsync_dir, write_text_atomic

# Per-image columns; every one has the image count as its first dimension.
# label_classes: the classifier's index of the folder label (`--bucket-by label`), -1 otherwise.
COLUMNS = ("paths", "sizes", "mtimes", "labels", "label_classes", "classes", "probs", "boxes", "embeddings")
DBA_COLUMN = "dba"  # optional: DBA vectors of the embeddings (manifest.dba says with which K and a)
KINDS = {DBA_COLUMN: "f", "paths": "U", "sizes": "i", "mtimes": "i", "labels": "U", "label_classes": "i", "classes": "i",
         "probs": "f", "boxes": "f", "embeddings": "f"}
# Rows are vectors (one row per image) or matrices of a fixed width.
NDIM = {"classes": 2, "probs": 2, "boxes": 2, "embeddings": 2, DBA_COLUMN: 2}
WRITE_ROWS = 65_536  # embeddings are written (and gathered from older generations) in slices this size
RELEASE_ABOVE_BYTES = 256 << 20  # a smaller mapped matrix keeps its pages (re-mapping it per query costs ms)
_GENERATION = re.compile(r"^gen-(\d+)$")
_CHUNK = re.compile(r"^chunk-(\d+)\.npz$")
_GENERATION_FILE = re.compile(r"^gen-(\d+)")  # a generation, or its staging folder gen-N.tmp


def release_pages(matrix: np.ndarray) -> None:
    """Unmap the pages of a large memory-mapped matrix after reading what was needed (they stay in the page cache,
    shared and reclaimable): the kernel maps whole large folios on a read fault, so even a few scattered rows would
    otherwise leave most of the file counted in this process's memory."""
    handle = getattr(matrix, "_mmap", None)
    if isinstance(matrix, np.memmap) and handle is not None and matrix.nbytes > RELEASE_ABOVE_BYTES:
        handle.madvise(mmap.MADV_DONTNEED)


def read_rows(matrix: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """`matrix[rows]` as float32. A memory-mapped matrix is read with pread, one call per run of consecutive rows:
    gathering scattered rows through the mapping faults whole large folios in, so a sample of 20,000 rows of a
    2 GB file made all of it resident in this process (an incremental build peaked at 1.34 x the matrix)."""
    if not isinstance(matrix, np.memmap) or not matrix.filename or len(rows) == 0:
        return np.asarray(matrix[rows], np.float32)
    order = np.argsort(rows, kind="stable")
    ordered = rows[order]
    breaks = np.flatnonzero(np.diff(ordered) != 1) + 1
    width = matrix.shape[1] * matrix.itemsize
    out = np.empty((len(rows), matrix.shape[1]), matrix.dtype)
    with open(matrix.filename, "rb") as handle:
        for run, start in zip(np.split(ordered, breaks), np.concatenate([[0], breaks])):
            data = os.pread(handle.fileno(), width * len(run), matrix.offset + int(run[0]) * width)
            out[order[start:start + len(run)]] = np.frombuffer(data, matrix.dtype).reshape(len(run), -1)
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


@dataclass
class CacheData:
    """A loaded generation: its manifest and columns (embeddings memory-mapped)."""

    root: Path
    manifest: Manifest
    columns: dict[str, np.ndarray]
    generation: Path | None = None  # the generation folder these rows were read from (None: held in memory)

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


def empty_columns(dim: int, topk: int) -> dict[str, np.ndarray]:
    return {
        "paths": np.array([], dtype=str), "sizes": np.zeros(0, np.int64), "mtimes": np.zeros(0, np.int64),
        "labels": np.array([], dtype=str), "label_classes": np.zeros(0, np.int32),
        "classes": np.zeros((0, topk), np.int32), "probs": np.zeros((0, topk), np.float32),
        "boxes": np.zeros((0, 4), np.float32), "embeddings": np.zeros((0, dim), np.float32),
    }


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
    if not _GENERATION.match(name):
        raise CacheError(f"{root}: CURRENT names {name[:40]!r}, not a generation; rebuild with build-cache --rebuild")
    return root / name


def unsafe_paths(paths: np.ndarray) -> np.ndarray:
    """Rows whose path is absolute or climbs out of the gallery root ('..' as a path component)."""
    paths = np.asarray(paths, dtype=str)
    wrapped = np.char.add(np.char.add("/", np.char.replace(paths, "\\", "/")), "/")
    return np.flatnonzero(np.char.startswith(paths, "/") | np.char.startswith(paths, "\\")
                          | (np.char.find(wrapped, "/../") >= 0) | (np.char.str_len(paths) == 0))


def _first_nonfinite(block: np.ndarray) -> int | None:
    """The first row of `block` holding a NaN or an infinity; None when all are finite."""
    bad = np.flatnonzero(~np.isfinite(block).all(axis=1))
    return int(bad[0]) if len(bad) else None


def nonfinite_row(matrix: np.ndarray | StackedRows) -> int | None:
    """The first row holding a NaN or an infinity, read a WRITE_ROWS slice at a time; None when all are finite."""
    for start in range(0, len(matrix), WRITE_ROWS):
        row = _first_nonfinite(take_rows(matrix, np.arange(start, min(len(matrix), start + WRITE_ROWS))))
        if row is not None:
            return start + row
    if isinstance(matrix, np.ndarray):
        release_pages(matrix)
    return None


def check_columns(where: str, columns: dict[str, np.ndarray], count: int, dim: int) -> None:
    """Every column `count` rows long, of the expected kind and shape (vectors 1-D; classes and probs of one width;
    boxes 4 wide; embeddings and dba `dim` wide and finite); no path outside the gallery. CacheError otherwise."""
    for name, column in columns.items():
        if column.dtype.kind != KINDS[name]:
            raise CacheError(f"{where}: column {name} has dtype {column.dtype}, not a {KINDS[name]!r} array")
        if column.ndim != NDIM.get(name, 1):
            raise CacheError(f"{where}: column {name} is {column.ndim}-D {column.shape}, not {NDIM.get(name, 1)}-D")
        if len(column) != count:
            raise CacheError(f"{where}: column {name} has {len(column)} rows, the manifest says {count}")
    widths = {"boxes": 4, "embeddings": dim, DBA_COLUMN: dim, "probs": columns["classes"].shape[1]}
    for name, width in widths.items():
        if name in columns and columns[name].shape[1] != width:
            raise CacheError(f"{where}: column {name} is {columns[name].shape}, not {width} wide")
    bad = unsafe_paths(columns["paths"])
    if len(bad):
        raise CacheError(f"{where}: row {bad[0]} names {str(columns['paths'][bad[0]])[:80]!r}, outside the gallery "
                         "root; the cache is corrupt or was tampered with")
    for name in ("embeddings", DBA_COLUMN):
        row = nonfinite_row(columns[name]) if name in columns else None
        if row is not None:
            raise CacheError(f"{where}: column {name} row {row} ({str(columns['paths'][row])[:80]!r}) is not finite; "
                             "the cache is corrupt: rebuild with build-cache --rebuild")


def _load_generation(root: Path, generation: Path, mmap_mode: str | None) -> CacheData:
    where = f"{root} ({generation.name})"
    manifest = Manifest.from_json(read_text(generation / "manifest.json", where), where)
    columns = {}
    for name in COLUMNS + ((DBA_COLUMN,) if manifest.dba else ()):
        try:
            columns[name] = np.load(generation / f"{name}.npy", mmap_mode=mmap_mode, allow_pickle=False)
        except ValueError as err:  # object arrays (pickles) and malformed headers
            raise CacheError(f"{where}: column {name} is unreadable ({err})") from None
    check_columns(where, columns, manifest.count, manifest.dim)
    return CacheData(root, manifest, columns, generation)


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


def _write_npy(path: Path, array: np.ndarray | StackedRows, order: np.ndarray) -> None:
    """`array[order]` as a .npy file; a 2-D float matrix is gathered and written a slice at a time."""
    with open(path, "wb") as handle:
        if isinstance(array, StackedRows) or (array.ndim == 2 and array.dtype.kind == "f" and len(order) > WRITE_ROWS):
            header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
                      "shape": (len(order), array.shape[1])}
            np.lib.format.write_array_header_1_0(handle, header)
            for start in range(0, len(order), WRITE_ROWS):
                block = take_rows(array, order[start:start + WRITE_ROWS])
                row = _first_nonfinite(block)
                if row is not None:  # never published: no query could rank such a row
                    raise CacheError(f"{path.parent.parent}: {path.stem} row {start + row} is not finite; "
                                     "nothing was published")
                handle.write(np.ascontiguousarray(block).tobytes())
        else:
            np.save(handle, np.ascontiguousarray(np.asarray(array)[order]), allow_pickle=False)
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
        if _GENERATION_FILE.match(path.name) and path != live:
            shutil.rmtree(path, ignore_errors=True)


def _generation_numbers(root: Path) -> list[int]:
    return [int(m[1]) for p in root.iterdir() if (m := _GENERATION_FILE.match(p.name))]


def write_generation(root: Path, manifest: Manifest, columns: dict[str, np.ndarray | StackedRows]) -> Path:
    """Write a complete new generation (rows grouped by top-1 bucket), switch CURRENT to it, delete the others.

    Its number is above every generation on disk, so one left half-published by a crash never blocks the
    publish, and is removed with the rest. The caller holds the build lock.
    """
    root.mkdir(parents=True, exist_ok=True)
    remove_leftovers(root)
    number = max(_generation_numbers(root), default=0) + 1
    generation = root / f"gen-{number:06d}"
    staging = root / f"{generation.name}.tmp"
    staging.mkdir()
    order = grouped_order(columns, manifest.bucket_by)
    names = COLUMNS + ((DBA_COLUMN,) if manifest.dba else ())
    try:
        for name in names:
            _write_npy(staging / f"{name}.npy", columns[name], order)
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


class BuildLock:
    """One build at a time per cache directory: a second one is refused with a line naming the holder.

    An OS file lock (filelock), so a build that dies releases it; `.build.holder` says who holds it.
    """

    def __init__(self, root: Path):
        from filelock import FileLock

        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.lock = FileLock(root / ".build.lock")
        self.holder = root / ".build.holder"

    def __enter__(self) -> BuildLock:
        from filelock import Timeout

        try:
            self.lock.acquire(timeout=0)
        except Timeout:
            try:
                holder = self.holder.read_text().strip()
            except OSError:
                holder = "holder unknown"
            raise CacheError(f"{self.root}: another build is writing this cache ({holder}); wait for it to "
                             "finish, or use another --out") from None
        write_text_atomic(self.holder, f"pid {os.getpid()} on {socket.gethostname()} since "
                                       f"{time.strftime('%Y-%m-%d %H:%M:%S')}")
        return self

    def __exit__(self, *exc) -> None:
        self.holder.unlink(missing_ok=True)
        self.lock.release()


class PendingChunks:
    """Embedded-but-not-yet-published rows of an unfinished build, tied to one fingerprint."""

    def __init__(self, root: Path, fingerprint: dict):
        self.folder = root / "pending"
        self.fingerprint = fingerprint
        stamp = self.folder / "fingerprint.json"
        if self.folder.is_dir():
            try:
                found = json.loads(stamp.read_bytes().decode("utf-8")) if stamp.is_file() else None
            except (OSError, ValueError) as err:
                self._set_aside(self.folder, f"its fingerprint.json is damaged ({type(err).__name__})")
            else:
                if found != fingerprint:
                    shutil.rmtree(self.folder)  # left by a build of another configuration: useless
        self.folder.mkdir(parents=True, exist_ok=True)
        if not stamp.is_file():
            write_text_atomic(stamp, json.dumps(fingerprint))
        self.count = max((number for _, number in self._chunks()), default=-1) + 1  # the next chunk's number

    def _set_aside(self, path: Path, why: str) -> None:
        """Move the damaged pending folder (replacing an older pending.damaged) or one damaged chunk (into it) aside,
        and say so: the build goes on and embeds those images again."""
        aside = self.folder.with_name("pending.damaged")
        if path == self.folder:
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(path, aside)
        else:
            aside.mkdir(exist_ok=True)
            os.replace(path, aside / path.name)
        print(f"lookalike: {path}: {why}; set aside in {aside.name}, its images are embedded again", file=sys.stderr)

    def _chunks(self) -> list[tuple[Path, int]]:
        """(path, number) of every chunk file, in number order."""
        found = ((path, _CHUNK.match(path.name)) for path in self.folder.glob("chunk-*.npz"))
        return sorted(((path, int(match[1])) for path, match in found if match), key=lambda pair: pair[1])

    def load(self, first: int = 0) -> list[dict[str, np.ndarray]]:
        """The readable chunks numbered `first` and above (a build loads those it resumes from, then the ones it
        wrote: each once); a damaged one (unreadable, or columns of the wrong kind or shape) is set aside in
        pending.damaged with a message, and its images are embedded again."""
        chunks = []
        for path, number in self._chunks():
            if number < first:
                continue
            try:
                with np.load(path, allow_pickle=False) as data:
                    chunk = {name: data[name] for name in COLUMNS}
                check_columns(str(path), chunk, len(chunk["paths"]), chunk["embeddings"].shape[-1])
                chunks.append(chunk)
            except (OSError, ValueError, KeyError, IndexError, zipfile.BadZipFile, CacheError) as err:
                self._set_aside(path, f"damaged ({one_line(err)[:120]})")
        return chunks

    def append(self, columns: dict[str, np.ndarray]) -> None:
        def write(tmp: Path) -> None:
            with open(tmp, "wb") as handle:
                np.savez(handle, **columns)

        atomic_write(self.folder / f"chunk-{self.count:06d}.npz", write)
        self.count += 1

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

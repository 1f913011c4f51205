"""The one place that decides where a model's weights come from.

Order: an explicit local path -> `$LOOKALIKE_WEIGHTS/<weight_file>` -> the library's hub (which
honours HF_HUB_OFFLINE). When nothing works, `WeightsUnavailable` lists every place tried.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from lookalike.models.errors import UserError, one_line
from lookalike.models.files import sha256_of, user_cache_dir, write_text_atomic
from lookalike.models.registry import RANDOM, ModelSpec

T = TypeVar("T")


class WeightsUnavailable(UserError):
    """No weights could be found for a model; the message says where we looked and how to fix it."""


def local_weights(spec: ModelSpec) -> Path | None:
    """The local weight file for `spec`, or None when the hub should be used.

    Raises FileNotFoundError when an explicit path was given and does not exist.
    """
    if spec.weights and spec.weights != RANDOM:
        path = Path(spec.weights).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{spec.name}: weights file {path} does not exist")
        return path
    folder = os.environ.get("LOOKALIKE_WEIGHTS")
    if folder and spec.weight_file:
        candidate = Path(folder).expanduser() / spec.weight_file
        if candidate.is_file():
            return candidate
    return None


def places_tried(spec: ModelSpec) -> list[str]:
    """Human-readable list of the places `load_with_fallback` looks, in order."""
    folder = os.environ.get("LOOKALIKE_WEIGHTS")
    places = []
    if spec.weight_file:
        places.append(f"$LOOKALIKE_WEIGHTS/{spec.weight_file}"
                      + (f" ({folder}: not there)" if folder else " (LOOKALIKE_WEIGHTS is unset)"))
    places.append(f"the {spec.library} hub for '{spec.model_id}"
                  + (f"/{spec.tag}'" if spec.tag else "'"))
    return places


@contextmanager
def pinned_copy(path: Path) -> Iterator[tuple[Path, str]]:
    """(a private copy of `path`, the sha256 of its bytes), from one read of the file.

    Libraries load weights from a path. Hashing the file and then loading it reads it twice, and a file replaced in
    between gives a fingerprint that names other weights than those that made the embeddings. The copy, in a fresh
    folder only this user can enter and under the same name (libraries pick the format by suffix), holds exactly the
    bytes hashed; it is removed afterwards."""
    folder = Path(tempfile.mkdtemp(prefix="lookalike-weights-"))
    copy = folder / path.name
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as source, open(copy, "wb") as target:
            for block in iter(lambda: source.read(1 << 20), b""):
                digest.update(block)
                target.write(block)
        yield copy, digest.hexdigest()
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def hub_identity(spec: ModelSpec) -> str:
    """A hub model's identity for fingerprints: its id and tag (the hub names the file)."""
    return f"hub:{spec.model_id}" + (f"/{spec.tag}" if spec.tag else "")


def load_with_fallback(spec: ModelSpec, from_file: Callable[[Path], T], from_hub: Callable[[], T]) -> tuple[T, str]:
    """(the model, its weights' identity), from a local file when one resolves, else from the hub; one clear error
    otherwise. A local file's identity is the sha256 of the very bytes the model was loaded from (`pinned_copy`)."""
    path = local_weights(spec)
    if path is not None:
        with pinned_copy(path) as (copy, sha256):
            return from_file(copy), "sha256:" + sha256
    try:
        return from_hub(), hub_identity(spec)
    except Exception as err:  # hub errors come in many types (HTTP, offline, missing file)
        hint = (f"put {spec.weight_file} in $LOOKALIKE_WEIGHTS or " if spec.weight_file else "")
        raise WeightsUnavailable(
            f"cannot load {spec.library} model '{spec.name}': tried {'; '.join(places_tried(spec))}"
            f" -> {one_line(err)}. "
            f"To fix: {hint}append @/path/to/weights to the model name"
        ) from err


def _hash_memo() -> Path:
    return user_cache_dir() / "file-hashes.json"


def _read_hash_memo() -> dict:
    """{resolved path: {"stat": [...], "sha256": hex}}; an unreadable or garbled memo counts as empty."""
    try:
        memo = json.loads(_hash_memo().read_text())
    except (OSError, ValueError):
        return {}
    return memo if isinstance(memo, dict) else {}


def _remember_hash(path: str, stamp: list[int], digest: str) -> None:
    """Add one hash to the memo (entries of files gone are dropped); a memo that cannot be written is no error."""
    memo = {key: entry for key, entry in _read_hash_memo().items() if Path(key).exists()}
    memo[path] = {"stat": stamp, "sha256": digest}
    try:
        _hash_memo().parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(_hash_memo(), json.dumps(memo))
    except OSError:
        pass


def file_stamp(path: Path | None) -> tuple[int, ...]:
    """(size, mtime, inode, ctime) of a file, () for none: what changes when the file is rewritten or replaced."""
    if path is None:
        return ()
    stat = Path(path).stat()
    return stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_ctime_ns


def file_sha256(path: Path) -> str:
    """sha256 of a weight file, remembered across processes while its (path, size, mtime, inode, ctime) stay the
    same: a query checks a cache's fingerprint without reading a 1 GB file again. ctime is part of the key because
    a rewrite in place keeps the inode and mtime can be set back; nothing can set ctime back."""
    path = Path(path).resolve()
    stamp = list(file_stamp(path))
    entry = _read_hash_memo().get(str(path))
    if isinstance(entry, dict) and entry.get("stat") == stamp and _is_sha256(entry.get("sha256")):
        return entry["sha256"]
    digest = sha256_of(path)
    _remember_hash(str(path), stamp, digest)
    return digest


def _is_sha256(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)

"""Files written atomically and hashed once: the one place for both, imported by every layer above.

An atomic write goes to a temporary sibling, is flushed to disk and renamed over the target, so a crash
leaves either the old file or the new one, never half of one.
"""
from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from pathlib import Path


def user_cache_dir() -> Path:
    """lookalike's per-user cache: ONNX exports, file hashes, extracted datasets, error reports.
    $LOOKALIKE_CACHE_DIR, else the platform's (XDG_CACHE_HOME/lookalike, ~/.cache/lookalike on Linux)."""
    import platformdirs

    return Path(os.environ.get("LOOKALIKE_CACHE_DIR") or platformdirs.user_cache_path("lookalike"))


def user_config_dir() -> Path:
    """lookalike's per-user config folder: $LOOKALIKE_CONFIG_DIR, else the platform's (XDG_CONFIG_HOME/lookalike,
    ~/.config/lookalike on Linux)."""
    import platformdirs

    return Path(os.environ.get("LOOKALIKE_CONFIG_DIR") or platformdirs.user_config_path("lookalike"))


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call `write(tmp)` on a temporary sibling of `path`, fsync it and rename it over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def write_text_atomic(path: str | Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text))


def read_hashed(path: Path) -> tuple[bytes, str]:
    """A file's bytes and their hex sha256, from one read."""
    data = Path(path).read_bytes()
    return data, hashlib.sha256(data).hexdigest()


def sha256_of(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()

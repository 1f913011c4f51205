"""ONNX Runtime sessions made from bytes that were hashed as they were read: the torch-free half of the ONNX path.

A session is never made from a path: the bytes a session runs are the bytes whose sha256 was taken, so a file
replaced between hashing and loading cannot slip in.
"""
from __future__ import annotations

import os
import stat
import sys
import tempfile
from functools import lru_cache
from pathlib import Path

from lookalike.models.files import user_cache_dir


def not_private(folder: Path) -> str | None:
    """Why another user could put a file into `folder`, checked the way ssh checks its files: the folder and every
    folder above it must be owned by this user or root, and writable by no one else (a sticky folder above it, as
    /tmp, is fine: others cannot rename what is ours there). None when it is private."""
    uid = os.getuid()
    for part in [folder, *folder.parents]:
        info = part.stat()
        if info.st_uid not in (uid, 0):
            return f"{part} belongs to user id {info.st_uid}"
        if info.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and (part == folder or not info.st_mode & stat.S_ISVTX):
            return f"{part} is writable by other users"
    return None


@lru_cache(maxsize=8)
def _private_export_dir(configured: str) -> Path:
    folder = Path(configured)
    try:
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        problem = not_private(folder.resolve())
    except OSError as err:
        problem = f"{folder} cannot be used ({err.strerror or err})"
    if problem is None:
        return folder
    fallback = Path(tempfile.mkdtemp(prefix="lookalike-onnx-"))
    print(f"lookalike: ONNX exports are trusted only from a private folder and {problem}; exporting into "
          f"{fallback} for this run", file=sys.stderr)
    return fallback


def export_dir() -> Path:
    """Where exports are kept: $LOOKALIKE_CACHE_DIR/onnx (the platform's user cache, by default), made private
    (0700). When it is not private (a shared folder where anyone could plant an export), a private temporary
    folder for this process instead, said once on stderr."""
    return _private_export_dir(str(user_cache_dir() / "onnx"))


def session_from_bytes(model: bytes, threads: int):
    """An ONNX Runtime CPU session over `model` (the bytes of an .onnx file) with `threads` intra-op threads."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    # Idle threads sleep instead of spinning: spinning took the cores from the image-decoding threads and
    # from torch (naive build 30 -> 13 images/s, warm query 29 -> 63 ms in one process; BENCHMARKS.md).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])

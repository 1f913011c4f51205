"""ONNX Runtime sessions made from bytes that were hashed as they were read: the torch-free half of the ONNX path.

A session is never made from a path: the bytes a session runs are the bytes whose sha256 was taken, so a file
replaced between hashing and loading cannot slip in.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from lookalike.models.files import user_cache_dir


def export_dir() -> Path:
    """Where exports are kept: $LOOKALIKE_CACHE_DIR/onnx (the platform's user cache, by default)."""
    return user_cache_dir() / "onnx"


def read_hashed(path: Path) -> tuple[bytes, str]:
    """A file's bytes and their hex sha256, from one read."""
    data = Path(path).read_bytes()
    return data, hashlib.sha256(data).hexdigest()


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

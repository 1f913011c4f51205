"""Weight-file hashes are remembered across processes, and never trusted once the file may have changed."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lookalike.models import weights
from lookalike.models.files import user_cache_dir
from lookalike.models.weights import file_sha256

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def weight_file(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("LOOKALIKE_CACHE_DIR", str(tmp_path / "user-cache"))
    path = tmp_path / "w.safetensors"
    path.write_bytes(b"A" * 4096)
    return path


def refuse_to_hash(monkeypatch) -> None:
    def fail(path):
        raise AssertionError(f"{path} was read again")

    monkeypatch.setattr(weights, "sha256_of", fail)


def test_a_hash_made_by_another_process_is_not_recomputed(weight_file, monkeypatch):
    script = f"from lookalike.models.weights import file_sha256; print(file_sha256({str(weight_file)!r}))"
    another = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=ROOT,
                             env=dict(os.environ, PYTHONPATH=str(ROOT)))
    digest = another.stdout.strip()
    assert digest == hashlib.sha256(weight_file.read_bytes()).hexdigest()
    refuse_to_hash(monkeypatch)
    assert file_sha256(weight_file) == digest


def test_another_file_under_the_same_name_size_and_mtime_is_hashed_again(weight_file):
    file_sha256(weight_file)
    stat = weight_file.stat()
    other = weight_file.with_name("other")
    other.write_bytes(b"B" * 4096)
    os.utime(other, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    os.replace(other, weight_file)
    assert file_sha256(weight_file) == hashlib.sha256(b"B" * 4096).hexdigest()


def test_a_rewrite_in_place_with_the_mtime_set_back_is_hashed_again(weight_file):
    file_sha256(weight_file)
    stat = weight_file.stat()
    with open(weight_file, "r+b") as handle:
        handle.write(b"C")
    os.utime(weight_file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert file_sha256(weight_file) == hashlib.sha256(b"C" + b"A" * 4095).hexdigest()


@pytest.mark.parametrize("garbage", [b"", b"{not json", b"[1, 2]", b'{"%s": {"stat": 1, "sha256": 5}}'])
def test_a_corrupt_memo_is_ignored(weight_file, garbage):
    memo = user_cache_dir() / "file-hashes.json"
    memo.parent.mkdir(parents=True)
    memo.write_bytes(garbage.replace(b"%s", str(weight_file.resolve()).encode()))
    assert file_sha256(weight_file) == hashlib.sha256(weight_file.read_bytes()).hexdigest()

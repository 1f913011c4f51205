"""Every kind of damage to a cache gives one line that names the cache and the problem, never a traceback or a
wrong answer: text files, the manifest's fields, CURRENT, each column's kind and shape, non-finite rows, and the
pending chunks of an interrupted build (set aside, so the build goes on)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from lookalike.cli import cli
from lookalike.pipeline.build import build_cache


def edit_manifest(change):
    def damage(generation: Path) -> None:
        manifest = json.loads((generation / "manifest.json").read_text())
        change(manifest)
        (generation / "manifest.json").write_text(json.dumps(manifest))
    return damage


def edit_column(name: str, change, allow_pickle: bool = False):
    def damage(generation: Path) -> None:
        np.save(generation / f"{name}.npy", change(np.load(generation / f"{name}.npy")), allow_pickle=allow_pickle)
    return damage


def write(name: str, data: bytes, at_root: bool = False):
    def damage(generation: Path) -> None:
        (generation.parent if at_root else generation).joinpath(name).write_bytes(data)
    return damage


def with_row(value: float):
    def change(matrix: np.ndarray) -> np.ndarray:
        matrix = matrix.copy()
        matrix[5, 3] = value
        return matrix
    return change


def first_byte_damaged(path_name: str, at_root: bool = False):
    def damage(generation: Path) -> None:
        path = (generation.parent if at_root else generation) / path_name
        data = bytearray(path.read_bytes())
        data[len(data) // 2] = 0xFF
        path.write_bytes(bytes(data))
    return damage


DAMAGE = {
    "manifest not UTF-8": first_byte_damaged("manifest.json"),
    "manifest not JSON": lambda g: (g / "manifest.json").write_text((g / "manifest.json").read_text()[:40]),
    "manifest empty": write("manifest.json", b""),
    "manifest a list": write("manifest.json", b"[1, 2]"),
    "manifest missing": lambda g: (g / "manifest.json").unlink(),
    "manifest without config": edit_manifest(lambda m: m.pop("config")),
    "manifest of a future format": edit_manifest(lambda m: m.update(format_version=99)),
    "count a string": edit_manifest(lambda m: m.update(count="18")),
    "count wrong": edit_manifest(lambda m: m.update(count=17)),
    "dim negative": edit_manifest(lambda m: m.update(dim=-1)),
    "dba a string": edit_manifest(lambda m: m.update(dba="x")),
    "dba one number": edit_manifest(lambda m: m.update(dba=[5])),
    "bucket_by unknown": edit_manifest(lambda m: m.update(bucket_by="nearest")),
    "fused_weight a word": edit_manifest(lambda m: m.update(fused_weight="heavy")),
    "class_names a list": edit_manifest(lambda m: m.update(class_names=[])),
    "exports a string": edit_manifest(lambda m: m.update(exports="x")),
    "CURRENT not UTF-8": write("CURRENT", b"gen-\xff\xfe", at_root=True),
    "CURRENT climbs out": write("CURRENT", b"../../etc", at_root=True),
    "CURRENT names no generation": write("CURRENT", b"gen-999999", at_root=True),
    "CURRENT empty": write("CURRENT", b"", at_root=True),
    "column missing": lambda g: (g / "embeddings.npy").unlink(),
    "column truncated": lambda g: (g / "embeddings.npy").write_bytes((g / "embeddings.npy").read_bytes()[:300]),
    "column short": edit_column("labels", lambda c: c[:-1]),
    "column of objects": edit_column("labels", lambda c: c.astype(object), allow_pickle=True),
    "paths 2-D": edit_column("paths", lambda c: c[:, None]),
    "sizes 2-D": edit_column("sizes", lambda c: c[:, None]),
    "embeddings 1-D": edit_column("embeddings", lambda c: c[:, 0].copy()),
    "embeddings of another width": edit_column("embeddings", lambda c: c[:, :-1].copy()),
    "embeddings with NaN": edit_column("embeddings", with_row(np.nan)),
    "embeddings with infinity": edit_column("embeddings", with_row(np.inf)),
    "boxes 3 wide": edit_column("boxes", lambda c: c[:, :3].copy()),
    "classes of floats": edit_column("classes", lambda c: c.astype(np.float32)),
    "probs wider than classes": edit_column("probs", lambda c: np.concatenate([c, c], axis=1)),
    "path climbing out": edit_column("paths", lambda c: np.where(np.arange(len(c)) == 3, "../../etc/passwd", c)),
    "absolute path": edit_column("paths", lambda c: np.where(np.arange(len(c)) == 3, "/etc/passwd", c)),
}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    from tests.conftest import SHAPES, TINY_CLASSIFIER, TINY_EMBEDDER, draw_shape
    from lookalike.pipeline.config import PipelineConfig

    root = tmp_path_factory.mktemp("damage")
    for label, (colour, shape) in SHAPES.items():
        for i in range(6):
            draw_shape(root / "gallery" / label / f"{i}.png", colour, shape, seed=100 * list(SHAPES).index(label) + i)
    config = PipelineConfig(classifier=TINY_CLASSIFIER, embedder=TINY_EMBEDDER, device="cpu", batch_size=4,
                            buckets="topk:3", runtime="torch")
    build_cache(root / "gallery", root / "cache", config)
    return root


def copy_of(pristine: Path, tmp_path: Path) -> tuple[Path, Path]:
    cache = tmp_path / "cache"
    shutil.copytree(pristine / "cache", cache)
    return cache, cache / (cache / "CURRENT").read_text()


def assert_one_line_error(result, cache: Path) -> str:
    """The command failed with one error line, its last (a build's progress bar may come before it)."""
    lines = result.output.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert result.exit_code == 1, result.output
    assert errors == lines[-1:] and "a bug" not in errors[0] and "Traceback" not in result.output, result.output
    assert str(cache) in errors[0], errors[0]
    return errors[0]


@pytest.mark.parametrize("kind", DAMAGE)
def test_each_damaged_cache_gives_one_line_in_query_and_duplicates(pristine, tmp_path, kind):
    cache, generation = copy_of(pristine, tmp_path)
    DAMAGE[kind](generation)
    photo = str(pristine / "gallery" / "red_circles" / "0.png")
    runner = CliRunner()
    assert_one_line_error(runner.invoke(cli, ["query", photo, "--cache", str(cache), "--device", "cpu"]), cache)
    assert_one_line_error(runner.invoke(cli, ["duplicates", "--cache", str(cache)]), cache)


@pytest.mark.parametrize("kind", ["CURRENT not UTF-8", "manifest not UTF-8", "embeddings with NaN", "paths 2-D"])
def test_serve_refuses_a_damaged_cache_in_one_line_before_listening(pristine, tmp_path, kind):
    cache, generation = copy_of(pristine, tmp_path)
    DAMAGE[kind](generation)
    assert_one_line_error(CliRunner().invoke(cli, ["serve", "--cache", str(cache), "--device", "cpu"]), cache)


@pytest.mark.parametrize("kind", ["CURRENT not UTF-8", "manifest not UTF-8", "embeddings with NaN", "paths 2-D"])
def test_a_rebuild_always_replaces_a_damaged_cache(pristine, tmp_path, kind):
    from tests.conftest import TINY_CLASSIFIER, TINY_EMBEDDER

    cache, generation = copy_of(pristine, tmp_path)
    DAMAGE[kind](generation)
    args = ["build-cache", "--gallery", str(pristine / "gallery"), "--out", str(cache), "--classifier",
            TINY_CLASSIFIER, "--embedder", TINY_EMBEDDER, "--device", "cpu", "--runtime", "torch"]
    runner = CliRunner()
    assert_one_line_error(runner.invoke(cli, args), cache)  # an update refuses it, saying how to fix it
    rebuilt = runner.invoke(cli, [*args, "--rebuild"])
    assert rebuilt.exit_code == 0, rebuilt.output
    found = runner.invoke(cli, ["query", str(pristine / "gallery" / "red_circles" / "0.png"), "--cache", str(cache),
                                "--device", "cpu", "--json"])
    assert found.exit_code == 0 and json.loads(found.output)[0]["results"][0]["path"].endswith("red_circles/0.png")


PENDING_DAMAGE = {
    "fingerprint not UTF-8": lambda p: (p / "fingerprint.json").write_bytes(b"{\xff"),
    "fingerprint not JSON": lambda p: (p / "fingerprint.json").write_text("{"),
    "chunk garbage": lambda p: (p / "chunk-000000.npz").write_bytes(b"PK\x03\x04 not a zip"),
    "chunk with 2-D paths": lambda p: np.savez(p / "chunk-000000.npz", **{
        **{name: value for name, value in np.load(p / "chunk-000000.npz").items()},
        "paths": np.load(p / "chunk-000000.npz")["paths"][:, None]}),
}


@pytest.mark.parametrize("kind", PENDING_DAMAGE)
def test_a_damaged_pending_folder_is_set_aside_and_the_build_goes_on(pristine, tmp_path, kind):
    from lookalike.cache.pending import PendingChunks
    from lookalike.cache.store import load_cache
    from tests.conftest import TINY_CLASSIFIER, TINY_EMBEDDER

    cache, generation = copy_of(pristine, tmp_path)
    (generation.parent / "CURRENT").unlink()
    shutil.rmtree(generation)
    manifest = json.loads((pristine / "cache" / (pristine / "cache" / "CURRENT").read_text() / "manifest.json")
                          .read_text())
    previous = load_cache(pristine / "cache")
    pending = PendingChunks(cache, manifest["fingerprint"])
    pending.append({name: np.asarray(column)[:6] for name, column in previous.columns.items() if name != "dba"})
    PENDING_DAMAGE[kind](cache / "pending")
    result = CliRunner().invoke(cli, ["build-cache", "--gallery", str(pristine / "gallery"), "--out", str(cache),
                                      "--classifier", TINY_CLASSIFIER, "--embedder", TINY_EMBEDDER, "--device", "cpu",
                                      "--runtime", "torch"])
    assert result.exit_code == 0, result.output
    assert "18 embedded" in result.output
    assert "set aside" in result.output
    assert (cache / "pending.damaged").is_dir()
    assert len(load_cache(cache)) == 18


def test_a_full_disk_leaves_no_staging_and_a_retry_after_freeing_space_succeeds(pristine, tmp_path, monkeypatch):
    import errno

    from lookalike.cache import generations
    from tests.conftest import TINY_CLASSIFIER, TINY_EMBEDDER

    real_write = generations._write_npy
    full = {"disk": True}

    def write_until_full(path, *args):
        if full["disk"] and path.name == "embeddings.npy":
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(path, *args)

    monkeypatch.setattr(generations, "_write_npy", write_until_full)
    cache = tmp_path / "cache"
    args = ["build-cache", "--gallery", str(pristine / "gallery"), "--out", str(cache), "--classifier",
            TINY_CLASSIFIER, "--embedder", TINY_EMBEDDER, "--device", "cpu", "--runtime", "torch"]
    runner = CliRunner()
    for _ in range(2):  # each failed try cleans up after itself
        line = assert_one_line_error(runner.invoke(cli, args), cache)
        assert "no space left on /" in line and "need about" in line, line
        assert not list(cache.glob("gen-*")), "staging of a failed publish was left behind"
    full["disk"] = False
    retried = runner.invoke(cli, args)
    assert retried.exit_code == 0, retried.output
    assert "18 images in cache (0 embedded, 18 reused" in retried.output  # the embedded rows were kept in pending/


def test_staging_left_by_a_killed_publish_is_removed_before_the_next_one(pristine, tmp_path):
    from lookalike.cache.generations import write_generation
    from lookalike.cache.store import load_cache

    cache, generation = copy_of(pristine, tmp_path)
    leftover = cache / "gen-000007.tmp"
    leftover.mkdir()
    (leftover / "embeddings.npy").write_bytes(b"\0" * 4096)
    previous = load_cache(cache, mmap=False)
    write_generation(cache, previous.manifest, previous.columns)
    assert not leftover.exists()
    assert sorted(p.name for p in cache.glob("gen-*")) == [(cache / "CURRENT").read_text()]

"""A cache survives crashes at every step of a publish, concurrent builds and readers, and tampered files."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lookalike.cache import generations, mapped
from lookalike.cache.columns import empty_columns
from lookalike.cache.generations import write_generation
from lookalike.cache.manifest import CacheError, Manifest
from lookalike.cache.mapped import StackedRows
from lookalike.cache.store import load_cache
from lookalike.pipeline.build import build_cache
from tests.conftest import draw_shape

ROOT = Path(__file__).resolve().parents[1]


class Crash(BaseException):
    """An injected process death: nothing after it runs, no except clause of ours catches it."""


def crash_at(monkeypatch, point: str) -> None:
    """Die at one step of a publish: while writing the new generation, before its rename, before CURRENT
    switches to it, or after that, while old generations and pending chunks are removed."""
    def die(*args, **kwargs):
        raise Crash(point)

    if point == "staging":
        real_write = generations._write_npy
        monkeypatch.setattr(generations, "_write_npy",
                            lambda path, *a: die() if path.name == "embeddings.npy" else real_write(path, *a))
    elif point == "rename":
        real_replace = os.replace
        monkeypatch.setattr(os, "replace", lambda src, dst: die() if Path(src).is_dir()
                            else real_replace(src, dst))
    elif point == "current":
        real_text = generations.write_text_atomic
        monkeypatch.setattr(generations, "write_text_atomic",
                            lambda path, text: die() if path.name == "CURRENT" else real_text(path, text))
    elif point == "cleanup":
        real_rmtree = shutil.rmtree
        monkeypatch.setattr(shutil, "rmtree", lambda path, *a, **k: die()
                            if Path(path).name.startswith(("gen-", "pending")) else real_rmtree(path, *a, **k))


@pytest.mark.parametrize("point", ["staging", "rename", "current", "cleanup"])
@pytest.mark.parametrize("first_build", [True, False])
def test_a_crash_at_any_publish_step_is_recovered_by_the_next_build(gallery, tiny_config, tmp_path, monkeypatch,
                                                                    point, first_build):
    out = tmp_path / "cache"
    if not first_build:
        build_cache(gallery, out, tiny_config)
        draw_shape(gallery / "red_circles" / "new.png", (220, 30, 30), "ellipse", seed=7)
    with monkeypatch.context() as patch:
        crash_at(patch, point)
        with pytest.raises(Crash):
            build_cache(gallery, out, tiny_config)
    if not first_build or point == "cleanup":
        assert len(load_cache(out)) in (18, 19)  # the last good generation (or the new one) answers
    summary = build_cache(gallery, out, tiny_config)
    assert summary.embedded == 0  # nothing embedded again: the work was in pending/ or published
    assert len(load_cache(out)) == 19 - first_build
    assert sorted(p.name for p in out.glob("gen-*")) == [(out / "CURRENT").read_text()]  # no leftovers
    if point == "rename":  # the crash that used to block every later build, --rebuild included
        assert build_cache(gallery, out, tiny_config, rebuild=True).embedded == 19 - first_build


def test_a_second_build_into_the_same_cache_is_refused_naming_the_holder(gallery, tiny_config, tmp_path):
    out = tmp_path / "cache"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from lookalike.cache.lock import BuildLock\n"
        f"with BuildLock(Path({str(out)!r})):\n    print('held', flush=True); time.sleep(60)")],
        cwd=ROOT, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(CacheError, match=rf"another build is writing this cache \(pid {holder.pid} on "):
            build_cache(gallery, out, tiny_config)
    finally:
        holder.kill()
        holder.wait()
    assert build_cache(gallery, out, tiny_config).images == 18  # a dead holder frees the lock


def small_columns(count: int, seed: int) -> dict[str, np.ndarray]:
    columns = empty_columns(8, 3)
    rng = np.random.default_rng(seed)
    columns.update(paths=np.array([f"{i}.png" for i in range(count)]), sizes=np.zeros(count, np.int64),
                   mtimes=np.zeros(count, np.int64), labels=np.array(["a"] * count),
                   label_classes=np.full(count, -1, np.int32), classes=rng.integers(0, 5, (count, 3)).astype(np.int32),
                   probs=np.full((count, 3), 0.3, np.float32), boxes=np.zeros((count, 4), np.float32),
                   embeddings=rng.normal(size=(count, 8)).astype(np.float32))
    return columns


def test_queries_never_fail_while_builds_publish(tmp_path):
    out = tmp_path / "cache"
    write_generation(out, Manifest({}, {}, str(tmp_path), 50, 8), small_columns(50, 0))
    writer = subprocess.Popen([sys.executable, "-c", (
        "from pathlib import Path; from lookalike.cache.manifest import Manifest; from lookalike.cache.generations import write_generation\n"
        "from tests.test_cache_hardening import small_columns\n"
        f"for seed in range(1, 150):\n"
        f"    write_generation(Path({str(out)!r}), Manifest({{}}, {{}}, {str(tmp_path)!r}, 50, 8), "
        "small_columns(50, seed))")], cwd=ROOT)
    opened, failures = 0, []
    while writer.poll() is None:
        try:
            data = load_cache(out)
            np.asarray(data.columns["embeddings"]).sum()  # every column of the opened generation is readable
            opened += 1
        except CacheError as err:
            failures.append(str(err))
    assert writer.returncode == 0
    assert opened > 100 and failures == []


@pytest.fixture
def built(gallery, tiny_config, tmp_path) -> Path:
    out = tmp_path / "cache"
    build_cache(gallery, out, tiny_config)
    return out / (out / "CURRENT").read_text()


def rewrite_column(generation: Path, name: str, values: np.ndarray, allow_pickle: bool = False) -> None:
    np.save(generation / f"{name}.npy", values, allow_pickle=allow_pickle)


@pytest.mark.parametrize("path", ["../../etc/passwd", "/etc/passwd", "red_circles/../../../x.png"])
def test_paths_outside_the_gallery_are_refused_as_corrupt(built, path):
    paths = np.load(built / "paths.npy")
    paths[3] = path
    rewrite_column(built, "paths", paths)
    with pytest.raises(CacheError, match="outside the gallery root"):
        load_cache(built.parent)


def test_a_short_column_an_object_column_and_a_manifest_without_config_are_refused(built):
    labels = np.load(built / "labels.npy")
    rewrite_column(built, "labels", labels[:-1])
    with pytest.raises(CacheError, match="column labels has 17 rows, the manifest says 18"):
        load_cache(built.parent)
    rewrite_column(built, "labels", labels.astype(object), allow_pickle=True)
    with pytest.raises(CacheError, match="column labels is unreadable"):
        load_cache(built.parent)
    rewrite_column(built, "labels", labels)
    manifest = json.loads((built / "manifest.json").read_text())
    del manifest["config"]
    (built / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match="lacks config"):
        load_cache(built.parent)
    (built.parent / "CURRENT").write_text("../../etc")
    with pytest.raises(CacheError, match="not a generation"):
        load_cache(built.parent)


def test_rows_are_stored_grouped_by_top1_bucket(built):
    classes = load_cache(built.parent).columns["classes"][:, 0]
    changes = int(np.count_nonzero(np.diff(classes)))
    assert changes == len(np.unique(classes)) - 1  # each bucket one contiguous block


def test_an_update_holds_at_most_one_slice_of_the_old_matrix(tmp_path, monkeypatch):
    """The previous generation is streamed into the new one: gathered a slice at a time."""
    monkeypatch.setattr(mapped, "SLICE_BYTES", 64 * 8 * 4)  # 64 rows of 8 float32
    out = tmp_path / "cache"
    write_generation(out, Manifest({}, {}, str(tmp_path), 500, 8), small_columns(500, 0))
    previous = load_cache(out)
    gathered = []
    real_take = StackedRows.take
    monkeypatch.setattr(StackedRows, "take",
                        lambda self, rows: gathered.append(len(rows)) or real_take(self, rows))
    columns = {name: np.asarray(values) for name, values in previous.columns.items()}
    columns["embeddings"] = StackedRows([previous.columns["embeddings"]])
    write_generation(out, previous.manifest, columns)
    assert max(gathered) == 64 and sum(gathered) == 500
    again = load_cache(out)
    order = np.argsort(previous.columns["paths"])
    assert np.array_equal(np.asarray(again.columns["embeddings"])[np.argsort(again.columns["paths"])],
                          np.asarray(previous.columns["embeddings"])[order])


@pytest.mark.parametrize("field, value", [("dba", "x"), ("dba", [5]), ("bucket_by", "nearest"), ("count", "18"),
                                          ("fused_weight", "heavy"), ("class_names", []), ("exact_max_rows", 0),
                                          ("exact_max_rows", "many"), ("exact_max_rows", True), ("whitening", 1)])
def test_a_manifest_field_of_the_wrong_kind_is_refused_in_one_line(built, field, value):
    manifest = json.loads((built / "manifest.json").read_text())
    manifest[field] = value
    (built / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CacheError, match=f"manifest.json (field )?{field}"):
        load_cache(built.parent)


def test_a_gallery_larger_than_a_slice_without_crops_publishes(tmp_path, monkeypatch):
    """Crop boxes are NaN when nothing was cropped: only the vector columns must be finite, whatever their size."""
    monkeypatch.setattr(mapped, "SLICE_BYTES", 64 * 8 * 4)  # 64 rows of 8 float32: every column goes in slices
    columns = small_columns(500, 0)
    columns["boxes"] = np.full((500, 4), np.nan, np.float32)
    write_generation(tmp_path / "cache", Manifest({}, {}, str(tmp_path), 500, 8), columns)
    assert np.isnan(load_cache(tmp_path / "cache").columns["boxes"]).all()
    columns["embeddings"][300, 2] = np.inf
    with pytest.raises(CacheError, match="embeddings row .* is not finite"):
        write_generation(tmp_path / "other", Manifest({}, {}, str(tmp_path), 500, 8), columns)


def test_a_large_cache_opens_without_reading_its_vectors_and_a_search_refuses_a_row_that_is_not_finite(
        tmp_path, monkeypatch):
    """10^7 rows are 10 GB: above CHECKED_AT_OPEN_BYTES a cache opens without reading its vectors and paths, and a
    search that scores a damaged row, or finds a row whose path leaves the gallery, says so in one line instead of
    ranking it first or returning it."""
    from lookalike.cache import columns as columns_module
    from lookalike.cache.policies import FLAT, parse_policy
    from lookalike.cache.search import Searcher

    write_generation(tmp_path / "cache", Manifest({}, {}, str(tmp_path), 500, 8), small_columns(500, 0))
    generation = tmp_path / "cache" / (tmp_path / "cache" / "CURRENT").read_text()
    stored = np.load(generation / "embeddings.npy", mmap_mode="r+")
    query = np.abs(np.asarray(stored[300])) / np.linalg.norm(stored[300])
    stored[300, 2] = np.inf
    stored.flush()
    del stored
    with pytest.raises(CacheError, match="embeddings row 300 .* is not finite"):
        load_cache(tmp_path / "cache")
    monkeypatch.setattr(columns_module, "CHECKED_AT_OPEN_BYTES", 0)
    searcher = Searcher(load_cache(tmp_path / "cache"))
    for policy in (FLAT, parse_policy("flat+qe:2")):
        with pytest.raises(CacheError, match=r"row 300 \('\d+.png'\) is not finite"):
            searcher.search(query, policy, 5)
    paths = np.load(generation / "paths.npy")
    np.save(generation / "paths.npy", np.where(np.arange(len(paths)) == 300, "../../etc/passwd", paths))
    stored = np.load(generation / "embeddings.npy", mmap_mode="r+")
    stored[300] = 100 * query  # the best inner product (these rows are not unit vectors)
    stored.flush()
    del stored
    data = load_cache(tmp_path / "cache")
    with pytest.raises(CacheError, match=r"row 300 names '../../etc/passwd', outside the gallery root"):
        Searcher(data).search(query, FLAT, 5)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_read_rows_reads_near_rows_in_one_call_and_returns_exactly_the_rows_asked(tmp_path, monkeypatch, dtype):
    """read_rows (candidates re-scored from a memory-mapped matrix) merges rows closer than MERGE_BYTES into one
    pread: 1,024 scattered candidates of one bucket are one call, not 1,024."""
    written = np.lib.format.open_memmap(tmp_path / "m.npy", "w+", dtype, (20_000, 64))
    written[:] = np.random.default_rng(0).normal(size=written.shape)
    written.flush()
    matrix = np.load(tmp_path / "m.npy", mmap_mode="r")
    calls = []
    real_pread = mapped.os.pread
    monkeypatch.setattr(mapped.os, "pread", lambda *args: calls.append(args) or real_pread(*args))
    rng = np.random.default_rng(1)
    near = np.concatenate([rng.choice(np.arange(5_000, 15_000), 1_024, replace=False), [7_000, 7_000]])
    assert np.array_equal(mapped.read_rows(matrix, near), np.asarray(matrix[near], np.float32))
    assert len(calls) == 1
    calls.clear()
    far = np.array([19_999, 0, 10_000])  # farther apart than MERGE_BYTES: one call each
    assert np.array_equal(mapped.read_rows(matrix, far), np.asarray(matrix[far], np.float32)) and len(calls) == 3


def test_read_rows_of_a_matrix_in_memory_gives_the_rows_in_the_order_asked():
    """One ascending run of rows is read as a view (a k-NN graph's slices of 10^6 rows are not copied); any other
    order, a reordered run included (knn_rows searches rows in the order of their lists), is gathered as asked."""
    matrix = np.arange(40, dtype=np.float32).reshape(20, 2)
    for rows in ([1, 3, 2, 4], [0, 0, 2], [7, 6], [5], [3, 4, 5]):
        assert np.array_equal(mapped.read_rows(matrix, np.array(rows)), matrix[rows]), rows
    assert np.shares_memory(mapped.read_rows(matrix, np.arange(3, 9)), matrix)


def test_read_rows_of_a_builds_stacked_rows_gathers_them_from_their_parts():
    """A build makes its gallery index from its rows where they are (the previous generation and the pending chunks,
    a float16 part included), a slice or a sample at a time, without gathering every row first."""
    parts = [np.arange(20, dtype=np.float32).reshape(10, 2), np.arange(20, 40, dtype=np.float16).reshape(10, 2)]
    whole = np.concatenate([p.astype(np.float32) for p in parts])
    selection = np.array([12, 0, 1, 2, 19, 5])
    stacked = mapped.StackedRows(parts, selection)
    for rows in ([0, 1, 2, 3], [5, 0, 3], [4]):
        assert np.array_equal(mapped.read_rows(stacked, np.array(rows)), whole[selection[rows]]), rows

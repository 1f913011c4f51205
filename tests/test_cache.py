"""build-cache: results come back, crashes lose nothing, updates embed only what changed."""
from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from lookalike.pipeline import build
from lookalike.cache.policies import parse_policy
from lookalike.cache.search import Searcher
from lookalike.cache.manifest import CacheError
from lookalike.cache.pending import PendingChunks
from lookalike.cache.store import load_cache
from lookalike.pipeline.build import build_cache
from lookalike.pipeline.items import Item
from lookalike.pipeline.pipeline import build_pipeline
from lookalike.pipeline.query import open_query_pipeline
from tests.conftest import draw_shape


def test_querying_a_gallery_image_finds_itself_first(gallery, tiny_config, tmp_path):
    summary = build_cache(gallery, tmp_path / "cache", tiny_config)
    assert summary.images == 18 and summary.embedded == 18 and not summary.skipped
    pipeline, _ = open_query_pipeline(tmp_path / "cache", {"buckets": "flat", "k": 3})
    [item] = list(pipeline.run([str(gallery / "blue_squares" / "2.png")]))
    assert item.results[0].path == "blue_squares/2.png" and item.results[0].label == "blue_squares"
    assert item.results[0].score == pytest.approx(1.0, abs=1e-4)
    assert [r.rank for r in item.results] == [1, 2, 3]


def test_bad_files_are_skipped_and_reported_not_fatal(gallery, tiny_config, tmp_path):
    (gallery / "red_circles" / "empty.jpg").write_bytes(b"")
    (gallery / "red_circles" / "notes.png").write_text("not an image")
    (gallery / "README.txt").write_text("ignored: not an image extension")
    summary = build_cache(gallery, tmp_path / "cache", tiny_config)
    assert summary.images == 18
    assert {s["path"] for s in summary.skipped} == {"red_circles/empty.jpg", "red_circles/notes.png"}
    assert load_cache(tmp_path / "cache").manifest.skipped == summary.skipped


def test_update_embeds_only_new_and_changed_and_drops_deleted(gallery, tiny_config, tmp_path):
    out = tmp_path / "cache"
    build_cache(gallery, out, tiny_config)
    draw_shape(gallery / "red_circles" / "new.png", (220, 30, 30), "ellipse", seed=99)
    changed = gallery / "blue_squares" / "0.png"
    Image.new("RGB", (96, 96), "black").save(changed)
    os.utime(changed, ns=(10**18, 10**18))
    (gallery / "green_triangles" / "1.png").unlink()
    summary = build_cache(gallery, out, tiny_config)
    assert (summary.embedded, summary.reused, summary.removed, summary.images) == (2, 16, 1, 18)
    data = load_cache(out)
    assert "green_triangles/1.png" not in data.columns["paths"].tolist()
    assert len(list(out.glob("gen-*"))) == 1  # the superseded generation is gone


def test_an_unchanged_gallery_keeps_its_cache_and_any_change_builds_again(gallery, tiny_config, tmp_path,
                                                                          monkeypatch):
    """Nothing changed (a bad file still bad): the generation is kept and `auto` not validated again (about a minute
    at 10^6 rows). A label, a setting or a damaged index makes a new one."""
    out, labels = tmp_path / "cache", tmp_path / "labels.json"
    (gallery / "red_circles" / "empty.jpg").write_bytes(b"")
    labels.write_text('{"red_circles/0.png": "red", "blue_squares/0.png": "blue"}')
    options = {"index": "ivf", "labels_file": labels}
    build_cache(gallery, out, tiny_config, **options)
    kept = load_cache(out).generation
    validated = []
    real_choice = build.choose_policy
    monkeypatch.setattr(build, "choose_policy", lambda *args, **options: validated.append(1) or real_choice(
        *args, **options))
    summary = build_cache(gallery, out, tiny_config, **options)
    assert summary.unchanged and not validated and load_cache(out).generation == kept
    assert (summary.images, summary.embedded, len(summary.skipped)) == (18, 0, 1) and summary.index["kind"] == "ivf"
    assert "unchanged" in summary.line() and "images/s" not in summary.line()  # no rate of nothing embedded
    relabelled = lambda: labels.write_text('{"red_circles/0.png": "crimson", "blue_squares/0.png": "blue"}')
    damaged_index = lambda: kept.joinpath("index.json").write_text("{}")
    changes = [(relabelled, {}), (None, {"float16": True}), (None, {"exact_max_rows": 8}), (None, {"index": "exact"}),
               (damaged_index, {})]
    for change, setting in changes:
        if change:
            change()
        validated.clear()
        summary = build_cache(gallery, out, tiny_config, **{**options, **setting})
        assert not summary.unchanged and validated and load_cache(out).generation != kept, setting
        kept = load_cache(out).generation
        if setting:  # back to the options the next change starts from
            build_cache(gallery, out, tiny_config, **options)
            kept = load_cache(out).generation
    assert load_cache(out).columns["labels"].tolist().count("crimson") == 1


def test_a_manifest_with_planted_skip_entries_is_built_again_not_a_crash(gallery, tiny_config, tmp_path):
    """The skipped list of a manifest is compared whatever its entries hold: planted ones make a new generation."""
    out = tmp_path / "cache"
    build_cache(gallery, out, tiny_config)
    planted = load_cache(out).generation / "manifest.json"
    manifest = json.loads(planted.read_text())
    planted.write_text(json.dumps({**manifest, "skipped": [{}, "x", 3, None, {"path": [1]}]}))
    summary = build_cache(gallery, out, tiny_config)
    assert not summary.unchanged and load_cache(out).manifest.skipped == []


def pending_rows(out: Path) -> int:
    return sum(len(np.load(path)["paths"]) for path in (out / "pending").glob("chunk-*.npz"))


def crash_on_third_batch(monkeypatch, pipeline, error=KeyboardInterrupt):
    """Make the pipeline's last stage raise on its third batch; returns the undo."""
    embed = pipeline.stages[-1]
    original, calls = type(embed).__call__, {"n": 0}

    def crashing(self, items):
        calls["n"] += 1
        if calls["n"] == 3:
            raise error
        return original(self, items)

    monkeypatch.setattr(type(embed), "__call__", crashing)
    return lambda: monkeypatch.setattr(type(embed), "__call__", original)


def test_ctrl_c_saves_the_finished_images_and_the_rerun_resumes(gallery, tiny_config, tmp_path, monkeypatch):
    out = tmp_path / "cache"
    pipeline = build_pipeline(tiny_config)  # batches of 4 images
    undo = crash_on_third_batch(monkeypatch, pipeline)
    with pytest.raises(KeyboardInterrupt):
        build_cache(gallery, out, tiny_config, pipeline=pipeline)
    assert not (out / "CURRENT").exists()
    assert pending_rows(out) == 8  # two finished batches, saved although far from a full chunk
    undo()
    opened = []
    real_load = np.load
    monkeypatch.setattr(np, "load", lambda path, *a, **k: opened.append(Path(path).name) or real_load(path, *a, **k))
    summary = build_cache(gallery, out, tiny_config, pipeline=pipeline)
    assert summary.reused == 8 and summary.embedded == 10 and summary.images == 18
    assert not (out / "pending").exists()
    chunks = [name for name in opened if name.startswith("chunk-")]
    assert sorted(chunks) == sorted(set(chunks)) and len(chunks) == 2  # the saved chunk and the new one, once each


def test_a_new_pending_chunk_never_overwrites_one_left_after_a_gap(tmp_path):
    from lookalike.cache.columns import empty_columns

    columns = {name: np.asarray(values) for name, values in empty_columns(4, 2).items()}
    pending = PendingChunks(tmp_path, {"f": 1})
    for _ in range(3):
        pending.append(columns)
    (tmp_path / "pending" / "chunk-000001.npz").unlink()  # e.g. set aside as damaged
    again = PendingChunks(tmp_path, {"f": 1})
    again.append(columns)
    assert sorted(p.name for p in (tmp_path / "pending").glob("chunk-*")) == [
        "chunk-000000.npz", "chunk-000002.npz", "chunk-000003.npz"]


def test_slow_builds_save_chunks_by_time(gallery, tmp_path, monkeypatch):
    """A few images embedded over more than CHUNK_SECONDS are saved then, not when CHUNK_ROWS are reached."""
    clock = {"now": 0.0}
    monkeypatch.setattr(build.time, "monotonic", lambda: clock["now"])
    paths = sorted(p.relative_to(gallery).as_posix() for p in gallery.rglob("*.png"))[:3]
    stats = {p: (gallery / p).stat() for p in paths}
    writer = build.ChunkWriter(PendingChunks(tmp_path / "cache", {}), dict.fromkeys(paths), stats, topk=0)
    writer.add([Item(paths[0], embedding=np.ones(4, np.float32))])
    assert pending_rows(tmp_path / "cache") == 0  # neither full nor old
    clock["now"] = build.CHUNK_SECONDS + 1
    writer.add([Item(p, embedding=np.ones(4, np.float32)) for p in paths[1:]])
    assert pending_rows(tmp_path / "cache") == 3


def test_crash_while_publishing_keeps_the_last_good_cache(gallery, tiny_config, tmp_path, monkeypatch):
    out = tmp_path / "cache"
    build_cache(gallery, out, tiny_config)
    draw_shape(gallery / "red_circles" / "new.png", (220, 30, 30), "ellipse", seed=7)
    real_save = np.save
    calls = {"n": 0}

    def failing_save(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 4:
            raise OSError("disk full")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(np, "save", failing_save)
    with pytest.raises(OSError):
        build_cache(gallery, out, tiny_config)
    monkeypatch.setattr(np, "save", real_save)
    assert len(load_cache(out)) == 18  # the previous generation, intact
    assert build_cache(gallery, out, tiny_config).embedded == 0  # new image came from pending
    assert len(load_cache(out)) == 19


def test_another_pipeline_is_refused_naming_the_difference(gallery, tiny_config, tmp_path):
    out = tmp_path / "cache"
    build_cache(gallery, out, tiny_config)
    with pytest.raises(CacheError, match="test_resnet"):
        build_cache(gallery, out, replace(tiny_config, embedder="timm:test_resnet@random"))
    with pytest.raises(CacheError, match="classifier 'timm:test_vit@random'"):
        open_query_pipeline(out, {"classifier": "timm:test_vit@random"})
    rebuilt = build_cache(gallery, out, replace(tiny_config, embedder="timm:test_resnet@random"),
                          rebuild=True)
    assert rebuilt.embedded == 18


def test_bucket_by_label_uses_the_folder_class(tmp_path, tiny_config):
    root = tmp_path / "synsets"
    for synset, colour in (("n02690373", (200, 0, 0)), ("n02128385", (0, 0, 200))):
        for i in range(3):
            draw_shape(root / synset / f"{i}.png", colour, "rectangle", seed=i)
    build_cache(root, tmp_path / "cache", tiny_config, bucket_by="label")
    data = load_cache(tmp_path / "cache")
    assert sorted(set(data.columns["label_classes"].tolist())) == [288, 404]
    assert data.manifest.class_names["404"] == "airliner"
    searcher = Searcher(data)
    hits = searcher.search(data.columns["embeddings"][0], parse_policy("top1"), 5, np.array([404]), np.ones(1))
    assert set(data.columns["labels"][hits.rows].tolist()) == {"n02690373"}


def test_bucket_by_label_refuses_labels_that_are_not_classes(gallery, tiny_config, tmp_path):
    with pytest.raises(ValueError, match="unknown: blue_squares"):
        build_cache(gallery, tmp_path / "cache", tiny_config, bucket_by="label")


def test_label_map_and_unlabelled_galleries(tmp_path, tiny_config):
    flat = tmp_path / "flat"
    for i in range(4):
        draw_shape(flat / f"img{i}.png", (200, 0, 0) if i < 2 else (0, 0, 200), "ellipse", seed=i)
    (tmp_path / "labels.json").write_text('{"img0.png": "red", "img1.png": "red", "img2.png": "blue"}')
    build_cache(flat, tmp_path / "labelled", tiny_config, labels_file=tmp_path / "labels.json")
    assert load_cache(tmp_path / "labelled").columns["labels"].tolist() == ["red", "red", "blue", ""]
    build_cache(flat, tmp_path / "plain", tiny_config)
    assert set(load_cache(tmp_path / "plain").columns["labels"].tolist()) == {""}


def test_symlinked_label_folders_are_followed(gallery, tiny_config, tmp_path):
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / "circles").symlink_to(gallery / "red_circles", target_is_directory=True)
    summary = build_cache(linked, tmp_path / "cache", tiny_config)
    assert summary.images == 6 and set(load_cache(tmp_path / "cache").columns["labels"].tolist()) == {"circles"}


def test_new_weights_in_the_same_file_are_detected(gallery, tiny_config, tmp_path):
    import timm
    import torch
    from safetensors.torch import save_file

    weights = tmp_path / "tiny.safetensors"

    def save(seed: int) -> None:
        torch.manual_seed(seed)
        save_file(timm.create_model("test_vit").state_dict(), str(weights))

    save(1)
    config = replace(tiny_config, embedder=f"timm:test_vit@{weights}")
    build_cache(gallery, tmp_path / "cache", config)
    save(2)  # same path, other weights
    with pytest.raises(CacheError, match="weights: 'sha256:"):
        build_cache(gallery, tmp_path / "cache", config)
    with pytest.raises(CacheError, match="weights: 'sha256:"):  # a torch query refuses it with the same message
        open_query_pipeline(tmp_path / "cache", {"runtime": "torch"})
    # The default query runs the exports the build checked and recorded: the cache's own model, not the new file.
    pipeline, _ = open_query_pipeline(tmp_path / "cache", {})
    assert type(pipeline.stage("embed").embedder).__name__ == "RecordedEmbedder"


def test_resuming_holds_the_pending_vectors_once_and_streams_them_into_the_generation(tmp_path):
    """A resume reads the pending chunks once and writes the new generation from them through StackedRows, a slice
    at a time: the traced peak is one copy of their embeddings plus a chunk or a slice, never a second matrix."""
    import tracemalloc

    from lookalike.cache import mapped
    from lookalike.cache.columns import empty_columns
    from lookalike.cache.generations import write_generation
    from lookalike.cache.manifest import Manifest
    from lookalike.pipeline.build import merge_rows
    from lookalike.pipeline.gallery import GalleryEntry

    rows, dim, chunks = 30_000, 256, 6  # 29 MiB of embeddings: chunks of 5, write slices of 8
    pending = PendingChunks(tmp_path, {"f": 1})
    rng = np.random.default_rng(0)
    for part in range(chunks):
        columns = empty_columns(dim, 3)
        count = rows // chunks
        columns.update(paths=np.array([f"{part}-{i}.jpg" for i in range(count)]), sizes=np.zeros(count, np.int64),
                       mtimes=np.zeros(count, np.int64), labels=np.array([""] * count),
                       label_classes=np.full(count, -1, np.int32), classes=np.zeros((count, 3), np.int32),
                       probs=np.full((count, 3), 0.3, np.float32), boxes=np.zeros((count, 4), np.float32),
                       embeddings=rng.normal(size=(count, dim)).astype(np.float32))
        pending.append(columns)
    entries = [GalleryEntry(f"{part}-{i}.jpg", None) for part in range(chunks) for i in range(rows // chunks)]
    matrix_bytes = rows * dim * 4
    tracemalloc.start()
    try:
        merged, count = merge_rows(None, pending.load(), entries)
        write_generation(tmp_path / "cache", Manifest({}, {}, str(tmp_path), count, dim), merged)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert count == rows
    # one copy of the embeddings, the small columns (~5 % of it here) and one slice or chunk in flight
    assert peak < 1.15 * matrix_bytes + 2 * mapped.SLICE_BYTES, \
        f"peak {peak / 2**20:.0f} MiB for a {matrix_bytes / 2**20:.0f} MiB matrix"
    stored = load_cache(tmp_path / "cache").columns["embeddings"]
    assert np.array_equal(stored[rows // chunks], np.load(next((tmp_path / "pending").glob("chunk-*1.npz")))["embeddings"][0])

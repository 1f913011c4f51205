"""Galleries made by careless or hostile hands: every odd file is skipped with its reason, the build finishes."""
from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from lookalike.cache.store import load_cache
from lookalike.pipeline import images
from lookalike.pipeline.build import build_cache
from lookalike.pipeline.images import ImageLoadError, load_image
from lookalike.pipeline.pipeline import build_pipeline


def skipped(summary) -> dict[str, str]:
    return {entry["path"]: entry["reason"] for entry in summary.skipped}


@pytest.mark.parametrize("size", [(100_000, 1), (2, 20_000), (2100, 100)])
def test_extreme_aspect_ratios_are_refused_before_any_resize(tmp_path, size):
    path = tmp_path / "sliver.png"
    Image.new("L", size, 128).save(path)  # a few hundred bytes that a short-side resize makes gigabytes
    with pytest.raises(ImageLoadError, match=r"extreme aspect ratio .* the limit is 20:1"):
        load_image(path)


def test_a_wide_panorama_is_still_used(tmp_path):
    path = tmp_path / "panorama.jpg"
    Image.new("RGB", (1600, 200), "skyblue").save(path)
    assert load_image(path).size == (1600, 200)


def test_a_sliver_in_a_gallery_is_skipped_and_the_build_finishes(gallery, tiny_config, tmp_path):
    Image.new("L", (100_000, 1), 128).save(gallery / "red_circles" / "sliver.png")
    summary = build_cache(gallery, tmp_path / "cache", tiny_config)
    assert summary.images == 18 and "extreme aspect ratio" in skipped(summary)["red_circles/sliver.png"]


def test_any_decoder_error_skips_that_image(gallery, tiny_config, tmp_path, monkeypatch):
    pillow_open = images._pillow_open

    def fragile_open(path, *args, **kwargs):
        if Path(path).name == "3.png":
            raise IndexError("a plugin bug that a crafted file triggers")
        return pillow_open(path, *args, **kwargs)

    monkeypatch.setattr(images, "_pillow_open", fragile_open)
    summary = build_cache(gallery, tmp_path / "cache", tiny_config)
    assert summary.images == 15
    assert all("cannot decode (IndexError: a plugin bug" in reason for reason in skipped(summary).values())


def test_any_preprocessing_error_skips_that_image(gallery, tiny_config, tmp_path):
    Image.new("RGB", (50, 70), "white").save(gallery / "blue_squares" / "odd.png")
    pipeline = build_pipeline(tiny_config)
    stage = pipeline.stages[0]
    transform = stage.transform

    def fragile(image):
        if image.size == (50, 70):
            raise RuntimeError("cannot broadcast this one")
        return transform(image)

    stage.transform = pipeline.transforms[stage.name] = fragile  # the loaders apply it, as the stage would
    summary = build_cache(gallery, tmp_path / "cache", tiny_config, pipeline=pipeline)
    assert summary.images == 18
    assert skipped(summary) == {"blue_squares/odd.png": "cannot preprocess (RuntimeError: cannot broadcast this one)"}


def test_broken_and_looping_symlinks_are_skipped_and_reported(gallery, tiny_config, tmp_path):
    folder = gallery / "red_circles"
    (folder / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (folder / "ping.png").symlink_to(folder / "pong.png")
    (folder / "pong.png").symlink_to(folder / "ping.png")
    (folder / "again").symlink_to(gallery)  # a folder loop: red_circles/again/red_circles/again/...
    summary = build_cache(gallery, tmp_path / "cache", tiny_config)
    reasons = skipped(summary)
    assert summary.images == 18 and len(reasons) == len(summary.skipped) == 4
    assert {"red_circles/gone.png", "red_circles/ping.png", "red_circles/pong.png"} < set(reasons)
    assert "broken link" in reasons["red_circles/gone.png"] and "a link to . inside the gallery" in reasons["red_circles/again"]


def test_each_real_file_is_indexed_once(gallery, tmp_path):
    from lookalike.pipeline.gallery import list_images

    (gallery / "blue_squares" / "also-0.png").symlink_to(gallery / "blue_squares" / "0.png")
    (gallery / "green").symlink_to(gallery / "green_triangles", target_is_directory=True)
    paths, left_out = list_images(gallery)
    assert len(paths) == len(set(paths)) == 18
    assert {entry["path"] for entry in left_out} == {"blue_squares/also-0.png", "green"}


def test_a_folder_link_that_sorts_first_never_renames_the_real_photos(gallery, tiny_config, tmp_path):
    (gallery / "alias_red").symlink_to(gallery / "red_circles", target_is_directory=True)  # "alias_red" < "red_circles"
    (gallery / "a.png").symlink_to(gallery / "red_circles" / "0.png")
    summary = build_cache(gallery, tmp_path / "cache", tiny_config)
    paths = load_cache(tmp_path / "cache").columns["paths"].tolist()
    assert summary.images == 18 and "red_circles/0.png" in paths
    assert not [path for path in paths if path.startswith("alias_red/") or path == "a.png"]
    assert skipped(summary)["alias_red"] == "a link to red_circles inside the gallery, indexed there"


def test_an_unreadable_folder_is_reported(gallery, tiny_config, tmp_path, monkeypatch):
    import os

    scandir = os.scandir
    locked = gallery / "blue_squares"

    def scandir_as_another_user(path="."):
        if isinstance(path, (str, os.PathLike)) and Path(path) == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", scandir_as_another_user)  # chmod 000 does not stop root
    summary = build_cache(gallery, tmp_path / "cache", tiny_config)
    assert summary.images == 12
    assert skipped(summary) == {"blue_squares": "unreadable folder (Permission denied)"}


def test_heic_and_heif_photos_are_indexed(gallery, tiny_config, tmp_path):
    Image.new("RGB", (64, 48), (200, 30, 30)).save(gallery / "red_circles" / "phone.heic")
    Image.new("RGB", (64, 48), (30, 60, 220)).save(gallery / "blue_squares" / "phone.HEIF", format="HEIF")
    summary = build_cache(gallery, tmp_path / "cache", tiny_config)
    assert summary.images == 20 and summary.skipped == []


def test_postscript_under_an_image_name_never_reaches_ghostscript(tmp_path, monkeypatch):
    from PIL import EpsImagePlugin

    calls = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *args, **kwargs: calls.append(args))
    monkeypatch.setattr(EpsImagePlugin, "gs_binary", "gs")  # as if Ghostscript were installed
    path = tmp_path / "innocent.jpg"
    path.write_text("%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 64 64\n%%EndComments\n"
                    "newpath 0 0 moveto 64 64 lineto stroke showpage\n%%EOF\n")
    with pytest.raises(ImageLoadError, match="not an image"):
        load_image(path)
    assert calls == []


def test_a_crop_whose_preprocessing_fails_skips_that_image(gallery, tiny_config, tmp_path, monkeypatch):
    """Preprocessing that runs after the crop stage (inputs made stale by cropping) skips the one image too."""
    from lookalike.pipeline.pipeline import build_pipeline
    from lookalike.pipeline.stages import Stage, TensorStage

    class StaleInputs(Stage):
        """Stands in for a crop: what the loaders prepared no longer fits the image."""
        name = "crop"

        def __call__(self, items):
            for item in items:
                item.inputs.clear()
            return items

    pipeline = build_pipeline(tiny_config)
    bad = next(gallery.rglob("*.png"))
    pipeline.stages.insert(0, StaleInputs())
    real_prepare = TensorStage.prepare

    def prepare(self, item):
        if item.path.endswith(bad.relative_to(gallery).as_posix()):
            raise MemoryError("a sliver blown up by resizing")
        real_prepare(self, item)

    monkeypatch.setattr(TensorStage, "prepare", prepare)
    summary = build_cache(gallery, tmp_path / "cache", tiny_config, pipeline=pipeline)
    assert summary.images == 17 and [s["path"] for s in summary.skipped] == [bad.relative_to(gallery).as_posix()]
    assert "cannot preprocess (MemoryError: a sliver blown up by resizing)" in summary.skipped[0]["reason"]


@pytest.mark.parametrize("kind", ["fifo", "device"])
def test_a_fifo_or_a_device_is_reported_as_not_a_regular_file(tmp_path, kind):
    import os

    if kind == "fifo":
        path = tmp_path / "pipe.jpg"
        os.mkfifo(path)  # opening it would block until a writer comes
    else:
        path = Path("/dev/urandom")  # endless: reading it would never end
    with pytest.raises(ImageLoadError, match=f"^{path}: not a regular file"):
        load_image(path)

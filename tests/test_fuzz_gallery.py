"""A gallery of a few hundred damaged copies of real JPEG, PNG and WebP files: the build finishes, and every file
is either in the cache or reported as skipped, once."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from lookalike.cache.store import load_cache
from lookalike.pipeline.build import build_cache
from tests.conftest import SHAPES, draw_shape

FORMATS = {"jpg": {"format": "JPEG", "quality": 85}, "png": {"format": "PNG"}, "webp": {"format": "WEBP"}}
HEADERS = {"jpg": b"\xff\xd8\xff\xe0\x00\x10JFIF\x00", "png": b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR",
           "webp": b"RIFF\x00\x10\x00\x00WEBPVP8 "}


def originals(tmp_path: Path) -> dict[str, bytes]:
    """Valid files of each format: drawn shapes, some progressive, with EXIF or alpha, at a few sizes."""
    files = {}
    for i, (colour, shape) in enumerate(SHAPES.values()):
        image = Image.open(draw_shape(tmp_path / f"{i}.png", colour, shape, seed=i, size=64 + 32 * i)).convert("RGB")
        for ext, options in FORMATS.items():
            buffer = io.BytesIO()
            extra = {"progressive": True} if ext == "jpg" and i == 1 else {}
            (image.convert("RGBA") if ext == "png" and i == 2 else image).save(buffer, **options, **extra)
            files[f"{i}.{ext}"] = buffer.getvalue()
    return files


def mutate(data: bytes, ext: str, rng: np.random.Generator) -> bytes:
    """One seeded damage: flipped bytes, a cut, another format's header, a zeroed or repeated block."""
    kind = rng.integers(5)
    array = np.frombuffer(data, np.uint8).copy()
    if kind == 0:
        where = rng.integers(0, len(array), rng.integers(1, 12))
        array[where] ^= rng.integers(1, 256, len(where), dtype=np.uint8)
        return array.tobytes()
    if kind == 1:
        return data[:rng.integers(0, len(data))]
    if kind == 2:
        other = HEADERS[rng.choice([name for name in HEADERS if name != ext])]
        return other + data[len(other):]
    start = rng.integers(0, len(data))
    end = min(len(data), start + rng.integers(1, 512))
    if kind == 3:
        return data[:start] + bytes(end - start) + data[end:]
    return data[:end] + data[start:end] * int(rng.integers(2, 6)) + data[end:]


def test_a_fuzzed_gallery_builds_and_accounts_for_every_file(tiny_config, tmp_path):
    rng = np.random.default_rng(20240610)
    gallery = tmp_path / "gallery"
    gallery.mkdir()
    for name, data in originals(tmp_path / "originals").items():
        ext = name.rsplit(".", 1)[1]
        for copy in range(30):
            (gallery / f"{name.split('.')[0]}-{copy:02d}.{ext}").write_bytes(mutate(data, ext, rng))
    files = sorted(p.name for p in gallery.iterdir())
    assert len(files) == 270

    summary = build_cache(gallery, tmp_path / "cache", tiny_config)
    cached = load_cache(tmp_path / "cache").columns["paths"].tolist()
    skipped = [entry["path"] for entry in summary.skipped]
    assert len(cached) == len(set(cached)) and len(skipped) == len(set(skipped))
    assert sorted(cached + skipped) == files
    assert len(cached) > 50 and len(skipped) > 50  # both outcomes were exercised

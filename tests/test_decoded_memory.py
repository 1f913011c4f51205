"""Decoded memory is bounded: a small file that decodes to gigabytes is refused from its header, and big alpha or
16-bit images are shrunk to the models' working size before any conversion."""
from __future__ import annotations

import os
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from PIL import Image

from lookalike.pipeline.images import ImageLoadError, load_image
from tests.conftest import TINY_CLASSIFIER, TINY_EMBEDDER

ROOT = Path(__file__).resolve().parents[1]


def png_of_zeros(path: Path, side: int, bit_depth: int = 16, colour_type: int = 6) -> Path:
    """A square PNG of zero pixels, compressed row by row: 15000 px of 16-bit RGBA is a 1.7 MB file."""
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour_type]
    row = b"\0" * (1 + side * channels * bit_depth // 8)
    packer = zlib.compressobj(9)
    data = b"".join([packer.compress(row) for _ in range(side)] + [packer.flush()])

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", side, side, bit_depth, colour_type, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


@pytest.fixture(scope="module")
def png_bomb(tmp_path_factory) -> Path:
    return png_of_zeros(tmp_path_factory.mktemp("bomb") / "bomb.png", 15000)


def peak_rss_gb(command: list[str]) -> tuple[subprocess.CompletedProcess, float]:
    """Run `command` in a fresh process; its result and its peak resident memory in GB (Linux ru_maxrss is KiB)."""
    script = ("import resource, subprocess, sys; result = subprocess.run(sys.argv[1:], capture_output=True, text=True);"
              "sys.stdout.write(result.stdout + result.stderr);"
              "print('PEAK', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss); sys.exit(result.returncode)")
    env = dict(os.environ, PYTHONPATH=str(ROOT.parent))
    result = subprocess.run([sys.executable, "-c", script, *command], capture_output=True, text=True, env=env,
                            check=False)
    peak = int(result.stdout.rsplit("PEAK", 1)[1]) * 1024 / 1e9
    return result, peak


def test_a_png_bomb_inside_the_pixel_limit_is_refused_from_its_header(png_bomb):
    with pytest.raises(ImageLoadError, match=r"bomb.png: too large to decode \(15000x15000 RGBA takes 858 MB"):
        load_image(png_bomb)


def test_a_build_over_three_png_bombs_stays_under_1_5_gb(png_bomb, gallery, tmp_path):
    for i in range(3):
        shutil.copy(png_bomb, gallery / "red_circles" / f"bomb{i}.png")  # copies: links are indexed once
    result, peak = peak_rss_gb([sys.executable, str(ROOT / "cli.py"), "build-cache", "--gallery", str(gallery),
                                "--out", str(tmp_path / "cache"), "--classifier", TINY_CLASSIFIER,
                                "--embedder", TINY_EMBEDDER, "--device", "cpu", "--runtime", "torch"])
    assert result.returncode == 0, result.stdout[-2000:]
    assert result.stdout.count("too large to decode") >= 3, result.stdout[-2000:]
    assert peak <= 1.5, f"peak RSS {peak:.2f} GB"
    print(f"peak RSS of a build over 18 images + 3 PNG bombs: {peak:.2f} GB")


def test_a_big_16_bit_alpha_png_is_decoded_at_working_size_in_bounded_memory(tmp_path):
    """11500 px of 16-bit RGBA is 504 MB decoded (inside the limit): shrunk strip by strip, never converted at full
    size (Pillow's own resize of RGBA would hold a second full copy)."""
    path = png_of_zeros(tmp_path / "big.png", 11500)
    code = ("import sys; from lookalike.pipeline.images import load_image; "
            "image = load_image(sys.argv[1], decode_side=1024); print(image.size, image.mode)")
    result, peak = peak_rss_gb([sys.executable, "-c", code, str(path)])
    assert result.returncode == 0, result.stdout
    assert "(1045, 1045) RGB" in result.stdout
    assert peak <= 0.8, f"peak RSS {peak:.2f} GB for 504 MB of pixels"


@pytest.mark.parametrize("mode", ["RGBA", "I;16", "P", "LA"])
def test_a_shrunk_image_keeps_its_pixels_and_its_exif_orientation(tmp_path, mode):
    image = Image.new("RGB", (3000, 2100), (200, 30, 30)).convert(mode)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: shown as 2100x3000
    image.save(tmp_path / "rotated.png", exif=exif.tobytes())
    loaded = load_image(tmp_path / "rotated.png", decode_side=512)
    assert loaded.size == (2100 // 4, 3000 // 4)
    expected = load_image(tmp_path / "rotated.png", decode_side=4096).resize(loaded.size, Image.Resampling.BOX)
    assert loaded.getpixel((10, 10)) == expected.getpixel((10, 10))

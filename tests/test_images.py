"""Every kind of awkward file either decodes correctly or is refused with a one-line reason."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from lookalike.pipeline.images import ImageLoadError, load_image


def jpeg_bytes(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize("name, content, reason", [
    ("empty.jpg", b"", "empty file"),
    ("text.png", b"this is not an image at all\n" * 10, "not an image"),
    ("garbage.jpg", bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8)), "not an image"),
    ("truncated.jpg", jpeg_bytes(Image.effect_noise((256, 256), 60).convert("RGB"))[:3000], "cannot decode"),
])
def test_unusable_files_raise_a_reason_naming_the_file(tmp_path, name, content, reason):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageLoadError) as error:
        load_image(path)
    assert reason in str(error.value) and str(path) in str(error.value)
    assert "\n" not in str(error.value)


def test_cmyk_jpeg_becomes_rgb_with_the_right_colour(tmp_path):
    path = tmp_path / "cmyk.jpg"
    Image.new("RGB", (40, 30), (200, 30, 30)).convert("CMYK").save(path, "JPEG", quality=95)
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (40, 30)
    assert np.abs(np.asarray(image, float).mean((0, 1)) - (200, 30, 30)).max() < 20


def test_16_bit_png_is_rescaled_not_clipped(tmp_path):
    path = tmp_path / "deep.png"
    Image.fromarray(np.full((20, 20), 32768, np.uint16)).save(path)  # half of full scale
    image = load_image(path)
    assert image.mode == "RGB"
    assert abs(np.asarray(image).mean() - 127.5) < 2


def test_palette_png_with_transparency_is_composited_on_white(tmp_path):
    path = tmp_path / "palette.png"
    palette = Image.new("P", (20, 20), 0)
    palette.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)  # index 0 black (transparent), 1 blue
    palette.paste(1, (0, 0, 10, 20))
    palette.save(path, transparency=0)
    image = load_image(path)
    pixels = np.asarray(image)
    assert image.mode == "RGB"
    assert pixels[10, 15].tolist() == [255, 255, 255]  # transparent half is white, not black
    assert pixels[10, 2, 2] > 200  # opaque half stays blue


def test_rgba_png_is_composited_on_white(tmp_path):
    path = tmp_path / "alpha.png"
    Image.new("RGBA", (8, 8), (255, 0, 0, 0)).save(path)
    assert np.asarray(load_image(path)).min() == 255


def test_exif_rotation_is_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    Image.new("RGB", (60, 20), "red").save(path, exif=exif)
    assert load_image(path).size == (20, 60)


def test_huge_jpeg_is_decoded_at_reduced_size(tmp_path):
    path = tmp_path / "huge.jpg"
    Image.new("RGB", (9000, 6000), (10, 120, 200)).save(path, quality=70)  # 54 MP
    image = load_image(path)
    assert image.mode == "RGB"
    assert 1024 <= max(image.size) < 9000 and abs(image.size[0] / image.size[1] - 1.5) < 0.01

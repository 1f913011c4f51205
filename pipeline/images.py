"""Decoding images robustly: every file either becomes an RGB image or a one-line reason to skip it."""
from __future__ import annotations

import io
import stat
from pathlib import Path

import numpy as np
import pillow_heif
from PIL import Image, ImageMode, ImageOps, UnidentifiedImageError

from lookalike.models.errors import UserError, one_line

MAX_PIXELS = 250_000_000  # beyond this a file is skipped rather than decoded
# Beyond this a file is skipped: the memory its pixels take once decoded (width x height x bands x bytes per sample,
# from the header). A 1.7 MB PNG of 15000x15000 16-bit RGBA passes the pixel limit and decodes to 900 MB.
MAX_DECODED_BYTES = 512 * 2**20
STRIP_BYTES = 16 * 2**20  # decoded pixels shrunk at a time (`_shrink`)
# Beyond this a file is skipped: resizing the short side to a model's input blows the long side up (a 375-byte
# 100000x1 PNG became a 22,400,000x224 image, ~20 GB). Panoramas stay well inside it.
MAX_ASPECT = 20
DECODE_SIDE = 1024  # JPEGs are decoded at reduced size when they are much larger than this

pillow_heif.register_heif_opener()  # .heic/.heif (phone photos)

# The only formats Pillow may try: raster images. Pillow would otherwise hand PostScript content under any name
# (evil.jpg) to Ghostscript when it is installed, and identify dozens of scientific and vector formats.
RASTER_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "DIB", "TIFF", "PPM", "TGA", "JPEG2000", "HEIF", "AVIF", "QOI")
IMAGE_EXTENSIONS = frozenset(ext for ext, fmt in Image.registered_extensions().items()
                             if fmt in RASTER_FORMATS) | {".pgm", ".ppm", ".pbm"}


# ultralytics replaces Image.open on import with a version that needs pi_heif for unknown files;
# keep Pillow's own, so a non-image is reported the same way with or without --crop.
_pillow_open = Image.open


class ImageLoadError(UserError):
    """A file that cannot be used as an image; str() is '<path>: <reason>'."""

    def __init__(self, path: str | Path, reason: str):
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


class NotAnImage(ImageLoadError):
    """A file Pillow cannot identify as any image format (the serve API answers it with 415)."""


def _to_rgb(image: Image.Image) -> Image.Image:
    """Any Pillow mode -> 8-bit RGB; transparency is composited on white, 16-bit is rescaled."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        array = np.asarray(image, dtype=np.float32)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        return Image.fromarray(np.clip(array / top * 255.0, 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode == "P" and "transparency" in image.info or image.mode in ("RGBA", "LA", "PA", "RGBa"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _check_size(path: str | Path, width: int, height: int, max_pixels: int) -> None:
    if width * height > max_pixels:
        raise ImageLoadError(path, f"too large ({width}x{height} = {width * height / 1e6:.0f} MP;"
                                   f" the limit is {max_pixels / 1e6:.0f} MP)")
    if max(width, height) > MAX_ASPECT * max(1, min(width, height)):
        raise ImageLoadError(path, f"extreme aspect ratio ({width}x{height}; the limit is {MAX_ASPECT}:1)")


def decoded_bytes(image: Image.Image) -> int:
    """The memory `image`'s pixels take once decoded, from its header alone."""
    mode = ImageMode.getmode(image.mode)
    return image.width * image.height * len(mode.bands) * np.dtype(mode.typestr).itemsize


def _check_decoded_bytes(path: str | Path, image: Image.Image) -> None:
    size = decoded_bytes(image)
    if size > MAX_DECODED_BYTES:
        raise ImageLoadError(path, f"too large to decode ({image.width}x{image.height} {image.mode} takes "
                                   f"{size / 2**20:.0f} MB decoded; the limit is "
                                   f"{MAX_DECODED_BYTES / 2**20:.0f} MB)")


def _shrink(image: Image.Image, side: int) -> Image.Image:
    """`image` averaged down by a whole factor while its short side stays >= `side` (as a JPEG's draft does), before
    any conversion: a big 16-bit or alpha image is converted at the size the models need, not at full size.

    It goes strip by strip (Pillow's own resize of an alpha image first makes a premultiplied copy of all of it),
    so it holds at most STRIP_BYTES beside the decoded pixels. The EXIF orientation goes with it."""
    factor = min(image.size) // side
    if factor < 2:
        return image
    width, height = image.width // factor, image.height // factor
    mode = {"P": "RGBA", "1": "L"}.get(image.mode, image.mode)  # averaged as colours, not as palette indices
    small = Image.new(mode, (width, height))
    rows = max(1, STRIP_BYTES * height // max(1, decoded_bytes(image)))
    for top in range(0, height, rows):
        bottom = min(height, top + rows)
        strip = image.crop((0, top * factor, width * factor, bottom * factor)).convert(mode)
        small.paste(strip.resize((width, bottom - top), Image.Resampling.BOX), (0, top))
    small.info = dict(image.info, exif=image.getexif().tobytes())
    return small


def image_in_memory(image: Image.Image | np.ndarray, name: str, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """A PIL image, or an HxWx3 uint8 array, as an RGB image under the same size limits as a file."""
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ImageLoadError(name, f"an array must be HxWx3 uint8 RGB, not {'x'.join(map(str, image.shape))} "
                                       f"{image.dtype}")
        image = Image.fromarray(image, "RGB")
    _check_size(name, *image.size, max_pixels)
    return _to_rgb(image)


def load_image(source: str | Path | bytes, decode_side: int = DECODE_SIDE, max_pixels: int = MAX_PIXELS,
               name: str | None = None) -> Image.Image:
    """Open, orient (EXIF) and convert one image file (a path, or the file's bytes) to RGB, or raise ImageLoadError
    saying why not, naming `name` (default: the path). Images over `max_pixels` are refused from their header,
    before any pixel is decoded."""
    in_memory = isinstance(source, bytes)
    path = name or ("image bytes" if in_memory else Path(source))
    try:
        info = None if in_memory else Path(source).stat()
        if info is not None and not stat.S_ISREG(info.st_mode):
            raise ImageLoadError(path, "not a regular file (a fifo, device or socket); give an image file")
        if (len(source) if in_memory else info.st_size) == 0:
            raise ImageLoadError(path, "empty file (0 bytes)")
        with _pillow_open(io.BytesIO(source) if in_memory else source, formats=RASTER_FORMATS) as image:
            width, height = image.size
            _check_size(path, width, height, max_pixels)
            if image.format == "JPEG" and max(width, height) > 2 * decode_side:
                image.draft("RGB", (decode_side, decode_side))  # DCT-domain downscale: fast, small
            _check_decoded_bytes(path, image)
            image.load()
            return _to_rgb(ImageOps.exif_transpose(_shrink(image, decode_side)))
    except ImageLoadError:
        raise
    except UnidentifiedImageError:
        raise NotAnImage(path, "not an image (Pillow cannot identify the format)") from None
    except Exception as err:  # noqa: BLE001 - a hostile file may make any decoder raise anything; skip it, never abort
        raise ImageLoadError(path, f"cannot decode ({one_line(err)})") from None


# Pillow's own bomb guard is replaced by MAX_PIXELS above, which names the file and the size.
Image.MAX_IMAGE_PIXELS = None

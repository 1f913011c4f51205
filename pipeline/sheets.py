"""Contact sheets: one row per query, the query image then its results with scores (optionally framed)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageOps

from lookalike.pipeline.images import ImageLoadError, load_image

TILE = 160
CAPTION = 34
GREEN, RED, GREY = (30, 160, 60), (200, 40, 40), (120, 120, 120)


@dataclass
class Tile:
    path: str | Path
    caption: str
    relevant: bool | None = None  # None: no frame colour (unknown relevance)


def _tile(tile: Tile) -> Image.Image:
    canvas = Image.new("RGB", (TILE, TILE + CAPTION), "white")
    try:
        thumb = ImageOps.contain(load_image(tile.path, decode_side=TILE * 2), (TILE - 8, TILE - 8))
        canvas.paste(thumb, ((TILE - thumb.width) // 2, (TILE - thumb.height) // 2))
    except ImageLoadError:
        ImageDraw.Draw(canvas).text((8, TILE // 2), "unreadable", fill=RED)
    draw = ImageDraw.Draw(canvas)
    if tile.relevant is not None:
        draw.rectangle([0, 0, TILE - 1, TILE - 1], outline=GREEN if tile.relevant else RED, width=4)
    for line_number, line in enumerate(tile.caption.splitlines()[:2]):
        draw.text((4, TILE + 2 + 15 * line_number), line[:26], fill=(0, 0, 0) if line_number == 0 else GREY)
    return canvas


def contact_sheet(rows: list[list[Tile]], out: str | Path) -> Path:
    """Write a PNG grid: each row is [query tile, result tiles...]."""
    columns = max(len(row) for row in rows)
    sheet = Image.new("RGB", (columns * (TILE + 6) + 6, len(rows) * (TILE + CAPTION + 6) + 6), (235, 235, 235))
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            sheet.paste(_tile(tile), (6 + c * (TILE + 6), 6 + r * (TILE + CAPTION + 6)))
    out = Path(out)
    sheet.save(out)
    return out

"""Thumbnails of gallery rows, addressed by row number only (never by a path from a request), made once
and kept as JPEG files; a row whose stored path climbs out of the gallery root is refused."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from lookalike.cache.paths import unsafe_paths
from lookalike.models.files import atomic_write
from lookalike.pipeline.images import load_image

THUMB_SIDE = 320  # pixels, longest side: sharp in a ~160 px grid cell on a 2x screen


class Thumbnails:
    def __init__(self, gallery_root: Path, paths: np.ndarray, folder: Path, side: int = THUMB_SIDE):
        self.root = gallery_root
        self.paths = paths
        self.folder = folder
        self.side = side

    def file(self, row: int) -> Path:
        """The thumbnail of gallery row `row`, made on first use. IndexError for an unknown row,
        PermissionError for a stored path leading outside the gallery root, ImageLoadError for an unreadable one."""
        if not 0 <= row < len(self.paths):
            raise IndexError(f"row {row}: the gallery has rows 0 to {len(self.paths) - 1}")
        target = self.folder / f"{row}.jpg"
        if target.is_file():
            return target
        if len(unsafe_paths(self.paths[row:row + 1])):  # the cache's one rule (symlinks the gallery holds are its own)
            raise PermissionError(f"row {row}: its path leads outside the gallery root")
        image = load_image(self.root / str(self.paths[row]), decode_side=self.side)
        image.thumbnail((self.side, self.side))
        self.folder.mkdir(exist_ok=True)  # never its parents: a generation deleted by a rebuild stays deleted
        atomic_write(target, lambda tmp: image.save(tmp, format="JPEG", quality=85))
        return target

"""Finding a gallery's images and their relevance labels.

Three layouts: folder-per-label (`root/.../<label>/img.jpg`: the image's parent folder), a flat folder with a JSON map
`{"file.jpg": "label"}` (as `train_image_info.json`), or unlabelled.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from models.errors import UserError
from pipeline.images import IMAGE_EXTENSIONS


@dataclass(frozen=True)
class GalleryEntry:
    relpath: str  # POSIX path relative to the gallery root
    label: str | None


def list_images(root: Path) -> list[str]:
    """Image files under `root` (by extension; hidden entries skipped; symlinked folders followed), sorted."""
    found = []
    for folder, subfolders, files in os.walk(root, followlinks=True):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        rel = Path(folder).relative_to(root)
        found += [(rel / name).as_posix() for name in files
                  if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS]
    return sorted(found)


def read_label_map(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: cannot read the label map ({err})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a label map must be a JSON object {{\"file.jpg\": \"label\"}}")
    return {str(key): str(value) for key, value in data.items()}


def scan_gallery(root: str | Path, labels_file: str | Path | None = None) -> tuple[list[GalleryEntry], list[dict]]:
    """Every image under `root` with its label (from `labels_file`, else its parent folder, else None), and the
    entries left out ({path, reason})."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: gallery folder does not exist")
    paths = list_images(root)
    if labels_file is not None:
        mapping = read_label_map(Path(labels_file))
        # Keys may be paths relative to the root or bare file names.
        return [GalleryEntry(p, mapping.get(p, mapping.get(Path(p).name))) for p in paths], []
    return [GalleryEntry(p, folder_label(p)) for p in paths], []


def folder_label(relpath: str) -> str | None:
    """The label of `<...>/<label>/<image>`: the parent folder's name (None at the top level)."""
    return relpath.split("/")[-2] if "/" in relpath else None

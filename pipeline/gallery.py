"""Finding a gallery's images and their relevance labels.

Three layouts: folder-per-label (`root/.../<label>/img.jpg`: the image's parent folder), a flat folder with a JSON map
`{"file.jpg": "label"}` (as `train_image_info.json`), or unlabelled.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from stat import S_ISREG

from lookalike.models.errors import UserError
from lookalike.pipeline.images import IMAGE_EXTENSIONS


@dataclass(frozen=True)
class GalleryEntry:
    relpath: str  # POSIX path relative to the gallery root
    label: str | None


Skip = dict[str, str]  # {"path": relative path, "reason": why it is left out}, as in a build's skip report


def list_images(root: Path) -> tuple[list[str], list[Skip]]:
    """Image files under `root` (by extension; hidden entries skipped; symlinked folders followed), sorted, and
    the entries left out with why: unreadable folders, broken or looping symlinks, non-regular files, links to
    places inside the gallery (indexed under their real path, so a link never renames a real photo's label),
    and a folder or file already found under another path, so each real file is indexed once."""
    found: dict[tuple[int, int], str] = {}  # (device, inode) -> first path, in sorted walk order
    skipped: list[Skip] = []

    def unreadable(err: OSError) -> None:
        skipped.append(_skip(root, err.filename, f"unreadable folder ({err.strerror or err})"))

    real_root = root.resolve()
    folders = {(root.stat().st_dev, root.stat().st_ino): "."}
    for folder, subfolders, files in os.walk(root, followlinks=True, onerror=unreadable):
        here = Path(folder)
        subfolders[:] = [name for name in sorted(subfolders) if not name.startswith(".")
                         and not _links_inside(here / name, root, real_root, skipped)
                         and _first_visit(here / name, root, folders, skipped, "folder")]
        for name in sorted(files):
            if (not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS
                    and not _links_inside(here / name, root, real_root, skipped)):
                _first_visit(here / name, root, found, skipped, "file")
    return sorted(found.values()), skipped


def _skip(root: Path, path: str | Path, reason: str) -> Skip:
    return {"path": Path(path).relative_to(root).as_posix(), "reason": reason}


def _links_inside(path: Path, root: Path, real_root: Path, skipped: list[Skip]) -> bool:
    """True (and a skip) when `path` is a symlink to a place inside the gallery: that place is indexed under its
    own path and label. A link to outside the gallery is followed (it is the only way there)."""
    if not path.is_symlink():
        return False
    try:
        target = path.resolve(strict=True).relative_to(real_root).as_posix()
    except (OSError, ValueError, RuntimeError):  # broken, looping (reported by _first_visit) or outside the gallery
        return False
    skipped.append(_skip(root, path, f"a link to {target} inside the gallery, indexed there"))
    return True


def _first_visit(path: Path, root: Path, seen: dict[tuple[int, int], str], skipped: list[Skip], kind: str) -> bool:
    """Record `path` in `seen` under its real identity; False (and a skip) when it is broken or seen before."""
    rel = path.relative_to(root).as_posix()
    try:
        info = path.stat()
    except OSError as err:  # a dangling symlink, a symlink loop, a file gone since the listing
        skipped.append(_skip(root, path, f"broken link or unreadable ({err.strerror or err})"))
        return False
    if kind == "file" and not S_ISREG(info.st_mode):
        skipped.append(_skip(root, path, "not a regular file"))
        return False
    key = (info.st_dev, info.st_ino)
    if key in seen:
        skipped.append(_skip(root, path, f"same {kind} as {seen[key]} (a link), indexed once"))
        return False
    seen[key] = rel
    return True


def read_label_map(path: Path) -> dict[str, str]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"{path}: cannot read the label map ({err})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: a label map must be a JSON object {{\"file.jpg\": \"label\"}}")
    return {str(key): str(value) for key, value in data.items()}


def scan_gallery(root: str | Path, labels_file: str | Path | None = None) -> tuple[list[GalleryEntry], list[Skip]]:
    """Every image under `root` with its label (from `labels_file`, else its parent folder, else None), and the
    entries left out with why (see `list_images`)."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: gallery folder does not exist")
    paths, skipped = list_images(root)
    return [GalleryEntry(p, label) for p, label in zip(paths, labels_of(paths, labels_file))], skipped


def labels_of(paths: list[str], labels_file: str | Path | None) -> list[str | None]:
    """Each path's label: from the label map (its keys are paths relative to the root, or bare file names) when
    one is given, else the parent folder's name; None where there is none."""
    if labels_file is None:
        return [folder_label(p) for p in paths]
    mapping = read_label_map(Path(labels_file))
    return [mapping.get(p, mapping.get(Path(p).name)) for p in paths]


def folder_label(relpath: str) -> str | None:
    """The label of `<...>/<label>/<image>`: the parent folder's name (None at the top level)."""
    return relpath.split("/")[-2] if "/" in relpath else None

"""Pending chunks: the embedded rows of an unfinished build, saved as it goes so a re-run resumes from them."""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import zipfile
from pathlib import Path

import numpy as np

from lookalike.cache.columns import COLUMNS, check_columns
from lookalike.cache.manifest import CacheError
from lookalike.models.errors import one_line
from lookalike.models.files import atomic_write, write_text_atomic

_CHUNK = re.compile(r"^chunk-(\d+)\.npz$")


class PendingChunks:
    """Embedded-but-not-yet-published rows of an unfinished build, tied to one fingerprint."""

    def __init__(self, root: Path, fingerprint: dict):
        self.folder = root / "pending"
        self.fingerprint = fingerprint
        stamp = self.folder / "fingerprint.json"
        if self.folder.is_dir():
            try:
                found = json.loads(stamp.read_bytes().decode("utf-8")) if stamp.is_file() else None
            except (OSError, ValueError) as err:
                self._set_aside(self.folder, f"its fingerprint.json is damaged ({type(err).__name__})")
            else:
                if found != fingerprint:
                    shutil.rmtree(self.folder)  # left by a build of another configuration: useless
        self.folder.mkdir(parents=True, exist_ok=True)
        if not stamp.is_file():
            write_text_atomic(stamp, json.dumps(fingerprint))
        self.count = max((number for _, number in self._chunks()), default=-1) + 1  # the next chunk's number

    def _set_aside(self, path: Path, why: str) -> None:
        """Move the damaged pending folder (replacing an older pending.damaged) or one damaged chunk (into it) aside,
        and say so: the build goes on and embeds those images again."""
        aside = self.folder.with_name("pending.damaged")
        if path == self.folder:
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(path, aside)
        else:
            aside.mkdir(exist_ok=True)
            os.replace(path, aside / path.name)
        print(f"lookalike: {path}: {why}; set aside in {aside.name}, its images are embedded again", file=sys.stderr)

    def _chunks(self) -> list[tuple[Path, int]]:
        """(path, number) of every chunk file, in number order."""
        found = ((path, _CHUNK.match(path.name)) for path in self.folder.glob("chunk-*.npz"))
        return sorted(((path, int(match[1])) for path, match in found if match), key=lambda pair: pair[1])

    def load(self, first: int = 0) -> list[dict[str, np.ndarray]]:
        """The readable chunks numbered `first` and above (a build loads those it resumes from, then the ones it
        wrote: each once); a damaged one (unreadable, or columns of the wrong kind or shape) is set aside in
        pending.damaged with a message, and its images are embedded again."""
        chunks = []
        for path, number in self._chunks():
            if number < first:
                continue
            try:
                with np.load(path, allow_pickle=False) as data:
                    chunk = {name: data[name] for name in COLUMNS}
                check_columns(str(path), chunk, len(chunk["paths"]), chunk["embeddings"].shape[-1])
                chunks.append(chunk)
            except (OSError, ValueError, KeyError, IndexError, zipfile.BadZipFile, CacheError) as err:
                self._set_aside(path, f"damaged ({one_line(err)[:120]})")
        return chunks

    def append(self, columns: dict[str, np.ndarray]) -> None:
        def write(tmp: Path) -> None:
            with open(tmp, "wb") as handle:
                np.savez(handle, **columns)

        atomic_write(self.folder / f"chunk-{self.count:06d}.npz", write)
        self.count += 1

    def clear(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

"""The build lock: one build at a time writes a cache directory."""
from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from lookalike.cache.manifest import CacheError
from lookalike.models.files import write_text_atomic


class BuildLock:
    """One build at a time per cache directory: a second one is refused with a line naming the holder.

    An OS file lock (filelock), so a build that dies releases it; `.build.holder` says who holds it.
    """

    def __init__(self, root: Path):
        from filelock import FileLock

        root.mkdir(parents=True, exist_ok=True)
        self.root = root
        self.lock = FileLock(root / ".build.lock")
        self.holder = root / ".build.holder"

    def __enter__(self) -> BuildLock:
        from filelock import Timeout

        try:
            self.lock.acquire(timeout=0)
        except Timeout:
            try:
                holder = self.holder.read_text().strip()
            except OSError:
                holder = "holder unknown"
            raise CacheError(f"{self.root}: another build is writing this cache ({holder}); wait for it to "
                             "finish, or use another --out") from None
        write_text_atomic(self.holder, f"pid {os.getpid()} on {socket.gethostname()} since "
                                       f"{time.strftime('%Y-%m-%d %H:%M:%S')}")
        return self

    def __exit__(self, *exc) -> None:
        self.holder.unlink(missing_ok=True)
        self.lock.release()

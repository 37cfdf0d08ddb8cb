"""Durable pending paths: nothing received is lost across restarts, crashes or kill -9.

One file per pending store path in ``<state_dir>/pending/`` (created atomically, fsynced),
removed only after the path's closure is in the bucket. Plus the hook's spool files.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path

from nixcache import defaults

STALE_SPOOL_TMP = 300.0
"""Seconds after which a hook's unfinished spool file (a dot file) is taken as abandoned."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``path`` so a reader (or a crash) sees the old file or the whole new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class Journal:
    def __init__(self, state_dir: Path) -> None:
        self.pending_dir = state_dir / "pending"
        self.spool_dir = Path(defaults.spool_dir(str(state_dir)))
        self.pending_dir.mkdir(parents=True, exist_ok=True)
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        # A crash (kill -9) in the middle of `write_atomic` leaves its temporary file behind;
        # the entry it was writing never existed. Only this process writes here: clear them.
        for tmp in self.pending_dir.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)

    def _entry(self, store_path: str) -> Path:
        return self.pending_dir / store_path.rsplit("/", 1)[-1]

    def add(self, store_path: str) -> bool:
        """Persist ``store_path``; False if it was already pending."""
        entry = self._entry(store_path)
        if entry.exists():
            return False
        write_atomic(entry, store_path.encode())
        return True

    def remove(self, store_path: str) -> None:
        self._entry(store_path).unlink(missing_ok=True)

    def pending(self) -> list[str]:
        """Pending paths, oldest first."""
        entries = [e for e in self.pending_dir.iterdir() if not e.name.startswith(".")]
        entries.sort(key=lambda e: e.stat().st_mtime_ns)
        out = []
        for e in entries:
            try:
                out.append(e.read_text().strip())
            except (OSError, UnicodeDecodeError):
                continue
        return out

    def import_spool(self, accept: Callable[[str], object]) -> int:
        """Feed every line of every complete spool file to ``accept`` (which journals it),
        then delete the file. A crash in between only repeats paths. Returns the line count."""
        n = 0
        stale = time.time() - STALE_SPOOL_TMP
        for f in self.spool_dir.glob(".*"):  # a hook that died mid-write (hooks rename in ms)
            with contextlib.suppress(OSError):
                if f.stat().st_mtime < stale:
                    f.unlink()
        for f in sorted(p for p in self.spool_dir.iterdir() if not p.name.startswith(".")):
            try:
                data = f.read_bytes()
            except OSError:
                continue
            for line in data.decode(errors="replace").splitlines():
                accept(line)
                n += 1
            f.unlink(missing_ok=True)
        return n

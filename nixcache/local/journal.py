"""Durable pending paths: nothing received is lost across restarts, crashes or kill -9.

One empty file per pending store path in ``<state_dir>/pending/``, named by the path's base
name (the name is the record: creating it and one fsync of the directory per batch make a
batch durable), removed only after the path's closure is in the bucket. Plus the hook's spool
files. Entries written by older versions hold the path as content; it is not read.

Everything here blocks on the disk: the daemon calls it from a thread, never its event loop.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterable
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
    def __init__(self, state_dir: Path, store_dir: str = defaults.STORE_DIR) -> None:
        self.store_prefix = store_dir.rstrip("/") + "/"
        self.pending_dir = state_dir / "pending"
        self.spool_dir = Path(defaults.spool_dir(str(state_dir)))
        self.pending_dir.mkdir(parents=True, exist_ok=True)
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        self.unreadable: set[str] = set()
        """spool files that could not be read (reported by the daemon)."""
        # A crash (kill -9) in the middle of `write_atomic` leaves its temporary file behind;
        # the entry it was writing never existed. Only this process writes here: clear them.
        for tmp in self.pending_dir.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)

    def _entry(self, store_path: str) -> Path:
        return self.pending_dir / store_path.rsplit("/", 1)[-1]

    def add(self, store_path: str) -> bool:
        """Persist ``store_path``; False if it was already pending."""
        return bool(self.add_many([store_path]))

    def add_many(self, store_paths: Iterable[str]) -> list[str]:
        """Persist every path (one directory fsync for all); returns those not pending before."""
        new = []
        for path in store_paths:
            try:
                fd = os.open(self._entry(path), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            except FileExistsError:
                continue
            os.close(fd)
            new.append(path)
        if new:
            _fsync_dir(self.pending_dir)
        return new

    def remove(self, store_path: str) -> None:
        """Forget a path (no fsync: after a crash it would only be pushed again, a no-op)."""
        self._entry(store_path).unlink(missing_ok=True)

    def pending(self) -> list[str]:
        """Pending paths, oldest first (read from disk: at start; the daemon keeps a Backlog)."""
        entries = []
        with os.scandir(self.pending_dir) as it:
            for e in it:
                if e.name.startswith("."):
                    continue
                with contextlib.suppress(OSError):  # removed meanwhile
                    entries.append((e.stat(follow_symlinks=False).st_mtime_ns, e.name))
        entries.sort()
        return [self.store_prefix + name for _, name in entries]

    def import_spool(self, accept: Callable[[list[str]], object]) -> int:
        """Feed the lines of every complete spool file to ``accept`` (which journals them),
        then delete the files. A crash in between only repeats paths. Returns the line count."""
        n = 0
        stale = time.time() - STALE_SPOOL_TMP
        for f in self.spool_dir.glob(".*"):  # a hook that died mid-write (hooks rename in ms)
            with contextlib.suppress(OSError):
                if f.stat().st_mtime < stale:
                    f.unlink()
        lines: list[str] = []
        files = []
        for f in sorted(p for p in self.spool_dir.iterdir() if not p.name.startswith(".")):
            try:
                data = f.read_bytes()
            except OSError as e:  # left in place: a later version, or a fixed mode, may read it
                self.unreadable.add(f"{f}: {e.strerror}")
                continue
            lines += data.decode(errors="replace").splitlines()
            files.append(f)
        if files:
            accept(lines)
        for f in files:
            f.unlink(missing_ok=True)
        n += len(lines)
        return n

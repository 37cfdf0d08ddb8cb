"""narinfos the substituter served, kept on disk: a LAN of machines or repeated rebuilds ask the
bucket once per path, not once per client and build.

A narinfo does not change while it exists; it goes when a collection deletes its path. The
daemon evicts every deletion it learns (the bucket's deletion records, each dereference
interval and each push; its own collections at once), and everything when it may have missed
records. Bounded (the oldest written go first) and safe to delete at any time.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

MAX_ENTRIES = 200_000
"""About 300 MB of narinfos at the most."""


class NarinfoCache:
    def __init__(self, directory: Path, max_entries: int = MAX_ENTRIES) -> None:
        self.directory = directory
        self.max_entries = max_entries
        directory.mkdir(parents=True, exist_ok=True)
        # What this process wrote and has not dropped: a miss costs no system call.
        self._known = {e.name.removesuffix(".narinfo") for e in self._entries() if e.name.endswith(".narinfo")}

    def _path(self, hash_part: str) -> Path:
        return self.directory / f"{hash_part}.narinfo"  # hash parts are nix32 (layout.served_key)

    def get(self, hash_part: str) -> bytes | None:
        if hash_part not in self._known:
            return None
        try:
            data = self._path(hash_part).read_bytes()
        except OSError:
            return None
        return data if data.startswith(b"StorePath: ") and data.endswith(b"\n") else None

    def put(self, hash_part: str, data: bytes) -> None:
        """Not fsynced: a cache. A file a crash left empty or cut is not served (``get``).
        A full disk or a deleted directory only means this narinfo is not kept."""
        path = self._path(hash_part)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            self.directory.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
            os.replace(tmp, path)
        except OSError:
            tmp.unlink(missing_ok=True)
            return
        self._known.add(hash_part)
        if len(self._known) > self.max_entries:
            self._trim()

    def forget(self, hash_parts: Iterable[str]) -> None:
        for digest in hash_parts:
            self._known.discard(digest)
            self._path(digest).unlink(missing_ok=True)

    def clear(self) -> None:
        self._known.clear()
        self._remove(self._entries())

    @staticmethod
    def _remove(entries: Iterable[os.DirEntry[str]]) -> None:
        for entry in entries:
            Path(entry.path).unlink(missing_ok=True)

    def _entries(self) -> list[os.DirEntry[str]]:
        try:
            return list(os.scandir(self.directory))
        except FileNotFoundError:  # deleted by hand: it is a cache
            return []

    def _trim(self) -> None:
        """Drop the oldest tenth."""
        try:
            entries = sorted(self._entries(), key=lambda e: e.stat().st_mtime)
        except FileNotFoundError:  # one went meanwhile: next time
            return
        dropped = entries[: max(1, len(entries) // 10)]
        self._known.difference_update(e.name.removesuffix(".narinfo") for e in dropped)
        self._remove(dropped)

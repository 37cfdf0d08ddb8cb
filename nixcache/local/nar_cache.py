"""NARs the substituter served, kept on disk up to a size budget (least recently used go first):
a LAN of machines reading the same closures asks the bucket once per NAR, not once per machine.

Only a NAR whose bytes match the ``FileHash`` and ``FileSize`` of the narinfo that named it is
kept, so a cut or corrupt read is never served again. A NAR's bytes do not go stale: its name
is its content's hash, and a collection that deletes it from the bucket leaves the copy here
correct (it simply goes when least used). Safe to delete at any time, even while serving: an
open file is read to its end, a missing one is read from the bucket again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections import OrderedDict
from pathlib import Path
from typing import BinaryIO

from nixcache.formats import nix32

LARGEST = 8
"""A NAR over 1/LARGEST of the budget is not kept: one NAR never empties the cache."""
BATCH = 1 << 20
"""Bytes handed to the writing thread at once."""


class NarCache:
    def __init__(self, directory: Path, budget: int) -> None:
        self.directory = directory
        self.budget = budget
        self._sizes: OrderedDict[str, int] = OrderedDict()  # least recently used first
        self._stored = 0
        self._reserved = 0
        directory.mkdir(parents=True, exist_ok=True)
        entries = []
        for entry in os.scandir(directory):
            try:
                if entry.name.startswith("."):  # a write a crash interrupted
                    Path(entry.path).unlink()
                elif entry.is_file(follow_symlinks=False):
                    stat = entry.stat()
                    entries.append((stat.st_mtime, entry.name, stat.st_size))
            except OSError:
                continue
        for _, name, size in sorted(entries):
            self._sizes[name] = size
            self._stored += size
        self._make_room(0)  # the budget may have shrunk

    @property
    def used(self) -> int:
        return self._stored + self._reserved

    def _path(self, key: str) -> Path:
        return self.directory / key.rpartition("/")[2]  # nar/<hash>.nar[.ext] (layout.served_key)

    def open(self, key: str) -> tuple[BinaryIO, int] | None:
        """The cached NAR, opened (deleting it now does not cut the read), and its size."""
        name = self._path(key).name
        if name not in self._sizes:
            return None
        try:
            f = self._path(key).open("rb")
        except OSError:  # deleted by hand
            self._stored -= self._sizes.pop(name)
            return None
        size = os.fstat(f.fileno()).st_size
        self._sizes.move_to_end(name)
        with contextlib.suppress(OSError):
            os.utime(f.fileno())  # the order survives a restart
        return f, size

    def writer(self, key: str, size: int, file_hash: str) -> Writer | None:
        """Somewhere to copy a NAR of ``size`` bytes while it is served, or None if it is not
        to be kept (too large, no room beside the NARs being written, no usable hash)."""
        if not file_hash.startswith("sha256:") or size <= 0 or size > self.budget // LARGEST:
            return None
        if not self._make_room(size):
            return None
        self._reserved += size
        return Writer(self, key, size, file_hash.removeprefix("sha256:"))

    def _make_room(self, size: int) -> bool:
        while self._sizes and self.used + size > self.budget:
            name, size_of = self._sizes.popitem(last=False)
            self._stored -= size_of
            (self.directory / name).unlink(missing_ok=True)
        return self.used + size <= self.budget

    def _done(self, writer: Writer, kept: bool) -> None:
        self._reserved -= writer.size
        name = writer.path.name
        if kept:
            self._stored += writer.size - self._sizes.pop(name, 0)  # two clients may both copy it
            self._sizes[name] = writer.size


class Writer:
    """A NAR being copied into the cache: kept only if complete and matching its hash."""

    def __init__(self, cache: NarCache, key: str, size: int, expected: str) -> None:
        self.cache = cache
        self.size = size
        self.path = cache._path(key)
        self._tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{id(self)}")
        self._expected = expected
        self._hash = hashlib.sha256()
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._written = 0
        self._file: BinaryIO | None = None
        self._closed = False

    async def add(self, chunk: bytes) -> None:
        self._pending.append(chunk)
        self._pending_bytes += len(chunk)
        if self._pending_bytes >= BATCH:
            await self._flush()

    async def _flush(self) -> None:
        batch, self._pending, self._pending_bytes = b"".join(self._pending), [], 0
        if self._closed or not batch:
            return
        try:
            await asyncio.to_thread(self._write, batch)
        except OSError:  # a full disk, the directory deleted: this NAR is not kept
            self.abort()

    def _write(self, batch: bytes) -> None:
        if self._closed:  # aborted while this batch waited for the thread
            return
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self._tmp.open("wb")
        self._file.write(batch)
        self._hash.update(batch)
        self._written += len(batch)

    async def finish(self) -> bool:
        """Keep the NAR if all of it came and its hash is the one expected."""
        await self._flush()
        if self._closed:
            return False
        try:
            await asyncio.to_thread(self._close)
        except OSError:
            self.abort()
            return False
        if self._written != self.size or nix32.encode(self._hash.digest()) != self._expected:
            self.abort()
            return False
        try:
            os.replace(self._tmp, self.path)
        except OSError:
            self.abort()
            return False
        self._closed = True
        self.cache._done(self, kept=True)
        return True

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()

    def abort(self) -> None:
        """Drop what was written (an error, a client gone, a mismatch); safe to repeat."""
        if self._closed:
            return
        self._closed = True
        if self._file is not None:
            self._file.close()
        self._tmp.unlink(missing_ok=True)
        self.cache._done(self, kept=False)

"""NARs the substituter served, kept on disk up to a size budget (least recently used go first):
a LAN of machines reading the same closures asks the bucket once per NAR, not once per machine.

A kept file is named by the SHA-256 of its bytes (a narinfo's ``FileHash``), checked as it is
written and fsynced before it gets that name: a file here is exactly the bytes its name says,
or absent. The substituter serves one only for a narinfo it has just served whose ``FileHash``
and ``FileSize`` are those of the file, so bytes the bucket no longer names are never served.

The budget holds for what is on disk: copies in progress have a quarter of it (a copy that does
not fit is simply not made, and makes no room), a finished copy makes room by dropping the
least recently used files nobody is reading, and one NAR over an eighth of the budget is not
kept. One copy per file at a time. Safe to delete at any time: an open file is read to its end,
a missing one is read from the bucket again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
from collections import Counter, OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from nixcache.formats import nix32
from nixcache.logs import get

log = get("nixcache.local.nar_cache")

LARGEST = 8
"""A NAR over 1/LARGEST of the budget is not kept: one NAR never empties the cache."""
COPYING = 4
"""Copies in progress may reserve 1/COPYING of the budget; what is kept, the rest."""
BATCH = 1 << 20
"""Bytes handed to the writing thread at once."""
SLACK = 4 << 20
"""How far a copy's disk may fall behind the client (memory held per copy) before the client's
next chunk waits for it, for at most LAG; then the copy is dropped: a slow disk delays a client
once by LAG at the most, never stalls it."""
LAG = 1.0
_NAME_LENGTH = nix32.encoded_length(32)


def file_name(file_hash: str) -> str | None:
    """``sha256:<nix32>`` (a narinfo's FileHash) → the name of its file here; None otherwise."""
    name = file_hash.removeprefix("sha256:")
    if file_hash.startswith("sha256:") and len(name) == _NAME_LENGTH and set(name) <= set(nix32.ALPHABET):
        return name
    return None


class NarCache:
    def __init__(self, directory: Path, budget: int) -> None:
        self.directory = directory
        self.budget = budget
        self._sizes: OrderedDict[str, int] = OrderedDict()  # least recently used first
        self._stored = 0
        self._reserved = 0
        self._copying: set[str] = set()
        self._readers: Counter[str] = Counter()
        entries = []
        with contextlib.suppress(FileNotFoundError):
            for entry in os.scandir(directory):
                with contextlib.suppress(OSError):
                    stat = entry.stat(follow_symlinks=False)
                    if file_name(f"sha256:{entry.name}") and entry.is_file(follow_symlinks=False) and stat.st_size:
                        entries.append((stat.st_mtime, entry.name, stat.st_size))
                    elif not entry.is_dir(follow_symlinks=False):  # a crash mid-copy, a stray file
                        Path(entry.path).unlink()
        for _, name, size in sorted(entries):
            if budget and size <= budget // LARGEST:
                self._sizes[name] = size
                self._stored += size
            else:  # the budget shrank (or the cache is off): not kept
                (directory / name).unlink(missing_ok=True)
        self._make_room(0)

    @property
    def used(self) -> int:
        """Bytes on disk or reserved for copies in progress (never over the budget)."""
        return self._stored + self._reserved

    @contextlib.contextmanager
    def reading(self, file_hash: str, size: int) -> Iterator[BinaryIO | None]:
        """The kept file of ``file_hash`` if it has ``size`` bytes, opened (deleting it now does
        not cut the read, and it is not dropped to make room while read); None otherwise."""
        name = file_name(file_hash)
        if name is None or name not in self._sizes:
            yield None
            return
        try:
            f = (self.directory / name).open("rb")
        except OSError:  # deleted by hand
            self._drop(name)
            yield None
            return
        with f:
            if os.fstat(f.fileno()).st_size != size:  # not what the narinfo names: never served
                if not self._readers[name]:  # (dropped once nobody reads it: on disk till then)
                    self._drop(name)
                yield None
                return
            self._sizes.move_to_end(name)
            with contextlib.suppress(OSError):
                os.utime(f.fileno())  # the order survives a restart
            self._readers[name] += 1
            try:
                yield f
            finally:
                self._readers[name] -= 1
                if not self._readers[name]:
                    del self._readers[name]

    def writer(self, file_hash: str, size: int) -> Writer | None:
        """Somewhere to copy a NAR of ``size`` bytes while it is served, or None if it is not
        to be kept: kept or being copied already, too large, no room for copies in progress."""
        name = file_name(file_hash)
        if name is None or name in self._sizes or name in self._copying or not 0 < size <= self.budget // LARGEST:
            return None
        if self._reserved + size > self.budget // COPYING:
            return None
        self._reserved += size
        self._copying.add(name)
        return Writer(self, name, size)

    def forget(self, file_hashes: list[str]) -> None:
        """Drop these files (their paths were deleted from the bucket)."""
        for file_hash in file_hashes:
            name = file_name(file_hash)
            if name is not None and name in self._sizes:
                self._drop(name)

    def _drop(self, name: str) -> None:
        self._stored -= self._sizes.pop(name)
        (self.directory / name).unlink(missing_ok=True)

    def _make_room(self, size: int) -> bool:
        """Drop the least recently used files nobody is reading until ``size`` more fit beside
        the copies' reserve."""
        room = self.budget - self.budget // COPYING
        for name in [n for n in self._sizes if not self._readers[n]]:
            if self._stored + size <= room:
                break
            self._drop(name)
        return self._stored + size <= room

    def _done(self, writer: Writer, kept: bool) -> None:
        self._reserved -= writer.size
        self._copying.discard(writer.name)
        if kept and self._make_room(writer.size):
            self._sizes[writer.name] = writer.size
            self._stored += writer.size
        else:
            writer.path.unlink(missing_ok=True)


class Writer:
    """A NAR being copied into the cache: kept only if complete and matching its hash."""

    def __init__(self, cache: NarCache, name: str, size: int) -> None:
        self.cache = cache
        self.name = name
        self.size = size
        self.path = cache.directory / name
        self._tmp = cache.directory / f".{name}.{os.getpid()}.{id(self)}"
        self._hash = hashlib.sha256()
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._written = 0
        self._file: BinaryIO | None = None
        self._writing: asyncio.Future[None] | None = None
        self._ended = False

    async def add(self, chunk: bytes) -> None:
        """Queue ``chunk``; BATCH bytes at a time go to a thread (see SLACK and LAG)."""
        if self._ended:
            return
        self._pending.append(chunk)
        self._pending_bytes += len(chunk)
        if self._pending_bytes < BATCH:
            return
        if self._writing is not None and not self._writing.done():
            if self._pending_bytes < SLACK:
                return
            try:
                await asyncio.wait_for(asyncio.shield(self._writing), LAG)
            except TimeoutError:
                log.info("nar_cache.copy_dropped", file=self.name, reason=f"the disk is over {LAG} s behind the client")
                self.abort()  # drop the copy, not the client
                return
            except OSError:
                pass  # seen by _write_pending
        self._write_pending()

    def _write_pending(self) -> None:
        if self._writing is not None and self._writing.exception() is not None:  # a full disk…
            self.abort()
            return
        batch, self._pending, self._pending_bytes = b"".join(self._pending), [], 0
        self._writing = asyncio.get_running_loop().run_in_executor(None, self._write, batch)

    def _write(self, batch: bytes) -> None:  # in a thread, one at a time
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self._tmp.open("wb")
        self._file.write(batch)
        self._hash.update(batch)
        self._written += len(batch)

    async def finish(self) -> bool:
        """Keep the NAR if all of it came and its hash is its name. Not cancellable half-way:
        the writing thread is always waited for."""
        if self._ended:
            return False
        try:
            if self._writing is not None:
                await asyncio.shield(self._writing)
            self._write_pending()
            assert self._writing is not None
            await asyncio.shield(self._writing)
            await asyncio.shield(asyncio.get_running_loop().run_in_executor(None, self._seal))
        except (OSError, asyncio.CancelledError):
            self.abort()
            return False
        if self._written != self.size or nix32.encode(self._hash.digest()) != self.name:
            self.abort()
            return False
        self._ended = True
        self.cache._done(self, kept=True)
        return True

    def _seal(self) -> None:  # in a thread: durable before it has its name
        assert self._file is not None
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        if self._written == self.size and nix32.encode(self._hash.digest()) == self.name:
            os.replace(self._tmp, self.path)
            fd = os.open(self.cache.directory, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def abort(self) -> None:
        """Drop the copy (an error, a client gone, a mismatch, a slow disk); safe to repeat. The
        files are removed once no thread writes them."""
        if self._ended:
            return
        self._ended = True
        self._pending.clear()
        if self._writing is not None and not self._writing.done():
            self._writing.add_done_callback(lambda _: self._clean())
        else:
            self._clean()

    def _clean(self) -> None:
        if self._writing is not None and not self._writing.cancelled():
            self._writing.exception()  # seen: an error only means this copy is not kept
        if self._file is not None:
            self._file.close()
            self._file = None
        self._tmp.unlink(missing_ok=True)
        self.cache._done(self, kept=False)

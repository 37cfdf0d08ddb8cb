"""Serialise a store path as a NAR, hash it, check it, compress it — in bounded memory.

The NAR is produced here rather than by `nix-store --dump` (which ran at ~75 MB/s on the
benchmark machine, the bottleneck of the whole upload). The format is small and strict;
the result is checked against the narHash in the Nix database before an upload may
complete, so a serialisation that differed from Nix's in any byte could never be published.

Where the CPU goes (bench/RESULTS.md, "Where a push spends"): files are read straight into
one reused buffer (no bytes object per read, no join), tens of thousands of small files
cost a few system calls each and no generator frame per directory level; a NAR that fits
in one batch is compressed in one call, and a longer one is compressed as a stream whose
size zstd is told in advance (both spare zstd a good part of its work).
"""

from __future__ import annotations

import asyncio
import hashlib
import lzma
import os
import stat
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

import zstandard

from nixcache.errors import NarHashMismatch, StoreError
from nixcache.formats import nix32

BATCH_SIZE = 1 << 20
"""NAR bytes read, hashed and compressed per hop to a worker thread (and held per stream)."""
_PAD = b"\0" * 8


def _str(data: bytes) -> bytes:
    n = len(data)
    return n.to_bytes(8, "little") + data + _PAD[: (8 - n % 8) % 8]


_MAGIC = _str(b"nix-archive-1")
_OPEN = _str(b"(")
_CLOSE = _str(b")")
_SYMLINK = _OPEN + _str(b"type") + _str(b"symlink") + _str(b"target")
_REGULAR = _OPEN + _str(b"type") + _str(b"regular") + _str(b"contents")
_EXECUTABLE = _OPEN + _str(b"type") + _str(b"regular") + _str(b"executable") + _str(b"") + _str(b"contents")
_DIRECTORY = _OPEN + _str(b"type") + _str(b"directory")
_ENTRY = _str(b"entry") + _OPEN + _str(b"name")
_NODE = _str(b"node")
_O_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK
"""O_NONBLOCK: a file replaced by a FIFO after its lstat must not hang the read (the fstat
that follows finds another inode); it changes nothing for a regular file."""


class NarReader:
    """The NAR serialisation of ``path`` (Nix's ``nix-archive-1``), read into the caller's
    buffer like a file: ``readinto`` fills it whole unless the NAR ends. A directory is
    walked with an explicit stack; a file's contents go from the kernel into the buffer."""

    def __init__(self, path: str) -> None:
        self._root = os.fsencode(path)
        self._started = False
        self._pending = b""
        """Serialisation bytes due before anything else (headers, padding, closing tokens)."""
        self._dirs: list[tuple[bytes, list[bytes]]] = []
        """Directories being walked: (path, names not visited yet, reversed)."""
        self._fd: int | None = None
        self._remaining = 0
        self._after = b""
        self._name = b""
        self._lock = threading.Lock()
        """Held while reading: ``close`` from the event loop (a cancelled upload) waits for a
        read in a worker thread to end, rather than close a descriptor it is using."""
        self._closed = False

    def close(self) -> None:
        """Close the file being read; any later read returns 0. Safe from another thread."""
        with self._lock:
            self._closed = True
            self._close_file()

    def _close_file(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def readinto(self, view: memoryview) -> int:
        """Fill ``view`` with the next NAR bytes; fewer only at the end (0: it has ended)."""
        with self._lock:
            return 0 if self._closed else self._readinto(view)

    def _readinto(self, view: memoryview) -> int:
        pos, end = 0, len(view)
        while pos < end:
            if self._pending:
                k = min(len(self._pending), end - pos)
                view[pos : pos + k] = self._pending[:k]
                self._pending = self._pending[k:]
                pos += k
            elif self._fd is not None:
                if self._remaining:
                    k = os.readv(self._fd, [view[pos : pos + min(self._remaining, end - pos)]])
                    if not k:
                        raise StoreError(f"{os.fsdecode(self._name)} shrank while it was read")
                    pos += k
                    self._remaining -= k
                else:
                    self._close_file()
                    self._pending = self._after
            elif not self._advance():
                break
        return pos

    def _advance(self) -> bool:
        """Queue the next piece of serialisation; False once the NAR is complete."""
        if not self._started:
            self._started = True
            self._pending = _MAGIC + self._enter(self._root)
            return True
        if not self._dirs:
            return False
        path, names = self._dirs[-1]
        if names:
            name = names.pop()
            self._pending = _ENTRY + _str(name) + _NODE + self._enter(path + b"/" + name)
        else:
            self._dirs.pop()
            self._pending = _CLOSE + _CLOSE if self._dirs else _CLOSE  # the directory, its entry
        return True

    def _enter(self, path: bytes) -> bytes:
        """The serialisation of the node at ``path`` up to its contents (a file's contents
        are then read from ``_fd``; a directory's entries are walked next)."""
        entry_close = _CLOSE if self._dirs else b""
        st = os.lstat(path)
        if stat.S_ISREG(st.st_mode):
            size = st.st_size
            head = (_EXECUTABLE if st.st_mode & stat.S_IXUSR else _REGULAR) + size.to_bytes(8, "little")
            tail = _PAD[: (8 - size % 8) % 8] + _CLOSE + entry_close
            if not size:
                return head + tail
            self._fd = os.open(path, _O_READ)
            opened = os.fstat(self._fd)
            if (opened.st_dev, opened.st_ino, opened.st_size) != (st.st_dev, st.st_ino, size):
                raise StoreError(f"{os.fsdecode(path)} changed while it was read")
            self._remaining, self._after, self._name = size, tail, path
            return head
        if stat.S_ISDIR(st.st_mode):
            self._dirs.append((path, sorted(os.listdir(path), reverse=True)))
            return _DIRECTORY
        if stat.S_ISLNK(st.st_mode):
            return _SYMLINK + _str(os.readlink(path)) + _CLOSE + entry_close
        raise StoreError(f"{os.fsdecode(path)}: not a file, directory or symlink")


def nar_bytes(path: str) -> bytes:
    """The whole NAR of ``path`` at once (tests, small paths)."""
    reader = NarReader(path)
    out = bytearray()
    buf = memoryview(bytearray(BATCH_SIZE))
    try:
        while k := reader.readinto(buf):
            out += buf[:k]
    finally:
        reader.close()
    return bytes(out)


def compressor(kind: str, level: int, size: int = -1) -> tuple[Callable[[memoryview], bytes], Callable[[], bytes]]:
    """(compress chunk, flush) for a narinfo ``Compression`` value; ``size``: the exact
    number of bytes that will be compressed, if known (zstd then sizes its work to it)."""
    if kind == "zstd":
        z = zstandard.ZstdCompressor(level=level).compressobj(size=size)
        return z.compress, z.flush
    if kind == "xz":
        x = lzma.LZMACompressor(format=lzma.FORMAT_XZ, preset=min(level, 9))
        return x.compress, x.flush
    if kind == "none":
        return bytes, (lambda: b"")
    raise ValueError(f"unknown compression {kind!r}")


def compress_whole(kind: str, level: int, data: memoryview) -> bytes:
    """``data`` compressed as one complete stream, in one call (zstd: its one-shot path)."""
    if kind == "zstd":
        return zstandard.ZstdCompressor(level=level).compress(data)
    compress, flush = compressor(kind, level)
    return compress(data) + flush()


@dataclass
class NarResult:
    nar_hash: str = ""  # sha256:<nix32>
    nar_size: int = 0
    file_hash: str = ""
    file_size: int = 0
    file_digest: bytes = b""  # the SHA-256 of the compressed stream, raw


class Expected(Protocol):
    """What the Nix database says of a store path (``local.store.PathInfo`` is one)."""

    @property
    def path(self) -> str: ...
    @property
    def nar_hash(self) -> str: ...
    @property
    def nar_size(self) -> int: ...


class NarStream:
    """Async iterator of compressed NAR chunks of ``info.path``.

    Reading, hashing and compressing run in a worker thread, one batch of ``BATCH_SIZE``
    NAR bytes per hop (all three release the GIL for large buffers), so concurrent streams
    use every core. The compressor is never given more or fewer bytes than the narSize in
    the Nix database: a NAR of another size is read to its end, hashed only, and reported.
    When exhausted, ``result`` holds the hashes and sizes. If the bytes do not match the
    narHash/narSize in the Nix database, iteration raises NarHashMismatch *instead of*
    ending, so an upload consuming it never completes with a corrupt NAR.
    """

    def __init__(self, info: Expected, compression: str, level: int) -> None:
        self.info = info
        self.compression = compression
        self.level = level
        self.result = NarResult()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        expected = self.info.nar_size
        nar_sha = hashlib.sha256()
        file_sha = hashlib.sha256()
        reader = NarReader(self.info.path)
        buf = memoryview(bytearray(max(1, min(BATCH_SIZE, expected))))
        stream: tuple[Callable[[memoryview], bytes], Callable[[], bytes]] | None = None

        def batch() -> tuple[bytes, bool]:
            """Read, hash and compress the next batch of NAR; (compressed, finished)."""
            nonlocal stream
            taken = self.result.nar_size
            want = min(len(buf), expected - taken)
            k = reader.readinto(buf[:want])
            nar_sha.update(buf[:k])
            self.result.nar_size += k
            if k < want:  # shorter than the database says: _check reports it
                return b"", True
            if taken + k < expected:
                stream = stream or compressor(self.compression, self.level, expected)
                data = stream[0](buf[:k])
                file_sha.update(data)
                return data, False
            if taken == 0:  # the whole NAR is in the buffer
                data = compress_whole(self.compression, self.level, buf[:k])
            else:
                stream = stream or compressor(self.compression, self.level, expected)
                data = stream[0](buf[:k]) + stream[1]()
            extra = reader.readinto(buf)
            if extra:  # longer than the database says: hash the rest for _check's report
                while extra:
                    nar_sha.update(buf[:extra])
                    self.result.nar_size += extra
                    extra = reader.readinto(buf)
                return b"", True
            file_sha.update(data)
            return data, True

        try:
            finished = False
            while not finished:
                data, finished = await asyncio.to_thread(batch)
                self.result.file_size += len(data)
                if finished:
                    self._check(nar_sha.digest(), file_sha.digest())
                if data:
                    yield data
        except OSError as e:
            raise StoreError(f"cannot read {self.info.path}: {e.strerror} ({e.filename})") from None
        finally:
            reader.close()

    def _check(self, nar_digest: bytes, file_digest: bytes) -> None:
        self.result.nar_hash = "sha256:" + nix32.encode(nar_digest)
        self.result.file_hash = "sha256:" + nix32.encode(file_digest)
        self.result.file_digest = file_digest
        if self.result.nar_hash != self.info.nar_hash or self.result.nar_size != self.info.nar_size:
            raise NarHashMismatch(
                f"{self.info.path}: store contents hash to {self.result.nar_hash} "
                f"({self.result.nar_size} bytes), the Nix database says {self.info.nar_hash} "
                f"({self.info.nar_size} bytes); run `nix-store --verify --check-contents`"
            )

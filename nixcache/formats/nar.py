"""Serialise a store path as a NAR, hash it, check it, compress it — in bounded memory.

The NAR is produced here rather than by `nix-store --dump` (which ran at ~75 MB/s on the
benchmark machine, the bottleneck of the whole upload). The format is small and strict;
the result is checked against the narHash in the Nix database before an upload may
complete, so a serialisation that differed from Nix's in any byte could never be published.
"""

from __future__ import annotations

import asyncio
import hashlib
import lzma
import os
import stat
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import zstandard

from nixcache.errors import NarHashMismatch, StoreError
from nixcache.formats import nix32

READ_SIZE = 1 << 20
BATCH_SIZE = 1 << 20
_PAD = b"\0" * 8


def _str(data: bytes) -> bytes:
    n = len(data)
    return n.to_bytes(8, "little") + data + _PAD[: (8 - n % 8) % 8]


_OPEN = _str(b"(")
_CLOSE = _str(b")")


def nar_chunks(path: str) -> Iterator[bytes]:
    """The NAR serialisation of ``path`` (Nix's ``nix-archive-1``), in pieces of ≤ 1 MiB."""
    yield _str(b"nix-archive-1")
    yield from _node(os.fsencode(path))


def _node(path: bytes) -> Iterator[bytes]:
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode):
        yield _OPEN + _str(b"type") + _str(b"symlink") + _str(b"target") + _str(os.readlink(path)) + _CLOSE
    elif stat.S_ISREG(st.st_mode):
        head = _OPEN + _str(b"type") + _str(b"regular")
        if st.st_mode & stat.S_IXUSR:
            head += _str(b"executable") + _str(b"")
        size = st.st_size
        yield head + _str(b"contents") + size.to_bytes(8, "little")
        with open(path, "rb", buffering=0) as f:
            remaining = size
            while remaining > 0:
                block = f.read(min(READ_SIZE, remaining))
                if not block:
                    raise StoreError(f"{os.fsdecode(path)} shrank while it was read")
                remaining -= len(block)
                yield block
        yield _PAD[: (8 - size % 8) % 8] + _CLOSE
    elif stat.S_ISDIR(st.st_mode):
        yield _OPEN + _str(b"type") + _str(b"directory")
        for name in sorted(os.listdir(path)):
            yield _str(b"entry") + _OPEN + _str(b"name") + _str(name) + _str(b"node")
            yield from _node(path + b"/" + name)
            yield _CLOSE
        yield _CLOSE
    else:
        raise StoreError(f"{os.fsdecode(path)}: not a file, directory or symlink")


def compressor(kind: str, level: int) -> tuple[Callable[[bytes], bytes], Callable[[], bytes]]:
    """(compress chunk, flush) for a narinfo ``Compression`` value."""
    if kind == "zstd":
        z = zstandard.ZstdCompressor(level=level).compressobj()
        return z.compress, z.flush
    if kind == "xz":
        x = lzma.LZMACompressor(format=lzma.FORMAT_XZ, preset=min(level, 9))
        return x.compress, x.flush
    if kind == "none":
        return (lambda b: b), (lambda: b"")
    raise ValueError(f"unknown compression {kind!r}")


@dataclass
class NarResult:
    nar_hash: str = ""  # sha256:<nix32>
    nar_size: int = 0
    file_hash: str = ""
    file_size: int = 0


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

    Reading, hashing and compressing run in a worker thread, about 1 MiB per hop (all three
    release the GIL for large buffers), so concurrent streams use every core.
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
        compress, flush = compressor(self.compression, self.level)
        nar_sha = hashlib.sha256()
        file_sha = hashlib.sha256()
        pieces = nar_chunks(self.info.path)

        def batch() -> tuple[bytes, bool]:
            """Read, hash and compress the next ~1 MiB of NAR; (compressed, finished)."""
            raw = []
            taken = 0
            finished = True
            for piece in pieces:
                raw.append(piece)
                taken += len(piece)
                if taken >= BATCH_SIZE:
                    finished = False
                    break
            nar = b"".join(raw)
            nar_sha.update(nar)
            self.result.nar_size += len(nar)
            data = compress(nar) + (flush() if finished else b"")
            file_sha.update(data)
            return data, finished

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

    def _check(self, nar_digest: bytes, file_digest: bytes) -> None:
        self.result.nar_hash = "sha256:" + nix32.encode(nar_digest)
        self.result.file_hash = "sha256:" + nix32.encode(file_digest)
        if self.result.nar_hash != self.info.nar_hash or self.result.nar_size != self.info.nar_size:
            raise NarHashMismatch(
                f"{self.info.path}: store contents hash to {self.result.nar_hash} "
                f"({self.result.nar_size} bytes), the Nix database says {self.info.nar_hash} "
                f"({self.info.nar_size} bytes); run `nix-store --verify --check-contents`"
            )

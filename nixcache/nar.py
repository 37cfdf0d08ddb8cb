"""Stream a NAR out of the store: hash it, check it, compress it, in bounded memory."""

from __future__ import annotations

import asyncio
import hashlib
import lzma
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import zstandard

from nixcache import nix32, store
from nixcache.errors import NarHashMismatch, StoreError

READ_SIZE = 1 << 20


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


class NarStream:
    """Async iterator of compressed NAR chunks of ``info.path``.

    When exhausted, ``result`` holds the hashes and sizes. If the bytes do not match the
    narHash/narSize in the Nix database, iteration raises NarHashMismatch *instead of*
    ending, so an upload consuming it never completes with a corrupt NAR.
    """

    def __init__(self, info: store.PathInfo, compression: str, level: int) -> None:
        self.info = info
        self.compression = compression
        self.level = level
        self.result = NarResult()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        compress, flush = compressor(self.compression, self.level)
        nar_sha = hashlib.sha256()
        file_sha = hashlib.sha256()

        def step(chunk: bytes) -> bytes:
            nar_sha.update(chunk)
            out = compress(chunk)
            file_sha.update(out)
            return out

        proc = await asyncio.create_subprocess_exec(
            *store.dump_command(self.info.path),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None and proc.stderr is not None
        try:
            while chunk := await proc.stdout.read(READ_SIZE):
                self.result.nar_size += len(chunk)
                out = await asyncio.to_thread(step, chunk)
                if out:
                    self.result.file_size += len(out)
                    yield out
            tail = flush()
            file_sha.update(tail)
            self.result.file_size += len(tail)
            err = await proc.stderr.read()
            if await proc.wait() != 0:
                raise StoreError(f"nix-store --dump {self.info.path} failed: {err.decode(errors='replace').strip()}")
            self.result.nar_hash = "sha256:" + nix32.encode(nar_sha.digest())
            self.result.file_hash = "sha256:" + nix32.encode(file_sha.digest())
            if self.result.nar_hash != self.info.nar_hash or self.result.nar_size != self.info.nar_size:
                raise NarHashMismatch(
                    f"{self.info.path}: store contents hash to {self.result.nar_hash} "
                    f"({self.result.nar_size} bytes), the Nix database says {self.info.nar_hash} "
                    f"({self.info.nar_size} bytes); run `nix-store --verify --check-contents`"
                )
            if tail:
                yield tail
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

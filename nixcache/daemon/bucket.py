"""The bucket the daemon writes to: an open S3 client and the uploader using it.

A reload to another bucket opens a new one; the old one is closed once no job uses it."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

from nixcache.bucket.s3 import S3
from nixcache.config import Config, load_signing_key
from nixcache.ops.upload import Uploader


class Bucket:
    """An open S3 client and the uploader using it; retired (closed) once no job uses it."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.target = (cfg.s3.endpoint, cfg.s3.region, cfg.s3.bucket)
        """Which bucket: what the uploader's and publisher's knowledge is about."""
        self.s3 = S3(cfg.s3)
        self.uploader: Uploader | None = None
        self.active = 0
        self.idle = asyncio.Event()
        self.idle.set()

    async def open(self) -> Bucket:
        key = load_signing_key(self.cfg)
        await self.s3.__aenter__()
        self.uploader = Uploader(self.cfg, self.s3, key)
        return self

    async def close(self) -> None:
        await self.idle.wait()
        await self.s3.__aexit__(None, None, None)

    @contextlib.contextmanager
    def use(self) -> Iterator[Uploader]:
        assert self.uploader is not None
        self.active += 1
        self.idle.clear()
        try:
            yield self.uploader
        finally:
            self.active -= 1
            if self.active == 0:
                self.idle.set()

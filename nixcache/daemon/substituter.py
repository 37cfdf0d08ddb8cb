"""The bucket as a Nix binary cache over HTTP, read with this host's credentials: private buckets.

Only what a Nix client reads is served (``nix-cache-info``, narinfos, NARs: see
``layout.served_key``), with GET and HEAD; nothing else of the bucket (no listing, no
``gcroots/``, no writes). Objects are streamed, never held whole. A missing narinfo costs one
request to the bucket, then none for ``negative_ttl``. Off loopback, every request needs the
login and password of an entry of ``netrc_file`` (what Nix sends from its ``netrc-file``).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import netrc
import resource
import time
from collections import OrderedDict
from collections.abc import Iterable
from pathlib import Path
from typing import BinaryIO, NamedTuple

from aiohttp import web

from nixcache.bucket import layout
from nixcache.bucket.s3 import S3
from nixcache.daemon.bucket import Bucket
from nixcache.daemon.state import State
from nixcache.errors import ConfigError, S3Error
from nixcache.local.nar_cache import NarCache, Writer
from nixcache.local.narinfo_cache import NarinfoCache
from nixcache.logs import get

log = get("nixcache.daemon.substituter")

MAX_MISSES = 100_000
"""Misses remembered (the oldest are forgotten first)."""
STREAMS = 32
"""Objects read from the bucket at once (its read pool, apart from the uploads' connections:
``signed.CONNECTIONS``). Others wait up to SLOT_WAIT, then get 503."""
SLOT_WAIT = 30.0
STALL = 60.0
"""A client that accepts no data for this long is dropped (its stream slot is freed)."""
SLICE = 1 << 18
"""A kept NAR is sent (sendfile) this much at a time, the stall timer moved between slices: a
client slower than SLICE per STALL (4 KiB/s) is dropped, as one slower than a bucket chunk per
STALL is."""


class Named(NamedTuple):
    """What the narinfo that named a NAR says of it."""

    digest: str
    file_hash: str
    file_size: int


def load_logins(path: Path) -> dict[str, str]:
    """login → password of every entry of a netrc file."""
    try:
        parsed = netrc.netrc(str(path))
    except (OSError, netrc.NetrcParseError) as e:
        raise ConfigError(f"substituter.netrc_file: {path}: {e}") from None
    logins = {login: password for login, _, password in parsed.hosts.values() if login and password}
    if not logins:
        raise ConfigError(f"substituter.netrc_file: {path}: no entry with a login and a password")
    return logins


def authorized(header: str | None, logins: dict[str, str]) -> bool:
    """Is ``Authorization: Basic …`` one of ``logins``? (constant-time on the password)"""
    if not header or not header.startswith("Basic "):
        return False
    try:
        login, sep, password = base64.b64decode(header[6:], validate=True).decode().partition(":")
    except (binascii.Error, UnicodeDecodeError):
        return False
    expected = logins.get(login)
    return bool(sep) and expected is not None and hmac.compare_digest(expected.encode(), password.encode())


class Substituter(State):
    _runner: web.AppRunner | None = None
    _cache: NarinfoCache | None = None
    _cached_target: tuple[str | None, str, str] | None = None

    async def _start_substituter(self) -> None:
        settings = self.cfg.substituter
        self._runner = None
        if not settings.listen:
            return
        self._logins = load_logins(settings.netrc_file) if settings.netrc_file else None
        self._caching = settings.narinfo_cache  # the [substituter] settings need a restart
        _raise_open_files()
        self._misses: OrderedDict[str, float] = OrderedDict()
        self._named_by: dict[str, Named] = {}  # NAR key → what the narinfo last served of it says
        self._nar_of: dict[str, str] = {}  # narinfo hash → its NAR key
        self._streams = asyncio.Semaphore(STREAMS)
        # Kept files are named by their bytes' hash: kept across restarts and buckets. Off, the
        # directory is emptied.
        nars = NarCache(self.cfg.state_dir / "substituter" / "nars", settings.nar_cache_mb << 20)
        self._nars = nars if settings.nar_cache_mb else None
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._serve, expect_handler=self._expect)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
        await runner.setup()
        host, _, port = settings.listen.rpartition(":")
        await web.TCPSite(runner, host.strip("[]"), int(port)).start()
        self._runner = runner
        if self.bucket is not None:
            self._follow(self.bucket)
        log.info("substituter.listening", listen=settings.listen, auth=self._logins is not None)

    def _follow(self, bucket: Bucket) -> None:
        """Cache narinfos of ``bucket`` (a reload may change it), evicting what its collections
        delete: the deletion records this daemon learns are told to the cache."""
        if self._runner is None:
            return
        if bucket.target != self._cached_target:  # what was known of another bucket goes
            self._misses.clear()
            self._named_by.clear()
            self._nar_of.clear()
            self._cached_target = bucket.target
            self._cache = None
            if self._caching:
                digest = hashlib.sha256(repr(bucket.target).encode()).hexdigest()[:16]
                self._cache = NarinfoCache(self.cfg.state_dir / "substituter" / digest)
                self._cache.clear()  # written before this process learnt the records: not trusted
        cache = self._cache
        if bucket.uploader is None:
            return

        def evict(paths: Iterable[str], everything: bool) -> None:
            if everything:  # the narinfos are read again: a NAR is served only for a narinfo served
                self._named_by.clear()
                self._nar_of.clear()
                if cache is not None:
                    cache.clear()
                return
            paths = list(paths)
            if cache is not None:
                cache.forget(paths)
            keys = [key for path in paths if (key := self._nar_of.pop(path, None)) is not None]
            gone = [named.file_hash for key in keys if (named := self._named_by.pop(key, None)) is not None]
            if self._nars is not None:  # a path deleted by mistake (a secret) leaves this disk too
                self._nars.forget(gone)

        bucket.uploader.records.listeners.append(evict)  # a reload to the same bucket adopts it

    async def _stop_substituter(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    def _missing(self, key: str) -> bool:
        """Answered missing within ``negative_ttl``."""
        expires = self._misses.get(key)
        if expires is None:
            return False
        if time.monotonic() < expires:
            return True
        del self._misses[key]
        return False

    def _remember_missing(self, key: str) -> None:
        self._misses[key] = time.monotonic() + self.cfg.substituter.negative_ttl
        self._misses.move_to_end(key)
        while len(self._misses) > MAX_MISSES:
            self._misses.popitem(last=False)

    def _refused(self, request: web.Request) -> web.Response | None:
        """401 without a valid login (before anything else is answered), 405 for a method a
        Nix client does not use, 400 for what it never sends (an encoded name, a query)."""
        if self._logins is not None and not authorized(request.headers.get("Authorization"), self._logins):
            return web.Response(status=401, headers={"WWW-Authenticate": 'Basic realm="nixcache"'})
        if request.method not in ("GET", "HEAD"):
            return web.Response(status=405, headers={"Allow": "GET, HEAD"})
        if any(c in request.raw_path for c in "%\\?#"):
            return web.Response(status=400)
        return None

    async def _expect(self, request: web.Request) -> web.Response | None:
        """``Expect:`` is answered after the login check, and never with 100 Continue (GET and
        HEAD send no body)."""
        return self._refused(request)

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        refused = self._refused(request)
        if refused is not None:
            return refused
        key = layout.served_key(request.raw_path)
        if key is None or self._missing(key):
            return web.Response(status=404)
        bucket = self.bucket
        assert bucket is not None
        digest = layout.hash_of_narinfo_key(key)
        cache = self._cache
        stale = bucket.uploader is None or bucket.uploader.records.stale
        if stale:  # it may have missed deletions: nothing remembered of the bucket is trusted
            self._named_by.clear()
            self._nar_of.clear()
            if cache is not None and digest is not None:
                cache.clear()
        named = self._named_by.get(key) if digest is None else None
        if named is not None and self._nars is not None:  # kept, and named by a narinfo just served
            with self._nars.reading(named.file_hash, named.file_size) as kept:
                if kept is not None:
                    return await self._send_file(request, key, kept, named.file_size)
        if digest is not None and cache is not None and not stale and (data := cache.get(digest)) is not None:
            return self._narinfo_response(request, data, digest)
        try:
            async with asyncio.timeout(SLOT_WAIT):  # every read of the bucket takes a slot
                await self._streams.acquire()
        except TimeoutError:
            return web.Response(status=503, headers={"Retry-After": "10"})
        try:
            with bucket.use() as uploader:
                if digest is not None and cache is not None:
                    epoch = uploader.records.epoch
                    data = await uploader.s3.fetch(key)
                    if data is None:
                        self._remember_missing(key)
                        return web.Response(status=404)
                    records = uploader.records

                    def keep() -> None:
                        # Cached only if nothing changed while it was on its way: no reload (to
                        # this bucket or another), no deletion learnt. Written once the answer
                        # is sent (the next turn of the loop): the client does not wait for it.
                        if self.bucket is bucket and self._cache is cache and records.epoch == epoch:
                            cache.put(digest, data)

                    asyncio.get_running_loop().call_soon(keep)
                    return self._narinfo_response(request, data, digest)
                if request.method == "HEAD":
                    head = await uploader.s3.head(key)
                    if head is None:
                        self._remember_missing(key)
                        return web.Response(status=404)
                    return web.Response(headers={"Content-Length": str(head.get("ContentLength", 0))})
                return await self._stream(request, uploader.s3, key, named)
        except S3Error as e:
            log.warning("substituter.failed", key=key, error=str(e))
            return web.Response(status=502)
        finally:
            self._streams.release()

    def _narinfo_response(self, request: web.Request, data: bytes, digest: str) -> web.Response:
        self._remember_nar(data, digest)
        if request.method == "HEAD":
            return web.Response(headers={"Content-Length": str(len(data))})
        return web.Response(body=data, content_type="text/x-nix-narinfo")

    def _remember_nar(self, narinfo: bytes, digest: str) -> None:
        """Which narinfo named this NAR: if the NAR turns out missing (deleted by a collection
        this daemon has not learnt of yet), that narinfo leaves the cache at once; and the
        NAR's hash and size, which a NAR must match to be kept in the NAR cache."""
        fields = dict(line.partition(b": ")[::2] for line in narinfo.splitlines())
        url = fields.get(b"URL", b"").decode(errors="replace").strip()
        if not url:
            return
        size, file_hash = fields.get(b"FileSize", b""), fields.get(b"FileHash", b"").decode(errors="replace")
        named = Named(digest, file_hash.strip(), int(size) if size.strip().isdigit() else -1)
        self._named_by.pop(url, None)  # the newest last: the oldest are forgotten first
        self._named_by[url] = named
        self._misses.pop(url, None)  # named again (uploaded again): asked for again
        self._nar_of[digest] = url
        while len(self._named_by) > MAX_MISSES:
            self._named_by.pop(next(iter(self._named_by)))
        while len(self._nar_of) > MAX_MISSES:
            self._nar_of.pop(next(iter(self._nar_of)))

    async def _stream(self, request: web.Request, s3: S3, key: str, named: Named | None) -> web.StreamResponse:
        """``named``: what the narinfo last served of this NAR said of it (None if none)."""
        async with s3.reading(key) as reading:
            if reading is None:
                self._remember_missing(key)
                self._named_by.pop(key, None)
                if named is not None and self._cache is not None:
                    self._cache.forget([named.digest])
                    self._remember_missing(f"{named.digest}.narinfo")
                return web.Response(status=404)
            response = web.StreamResponse(headers={"Content-Length": str(reading.size)} if reading.size >= 0 else {})
            response.content_type = _content_type(key)
            await response.prepare(request)
            copy: Writer | None = None
            if self._nars is not None and named is not None and named.file_size == reading.size:
                copy = self._nars.writer(named.file_hash, reading.size)
            loop = asyncio.get_running_loop()
            try:
                # Waits for a slow client (memory stays bounded), but not for ever: STALL from
                # the last chunk written (one timer moved per chunk, not a task per write).
                async with asyncio.timeout(None) as stalled:
                    async for chunk in reading.chunks:
                        stalled.reschedule(loop.time() + STALL)
                        await response.write(chunk)
                        if copy is not None:
                            await copy.add(chunk)
                    stalled.reschedule(None)
                await response.write_eof()
                if copy is not None:
                    await copy.finish()
            except (S3Error, TimeoutError, ConnectionError) as e:
                _cut(request, key, e)
            finally:
                if copy is not None:
                    copy.abort()  # unless finished: a client gone, an error
            return response

    async def _send_file(self, request: web.Request, key: str, f: BinaryIO, size: int) -> web.StreamResponse:
        """A NAR from the NAR cache (``f``, opened and closed by ``NarCache.reading``): no request
        to the bucket, the kernel copies (sendfile)."""
        response = web.StreamResponse(headers={"Content-Length": str(size)})
        response.content_type = _content_type(key)
        await response.prepare(request)
        if request.method == "GET" and size:
            transport = request.transport
            if transport is None:
                raise ConnectionResetError("client gone")
            loop = asyncio.get_running_loop()
            try:
                async with asyncio.timeout(None) as stalled:
                    for offset in range(0, size, SLICE):
                        stalled.reschedule(loop.time() + STALL)
                        await loop.sendfile(transport, f, offset, min(SLICE, size - offset))
            except (OSError, TimeoutError) as e:  # ConnectionError is an OSError
                _cut(request, key, e)
                return response
        await response.write_eof()
        return response


def _cut(request: web.Request, key: str, error: BaseException) -> None:
    """A body cut after its headers went: only closing the connection tells the client (never
    a second answer written into the body, nor a keep-alive connection left waiting)."""
    if not isinstance(error, ConnectionError):  # not the client gone: say why
        log.warning("substituter.cut", key=key, error=str(error) or type(error).__name__)
    if request.transport is not None:
        request.transport.abort()


def _raise_open_files(most: int = 65536) -> None:
    """Every client is a socket: lift systemd's default soft limit (1024) to the hard one, so
    many clients cannot leave no descriptor for the journal, the store or the bucket."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = most if hard == resource.RLIM_INFINITY else min(hard, most)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def _content_type(key: str) -> str:
    if key.endswith(".narinfo"):
        return "text/x-nix-narinfo"
    if key == layout.CACHE_INFO:
        return "text/x-nix-cache-info"
    return "application/x-nix-nar"

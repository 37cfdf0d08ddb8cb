"""The substituter (daemon/substituter.py) against its promises, from an adversarial review (a
helper session): each test forces one sequence against real SeaweedFS (no anonymous identity),
the real daemon or the `Service` driven in-process. All failed on the first version: a narinfo
in flight across a reload cached for the other bucket, or outliving its own collection; the
cache setting read from a config not yet applied; query strings served; `Expect:` answered
before the login check."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from nixcache.bucket.s3 import S3
from nixcache.bucket.seaweed import SeaweedFS, free_port
from nixcache.config import load_config
from nixcache.daemon.service import Bucket as ServiceBucket
from nixcache.daemon.service import Service
from nixcache.formats import nix32
from tests.harness import Bucket, Daemon, base_settings, new_bucket, write_config
from tests.integration.test_substituter import request

Key = tuple[Path, str]
H = "a" * 32
NARINFO = f"{H}.narinfo"


def narinfo_of(tag: str) -> bytes:
    return f"StorePath: /nix/store/{H}-{tag}\nURL: nar/{'0' * 52}.nar\nCompression: none\n".encode()


def settings_for(tmp: Path, bucket: Bucket, key: Key, port: int, **substituter: object) -> dict[str, Any]:
    settings = base_settings(tmp, bucket, key[0])
    settings["substituter"] = {"listen": f"127.0.0.1:{port}", **substituter}
    return settings


class Gate:
    """Holds the daemon's GET of NARINFO from ``bucket`` after the bucket answered it (the
    answer is on its way back: a slow link), until released."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, bucket_name: str) -> None:
        self.fetched = asyncio.Event()
        self.release = asyncio.Event()
        real_get = S3.fetch

        async def get(s3: S3, key: str) -> bytes | None:
            data = await real_get(s3, key)
            if key == NARINFO and s3.bucket == bucket_name and not self.release.is_set():
                self.fetched.set()
                await self.release.wait()
            return data

        monkeypatch.setattr(S3, "fetch", get)


async def fetch(session: aiohttp.ClientSession, port: int) -> tuple[int, bytes]:
    async with session.get(f"http://127.0.0.1:{port}/{NARINFO}") as resp:
        return resp.status, await resp.read()


async def in_process(cfg: Any, cfg_file: Path) -> Service:
    """The daemon's Service with its bucket open and the substituter listening, records read."""
    svc = Service(cfg, cfg_file)
    svc.bucket = await ServiceBucket(cfg).open()
    await svc._start_substituter()
    assert svc.bucket.uploader is not None
    await svc.bucket.uploader.records.refresh()
    return svc


async def shutdown(svc: Service) -> None:
    for task in list(svc.workers.values()):
        task.cancel()
    await asyncio.gather(*svc.workers.values(), return_exceptions=True)
    await svc._stop_substituter()
    if svc.bucket is not None:
        await svc.bucket.close()


# ---- promise 3: a SIGHUP to another bucket while a narinfo GET is on its way -----------------------------


def test_a_narinfo_in_flight_across_a_reload_to_another_bucket_is_cached_for_the_new_bucket(
    tmp_path: Path, private_server: SeaweedFS, signing_key: Key, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`_narinfo` GETs `H.narinfo` from bucket A; before the answer arrives, SIGHUP switches to
    bucket B (which has no such narinfo): `_follow(new)` replaces `self._cache` and
    `self._cached_target` with B's. The GET returns; the guard
    `self.bucket.target == self._cached_target` compares B with B (both read *now*, not when the
    GET began) and `self._cache.put` writes A's narinfo into B's cache. From then on every
    client of B gets A's narinfo (a path B never had, signed by whoever wrote A). Responsible:
    substituter.py `_narinfo` (the target and the cache are not captured before the GET)."""
    a, b = new_bucket(private_server.endpoint), new_bucket(private_server.endpoint)
    a.client.put_object(Bucket=a.name, Key=NARINFO, Body=narinfo_of("from-bucket-a"))
    port = free_port()
    config = write_config(tmp_path / "config.toml", settings_for(tmp_path, a, signing_key, port))
    cfg, cfg_file = load_config(config)
    gate = Gate(monkeypatch, a.name)

    async def go() -> None:
        svc = await in_process(cfg, cfg_file)
        try:
            async with aiohttp.ClientSession() as session:
                in_flight = asyncio.create_task(fetch(session, port))
                await asyncio.wait_for(gate.fetched.wait(), 10)
                write_config(config, settings_for(tmp_path, b, signing_key, port))  # then SIGHUP
                await svc.reload()
                assert svc.bucket.target[2] == b.name
                assert svc.bucket.uploader is not None
                await svc.bucket.uploader.records.refresh()  # the new bucket's records, as publishing does
                gate.release.set()
                await in_flight
                assert b.get(NARINFO) is None
                status, body = await fetch(session, port)
                assert status == 404, f"bucket B has no {NARINFO}, yet the daemon serves {body!r}"
        finally:
            await shutdown(svc)

    asyncio.run(go())


def test_a_narinfo_in_flight_across_a_reload_to_the_same_bucket_outlives_its_own_collection(
    tmp_path: Path, private_server: SeaweedFS, signing_key: Key, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`_narinfo` captures `records = uploader.records` and its epoch before the GET. A SIGHUP to
    the same bucket gives the new uploader a *copy* of the tracker (`adopt`); the collection that
    then deletes H runs on the new one (`self.bucket.uploader.records.learn`, schedule.py): the
    new tracker's epoch moves, and its listener evicts H (nothing cached yet). The old GET
    returns the narinfo it read before the deletion; the old tracker's epoch never moved, so
    `records.epoch == epoch` holds and the narinfo is cached — and served from then on, though
    the daemon deleted H itself and will never evict it again. Responsible: substituter.py
    `_narinfo` (the epoch of the uploader in use, not of the bucket's current tracker)."""
    bucket = new_bucket(private_server.endpoint)
    bucket.client.put_object(Bucket=bucket.name, Key=NARINFO, Body=narinfo_of("deleted"))
    port = free_port()
    config = write_config(tmp_path / "config.toml", settings_for(tmp_path, bucket, signing_key, port))
    cfg, cfg_file = load_config(config)
    gate = Gate(monkeypatch, bucket.name)

    async def go() -> None:
        svc = await in_process(cfg, cfg_file)
        try:
            async with aiohttp.ClientSession() as session:
                in_flight = asyncio.create_task(fetch(session, port))
                await asyncio.wait_for(gate.fetched.wait(), 10)
                await svc.reload()  # SIGHUP, same config
                # this daemon's collection deletes H (what schedule.py's collect does)
                bucket.client.delete_object(Bucket=bucket.name, Key=NARINFO)
                assert svc.bucket.uploader is not None
                svc.bucket.uploader.records.learn({H})
                gate.release.set()
                await in_flight
                status, body = await fetch(session, port)
                assert status == 404, f"{H} was deleted by this daemon's own collection, yet served: {body!r}"
        finally:
            await shutdown(svc)

    asyncio.run(go())


def test_reloads_that_turn_the_narinfo_cache_off_leave_the_other_buckets_cache_in_use(
    tmp_path: Path, private_server: SeaweedFS, signing_key: Key
) -> None:
    """The reload applies the new config, `substituter` included (only a `config.needs_restart`
    warning), but `_reload` calls `_follow(new)` *before* `self.cfg = cfg`, and `_follow` reads
    `self.cfg.substituter.narinfo_cache`: the old setting. SIGHUP 1: A (cache on) → B with
    `narinfo_cache = false`: B gets a cache anyway (old setting: on), and serves into it.
    SIGHUP 2: B → A (still off): now `_follow` returns early, so `self._cache` stays *B's*
    cache, and A's clients are answered B's narinfos. Responsible: substituter.py `_follow`
    (early return leaves `_cache` set; reads the config being replaced) and service.py
    `_reload` (calls it before `self.cfg = cfg`)."""
    a, b = new_bucket(private_server.endpoint), new_bucket(private_server.endpoint)
    b.client.put_object(Bucket=b.name, Key=NARINFO, Body=narinfo_of("from-bucket-b"))
    port = free_port()
    config = write_config(tmp_path / "config.toml", settings_for(tmp_path, a, signing_key, port))
    cfg, cfg_file = load_config(config)

    async def go() -> None:
        svc = await in_process(cfg, cfg_file)
        try:
            async with aiohttp.ClientSession() as session:
                for target in (b, a):  # two SIGHUPs, both with the narinfo cache off
                    write_config(config, settings_for(tmp_path, target, signing_key, port, narinfo_cache=False))
                    await svc.reload()
                    assert svc.bucket.target[2] == target.name
                    assert svc.bucket.uploader is not None
                    await svc.bucket.uploader.records.refresh()  # as the publisher does after a reload
                    if target is b:
                        assert (await fetch(session, port))[0] == 200
                    await asyncio.sleep(0)
                assert a.get(NARINFO) is None
                status, body = await fetch(session, port)
                assert status == 404, f"bucket A has no {NARINFO}, yet the daemon serves {body!r}"
        finally:
            await shutdown(svc)

    asyncio.run(go())


# ---- promise 1: query strings ------------------------------------------------------------------------------


def serving(tmp: Path, bucket: Bucket, key: Key, **substituter: object) -> tuple[Daemon, int]:
    port = free_port()
    config = write_config(tmp / "config.toml", settings_for(tmp, bucket, key, port, **substituter))
    return Daemon(config, tmp / "daemon.log").start(), port


def test_a_query_string_is_not_refused(tmp_path: Path, private_server: SeaweedFS, signing_key: Key) -> None:
    """`_serve` drops everything after `?` (`request.raw_path.partition("?")[0]`) and serves
    the rest: `/nix-cache-info?list-type=2` and `/<hash>.narinfo?x=1` are answered 200, where
    the promise is that a query string (a path trick, S3's listing syntax) gets a 4xx. No S3
    listing results (the key alone is sent), but the filter accepts requests a Nix client never
    makes. Responsible: substituter.py `_serve`."""
    bucket = new_bucket(private_server.endpoint)
    bucket.client.put_object(Bucket=bucket.name, Key="nix-cache-info", Body=b"StoreDir: /nix/store\n")
    bucket.client.put_object(Bucket=bucket.name, Key=NARINFO, Body=narinfo_of("q"))
    daemon, port = serving(tmp_path, bucket, signing_key)
    try:
        got = {p: request(port, "GET", p)[0] for p in ("/nix-cache-info?list-type=2", f"/{NARINFO}?x=1")}
        assert all(400 <= s < 500 for s in got.values()), got
    finally:
        daemon.stop()


# ---- promise 2: nothing but 401 without credentials --------------------------------------------------------


def raw(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        sock.settimeout(3)
        out = b""
        try:
            while chunk := sock.recv(4096):
                out += chunk
                if b"\r\n\r\n" in out:
                    break
        except TimeoutError:
            pass
        return out


def test_without_credentials_an_expect_header_is_answered_before_the_login_is_checked(
    tmp_path: Path, private_server: SeaweedFS, signing_key: Key
) -> None:
    """With `netrc_file` set, a request without `Authorization` but with an `Expect` header is
    answered by aiohttp's default expect handler before `_serve` runs: `Expect: x` gets 417,
    `Expect: 100-continue` gets `100 Continue` — not 401. Harmless in content, but the promise
    is "nothing but 401". Responsible: substituter.py `_start_substituter` (the route's
    `expect_handler` is aiohttp's default)."""
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login builder password s3cret-pass\n")
    netrc.chmod(0o600)
    bucket = new_bucket(private_server.endpoint)
    daemon, port = serving(tmp_path, bucket, signing_key, netrc_file=str(netrc))
    try:
        answers = [
            raw(port, b"GET /nix-cache-info HTTP/1.1\r\nHost: x\r\nExpect: x\r\n\r\n"),
            raw(port, b"POST /nix-cache-info HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 5\r\n\r\n"),
        ]
        firsts = [a.split(b"\r\n", 1)[0] for a in answers]
        assert all(f.startswith(b"HTTP/1.1 401") for f in firsts), firsts
    finally:
        daemon.stop()


# ---- the bucket's answer cut or re-encoded on its way (a second review, of the lean reads) -------------


class CuttingProxy:
    """A reverse proxy in front of the real bucket (the Host header kept: signatures stay valid)
    that drops the connection after ``cut_after`` bytes of a NAR, and gzips what it may (as an
    nginx or a CDN with gzip on does when the request allows it)."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.cut_after: int | None = None
        self.session: aiohttp.ClientSession | None = None
        self.runner: web.AppRunner | None = None

    async def handle(self, request: web.Request) -> web.StreamResponse:
        assert self.session is not None
        hop = {"connection", "keep-alive", "transfer-encoding", "accept-encoding"}
        headers = {k: v for k, v in request.headers.items() if k.lower() not in hop}
        async with self.session.get(self.upstream + request.raw_path, headers=headers, allow_redirects=False) as up:
            body = await up.read()
        if "gzip" in request.headers.get("Accept-Encoding", "") and up.status == 200:
            return web.Response(body=gzip.compress(body), headers={"Content-Encoding": "gzip"})
        if self.cut_after is not None and "/nar/" in request.path and up.status == 200:
            response = web.StreamResponse(headers={"Content-Length": str(len(body))})
            await response.prepare(request)
            await response.write(body[: self.cut_after])
            assert request.transport is not None
            request.transport.abort()
            return response
        return web.Response(status=up.status, body=body)

    async def start(self, port: int) -> None:
        self.session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application()
        app.router.add_route("GET", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", port).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
        if self.session is not None:
            await self.session.close()


async def soon(predicate: Any, what: str) -> None:
    """The daemon keeps a NAR once it is written and fsynced, after the client has all of it."""
    deadline = time.monotonic() + 20
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def keep_alive_get(port: int, path: str) -> tuple[float, bytes]:
    """As Nix asks: HTTP/1.1, keep-alive. How long until the connection ends, and what came."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        got, started = b"", time.monotonic()
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(1 << 16):
                got += chunk
        return time.monotonic() - started, got


def test_a_nar_the_bucket_cuts_ends_the_connection_at_once_and_is_not_kept(
    tmp_path: Path, private_server: SeaweedFS, signing_key: Key
) -> None:
    """The bucket's connection drops mid-NAR, after the daemon sent the headers. The first lean
    reads caught that as an S3Error and answered 502, which aiohttp wrote into the NAR's body;
    on a keep-alive connection the client then waited for the missing bytes until its own
    timeout (400 s in the review). Now the connection is closed at once, and nothing is kept."""
    real = new_bucket(private_server.endpoint)
    nar = bytes(range(256)) * 4096
    nar_key = "nar/" + "1" * 52 + ".nar"
    narinfo = narinfo_of("cut").replace(f"nar/{'0' * 52}.nar".encode(), nar_key.encode())
    file_hash = "sha256:" + nix32.encode(hashlib.sha256(nar).digest())
    narinfo += f"FileHash: {file_hash}\nFileSize: {len(nar)}\n".encode()
    real.client.put_object(Bucket=real.name, Key=nar_key, Body=nar)
    real.client.put_object(Bucket=real.name, Key=NARINFO, Body=narinfo)
    proxy_port, port = free_port(), free_port()
    proxy = CuttingProxy(private_server.endpoint)
    settings = settings_for(tmp_path, Bucket(f"http://127.0.0.1:{proxy_port}", real.name), signing_key, port,
                            nar_cache_mb=64)  # fmt: skip
    cfg, cfg_file = load_config(write_config(tmp_path / "config.toml", settings))

    async def go() -> None:
        await proxy.start(proxy_port)
        svc = await in_process(cfg, cfg_file)
        try:
            # aiohttp's client asks for gzip, the daemon must not: the bytes as stored
            async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}/{NARINFO}") as resp:
                assert (resp.status, await resp.read()) == (200, narinfo)
            proxy.cut_after = 300_000
            took, got = await asyncio.to_thread(keep_alive_get, port, "/" + nar_key)
            head, _, body = got.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200") and f"Content-Length: {len(nar)}".encode() in head
            assert took < 5, f"the client waited {took:.0f} s for bytes that will never come"
            assert len(body) < len(nar) and b"HTTP/1.1" not in body and nar.startswith(body)
            nars = tmp_path / "state" / "substituter" / "nars"
            assert not nars.exists() or not list(nars.iterdir()), "a cut NAR kept"
            proxy.cut_after = None  # the bucket whole again: served and kept
            took, got = await asyncio.to_thread(keep_alive_get_whole, port, "/" + nar_key)
            assert got.partition(b"\r\n\r\n")[2] == nar
            # Kept once written and fsynced, after the client has it all: waited for.
            await soon(lambda: [f.name for f in nars.iterdir()] == [file_hash[7:]], "kept, named by its bytes")
        finally:
            await shutdown(svc)
            await proxy.stop()

    asyncio.run(go())


def keep_alive_get_whole(port: int, path: str) -> tuple[float, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        got, started = b"", time.monotonic()
        while chunk := s.recv(1 << 16):
            got += chunk
        return time.monotonic() - started, got


def test_a_kept_nar_is_served_only_for_a_narinfo_of_the_bucket_in_use_and_goes_with_its_path(
    tmp_path: Path, private_server: SeaweedFS, signing_key: Key
) -> None:
    """From the second review: kept bytes outlived their path (a collection learnt of, and the
    NAR still downloadable by any client holding the narinfo: a secret pushed by mistake stayed
    served) and their bucket (after a reload to a bucket that never held them)."""
    a, b = new_bucket(private_server.endpoint), new_bucket(private_server.endpoint)
    nar = bytes(range(256)) * 1024
    nar_key = "nar/" + "2" * 52 + ".nar"
    file_hash = "sha256:" + nix32.encode(hashlib.sha256(nar).digest())
    narinfo = narinfo_of("kept").replace(f"nar/{'0' * 52}.nar".encode(), nar_key.encode())
    narinfo += f"FileHash: {file_hash}\nFileSize: {len(nar)}\n".encode()
    for bucket in (a, b):
        bucket.client.put_object(Bucket=bucket.name, Key=NARINFO, Body=narinfo)
    a.client.put_object(Bucket=a.name, Key=nar_key, Body=nar)
    port = free_port()
    config = write_config(tmp_path / "config.toml", settings_for(tmp_path, a, signing_key, port, nar_cache_mb=64))
    cfg, cfg_file = load_config(config)
    kept = tmp_path / "state" / "substituter" / "nars" / file_hash[7:]

    async def get(session: aiohttp.ClientSession, path: str) -> tuple[int, bytes]:
        async with session.get(f"http://127.0.0.1:{port}/{path}") as resp:
            return resp.status, await resp.read()

    async def go() -> None:
        svc = await in_process(cfg, cfg_file)
        try:
            async with aiohttp.ClientSession() as session:
                assert await get(session, NARINFO) == (200, narinfo)
                assert await get(session, nar_key) == (200, nar)
                await soon(kept.exists, "the NAR kept")
                assert kept.read_bytes() == nar
                a.client.delete_object(Bucket=a.name, Key=nar_key)  # gone from the bucket, still named
                assert await get(session, nar_key) == (200, nar), "served from the disk"
                assert svc.bucket is not None and svc.bucket.uploader is not None
                svc.bucket.uploader.records.learn({H})  # its path collected (this daemon's collection)
                assert not kept.exists(), "the bytes of a collected path stay on this disk"
                assert (await get(session, nar_key))[0] == 404, "a collected path's NAR still served"

                a.client.put_object(Bucket=a.name, Key=nar_key, Body=nar)
                assert await get(session, NARINFO) == (200, narinfo)
                assert await get(session, nar_key) == (200, nar)
                await soon(kept.exists, "the NAR kept again")
                uploader = svc.bucket.uploader
                gets = uploader.s3.requests["GetObject"]
                assert await get(session, nar_key) == (200, nar)
                assert uploader.s3.requests["GetObject"] == gets, "served from the disk"
                listed, uploader.records.last_listed = uploader.records.last_listed, 0.0  # records stale
                assert await get(session, nar_key) == (200, nar)
                assert uploader.s3.requests["GetObject"] == gets + 1, "served from the disk, records stale"
                uploader.records.last_listed = listed
                write_config(config, settings_for(tmp_path, b, signing_key, port, nar_cache_mb=64))  # then SIGHUP
                await svc.reload()
                assert svc.bucket.target[2] == b.name
                assert (await get(session, nar_key))[0] == 404, "bucket B never held this NAR"
                assert kept.exists(), "kept: the bytes are right wherever a narinfo names them"
        finally:
            await shutdown(svc)

    asyncio.run(go())

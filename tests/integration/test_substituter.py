"""A private bucket, substituted through the daemon (`substituter.listen`): real SeaweedFS with
no anonymous identity, real Nix pushing (the hook) and substituting with signatures required."""

from __future__ import annotations

import asyncio
import base64
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from nixcache.bucket import layout
from nixcache.bucket.seaweed import ACCESS_KEY, SeaweedFS, free_port
from tests.harness import (
    NIX,
    Bucket,
    Daemon,
    base_settings,
    new_bucket,
    nix_build,
    run_cli,
    wait_until,
    write_config,
    write_hook_script,
)

Key = tuple[Path, str]


@pytest.fixture(params=["seaweedfs", "moto"])
def private_bucket(request: pytest.FixtureRequest) -> Bucket:
    """A bucket nobody may read anonymously: SeaweedFS with no anonymous identity, and moto (AWS:
    objects are private unless a bucket policy says otherwise)."""
    server = request.getfixturevalue("private_server" if request.param == "seaweedfs" else "moto")
    return new_bucket(server.endpoint)


def nix_copy(
    url: str, paths: list[str], dest: Path, public_key: str, *options: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*NIX, "copy", "--from", url, "--to", str(dest), "--option", "require-sigs", "true",
         "--option", "trusted-public-keys", public_key, *options, *paths],
        capture_output=True, text=True,
    )  # fmt: skip


def status_of(config: Path) -> dict[str, Any]:
    done = run_cli(config, "status", "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def request(port: int, method: str, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        reply = conn.getresponse()
        return reply.status, reply.read()
    finally:
        conn.close()


def serving(tmp: Path, bucket: Bucket, key: Key, **substituter: object) -> tuple[Daemon, int]:
    port = free_port()
    settings = base_settings(tmp, bucket, key[0])
    settings["substituter"] = {"listen": f"127.0.0.1:{port}", **substituter}
    daemon = Daemon(write_config(tmp / "config.toml", settings), tmp / "daemon.log").start()
    return daemon, port


def test_a_private_bucket_is_substituted_through_the_daemon_and_not_anonymously(
    tmp_path: Path, private_bucket: Bucket, signing_key: Key
) -> None:
    bucket = private_bucket
    daemon, port = serving(tmp_path, bucket, signing_key)
    closure = nix_build(tmp_path, hook=write_hook_script(tmp_path, daemon.config))
    wait_until(lambda: all(bucket.has_narinfo(p) for p in closure), 60, "the closure pushed")

    direct = nix_copy(bucket.url, [closure[-1]], tmp_path / "store-direct", signing_key[1])
    assert direct.returncode != 0, "the bucket is readable anonymously: this test would prove nothing"

    proxied = nix_copy(f"http://127.0.0.1:{port}", [closure[-1]], tmp_path / "store-proxied", signing_key[1])
    assert proxied.returncode == 0, proxied.stderr
    copied = [tmp_path / "store-proxied" / p.lstrip("/") for p in closure]
    assert all(p.exists() for p in copied), "every path of the closure substituted"

    status, body = request(port, "GET", "/nix-cache-info")
    assert status == 200 and b"StoreDir: /nix/store" in body
    assert request(port, "HEAD", "/" + layout.narinfo_key(closure[0]))[0] == 200
    assert daemon.alive() and daemon.stop() == 0


def test_wrong_credentials_are_a_502_and_one_clear_log_line(
    tmp_path: Path, private_server: SeaweedFS, signing_key: Key
) -> None:
    """The substituter's reads are signed GETs of their own (bucket/signed.py): a wrong
    secret is worded as the client's errors are, and never served as a missing object."""
    bucket = new_bucket(private_server.endpoint)
    bucket.client.put_object(Bucket=bucket.name, Key="nix-cache-info", Body=b"StoreDir: /nix/store\n")
    daemon, port = serving(tmp_path, bucket, signing_key)
    assert request(port, "GET", "/nix-cache-info")[0] == 200
    daemon.stop()
    (tmp_path / "credentials").write_text(
        f"[default]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = wrong\n"
    )
    daemon.start()
    wait_until(lambda: daemon.events("substituter.listening"), 30, "the substituter listening")
    for path in ("/nix-cache-info", "/" + "0" * 32 + ".narinfo", "/nar/" + "1" * 52 + ".nar.zst"):
        assert request(port, "GET", path)[0] == 502
    failures = daemon.events("substituter.failed")
    assert len(failures) == 3
    assert all("SignatureDoesNotMatch (HTTP 403): the secret key is wrong" in f["error"] for f in failures)
    assert request(port, "GET", "/" + "0" * 32 + ".narinfo")[0] == 502, "a failure is not remembered as a miss"
    assert daemon.alive() and daemon.stop() == 0


def test_hostile_requests_are_refused_and_uploads_go_on(
    tmp_path: Path, private_server: SeaweedFS, signing_key: Key
) -> None:
    bucket = new_bucket(private_server.endpoint)
    daemon, port = serving(tmp_path, bucket, signing_key, negative_ttl=60)
    closure = nix_build(tmp_path, hook=write_hook_script(tmp_path, daemon.config))
    wait_until(lambda: all(bucket.has_narinfo(p) for p in closure), 60, "the closure pushed")
    narinfo = "/" + layout.narinfo_key(closure[0])
    refused = {
        "/": 404, "/?list-type=2": 400, "/gc.lease": 404, "/gcroots/": 404,
        f"/{layout.roots_folder('testhost')}.claim": 404, "/gctrash/x.gcinfo.gz": 404, "/gc/records/x.open": 404,
        "/nar/../" + narinfo[1:]: 404, "/%2e%2e/" + narinfo[1:]: 400, "/nar%2f" + "0" * 52 + ".nar": 400,
        narinfo + "%00": 400, "/..%5c" + narinfo[1:]: 400, "http://evil.example/" + narinfo[1:]: 404,
    }  # fmt: skip
    got = {path: request(port, "GET", path)[0] for path in refused}
    assert got == refused
    for method in ("PUT", "DELETE", "POST"):
        assert request(port, method, narinfo)[0] == 405
    assert bucket.has_narinfo(closure[0]), "nothing was deleted"

    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:  # a 10 MB header
        try:
            sock.sendall(
                b"GET " + narinfo.encode() + b" HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * (10 << 20) + b"\r\n\r\n"
            )
            answer = sock.recv(100)
        except (ConnectionResetError, BrokenPipeError):
            pass  # refused before it was all sent
    assert answer == b"" or answer.startswith(b"HTTP/1.1 4"), answer
    assert request(port, "GET", narinfo)[0] == 200, "still serving"

    missing = "/" + "1" * 32 + ".narinfo"
    gets = status_of(daemon.config)["requests"].get("GetObject", 0)
    assert [request(port, "GET", missing)[0] for _ in range(20)] == [404] * 20
    assert status_of(daemon.config)["requests"].get("GetObject", 0) == gets + 1, "one GET, then the negative cache"

    more = nix_build(tmp_path, hook=write_hook_script(tmp_path, daemon.config), out="result2")
    wait_until(lambda: all(bucket.has_narinfo(p) for p in more), 60, "uploads go on after the hostile requests")
    assert daemon.alive() and daemon.stop() == 0


def test_credentials_are_required_when_configured_and_nix_sends_them_from_its_netrc(
    tmp_path: Path, private_server: SeaweedFS, signing_key: Key
) -> None:
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login builder password s3cret-pass\n")
    netrc.chmod(0o600)
    bucket = new_bucket(private_server.endpoint)
    daemon, port = serving(tmp_path, bucket, signing_key, netrc_file=str(netrc))
    closure = nix_build(tmp_path, hook=write_hook_script(tmp_path, daemon.config))
    wait_until(lambda: all(bucket.has_narinfo(p) for p in closure), 60, "the closure pushed")

    def basic(login: str, password: str) -> dict[str, str]:
        return {"Authorization": "Basic " + base64.b64encode(f"{login}:{password}".encode()).decode()}

    assert request(port, "GET", "/nix-cache-info")[0] == 401
    assert request(port, "GET", "/nix-cache-info", basic("builder", "wrong"))[0] == 401
    assert request(port, "GET", "/nix-cache-info", basic("nobody", "s3cret-pass"))[0] == 401
    assert request(port, "GET", "/nix-cache-info", basic("builder", "s3cret-pass"))[0] == 200

    url = f"http://127.0.0.1:{port}"
    without = nix_copy(url, [closure[-1]], tmp_path / "store-without", signing_key[1])
    assert without.returncode != 0
    netrc_option = ("--option", "netrc-file")
    wrong = tmp_path / "netrc-wrong"
    wrong.write_text("machine 127.0.0.1 login builder password nope\n")
    refused = nix_copy(
        url, [closure[-1]], tmp_path / "store-wrong", signing_key[1], "--option", "netrc-file", str(wrong)
    )
    assert refused.returncode != 0
    ok = nix_copy(url, [closure[-1]], tmp_path / "store-ok", signing_key[1], *netrc_option, str(netrc))
    assert ok.returncode == 0, ok.stderr
    assert daemon.stop() == 0


def test_a_lan_address_without_credentials_is_refused_at_config_load(
    tmp_path: Path, bucket: Bucket, signing_key: Key
) -> None:
    settings = base_settings(tmp_path, bucket, signing_key[0])
    settings["substituter"] = {"listen": f"0.0.0.0:{free_port()}"}
    config = write_config(tmp_path / "config.toml", settings)
    done = subprocess.run([sys.executable, "-m", "nixcache.cli", "serve", "--config", str(config)],
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert done.returncode == 1
    assert "substituter" in done.stderr and "not a loopback address" in done.stderr, done.stderr


def test_a_thousand_slow_clients_neither_stop_uploads_nor_other_clients(
    tmp_path: Path, private_server: SeaweedFS, signing_key: Key
) -> None:
    """1,000 connections that never finish their request, and 20 that read a NAR and then stop
    reading: the daemon keeps pushing what the hook hands it (clients' reads have connections
    of their own, at most 32, never the uploads'), answers another client, and its memory stays
    bounded."""
    bucket = new_bucket(private_server.endpoint)
    daemon, port = serving(tmp_path, bucket, signing_key)
    first = nix_build(tmp_path, hook=write_hook_script(tmp_path, daemon.config), size=4 << 20)
    wait_until(lambda: all(bucket.has_narinfo(p) for p in first), 60, "the closure pushed")
    nar_url = next(
        line.split(": ", 1)[1]
        for line in request(port, "GET", "/" + layout.narinfo_key(first[0]))[1].decode().splitlines()
        if line.startswith("URL: ")
    )
    assert daemon.process is not None
    fds = Path(f"/proc/{daemon.process.pid}/fd")
    fds_before = len(list(fds.iterdir()))
    slow: list[socket.socket] = []
    try:
        for _ in range(1000):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.sendall(b"GET /nix-cache-info HTTP/1.1\r\nHost: x\r\n")  # and never the end of it
            slow.append(sock)
        for _ in range(20):
            sock = socket.create_connection(("127.0.0.1", port), timeout=10)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.sendall(f"GET /{nar_url} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            sock.recv(1)
            slow.append(sock)
        more = nix_build(tmp_path, hook=write_hook_script(tmp_path, daemon.config), out="result2")
        wait_until(lambda: all(bucket.has_narinfo(p) for p in more), 60, "uploads go on beside 1,020 slow clients")
        assert request(port, "GET", "/nix-cache-info")[0] == 200, "another client is answered"
        rss_kb = int(
            next(
                ln
                for ln in Path(f"/proc/{daemon.process.pid}/status").read_text().splitlines()
                if ln.startswith("VmRSS")
            ).split()[1]
        )
        assert rss_kb < 300_000, f"daemon RSS {rss_kb} kB with 1,050 slow clients"
    finally:
        for sock in slow:
            sock.close()
    wait_until(lambda: len(list(fds.iterdir())) <= fds_before + 10, 90, "the slow clients' sockets closed")
    assert daemon.alive() and daemon.stop() == 0


def test_a_second_substitution_reads_no_narinfo_from_the_bucket(
    tmp_path: Path, private_server: SeaweedFS, signing_key: Key
) -> None:
    """Two clients (fresh stores, fresh Nix caches) substitute the same closure: the second one's
    narinfos come from the daemon's disk cache; the bucket is asked for nix-cache-info and the
    NARs only."""
    bucket = new_bucket(private_server.endpoint)
    daemon, port = serving(tmp_path, bucket, signing_key)
    closure = nix_build(tmp_path, hook=write_hook_script(tmp_path, daemon.config))
    wait_until(lambda: all(bucket.has_narinfo(p) for p in closure), 60, "the closure pushed")
    url = f"http://127.0.0.1:{port}"

    def substitute(n: int) -> int:
        """GetObject requests the daemon made for one client's substitution."""
        before = status_of(daemon.config)["requests"].get("GetObject", 0)
        env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / f"client-cache-{n}")}
        done = subprocess.run(
            [*NIX, "copy", "--from", url, "--to", str(tmp_path / f"store-{n}"), "--option", "require-sigs", "true",
             "--option", "trusted-public-keys", signing_key[1], closure[-1]],
            capture_output=True, text=True, env=env,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return int(status_of(daemon.config)["requests"].get("GetObject", 0)) - before

    first = substitute(1)
    second = substitute(2)
    nars = len(closure)
    assert first >= nars + len(closure), f"first: {first} GETs (narinfos, NARs, nix-cache-info)"
    assert second == nars + 1, f"second: {second} GETs, expected {nars} NARs + nix-cache-info"
    assert daemon.stop() == 0


def test_with_the_nar_cache_a_second_client_costs_the_bucket_nothing_and_bad_bytes_are_never_kept(
    tmp_path: Path, private_server: SeaweedFS, signing_key: Key
) -> None:
    """`nar_cache_mb`: the first client's NARs are kept (each checked against its narinfo's
    FileHash and FileSize); a second client's substitution then costs one GET (nix-cache-info).
    A NAR whose bytes in the bucket are not those its narinfo names is served (Nix rejects it)
    but never kept. Deleting the cache while the daemon runs costs re-reads, nothing else."""
    bucket = new_bucket(private_server.endpoint)
    daemon, port = serving(tmp_path, bucket, signing_key, nar_cache_mb=64)
    closure = nix_build(tmp_path, hook=write_hook_script(tmp_path, daemon.config))
    wait_until(lambda: all(bucket.has_narinfo(p) for p in closure), 60, "the closure pushed")
    url = f"http://127.0.0.1:{port}"
    nars_dir = tmp_path / "state" / "substituter" / "nars"

    def substitute(n: int, paths: list[str]) -> tuple[subprocess.CompletedProcess[str], int]:
        before = status_of(daemon.config)["requests"].get("GetObject", 0)
        env = {**os.environ, "XDG_CACHE_HOME": str(tmp_path / f"client-cache-{n}")}
        done = subprocess.run(
            [*NIX, "copy", "--from", url, "--to", str(tmp_path / f"store-{n}"), "--option", "require-sigs", "true",
             "--option", "trusted-public-keys", signing_key[1], *paths],
            capture_output=True, text=True, env=env,
        )  # fmt: skip
        return done, int(status_of(daemon.config)["requests"].get("GetObject", 0)) - before

    done, first = substitute(1, [closure[-1]])
    assert done.returncode == 0, done.stderr
    assert first == 2 * len(closure) + 1, f"first client: {first} GETs (narinfos, NARs, nix-cache-info)"
    narinfos = {p: dict(ln.split(": ", 1) for ln in (bucket.get(layout.narinfo_key(p)) or b"").decode().splitlines())
                for p in closure}  # fmt: skip
    urls = {p: n["URL"] for p, n in narinfos.items()}
    kept = {p: nars_dir / n["FileHash"].removeprefix("sha256:") for p, n in narinfos.items()}  # named by their bytes
    # Each is kept once written and fsynced, after the client has it: waited for.
    wanted = sorted(f.name for f in kept.values())
    wait_until(lambda: nars_dir.exists() and sorted(f.name for f in nars_dir.iterdir()) == wanted, 30, "NARs kept")
    for p in closure:  # kept byte for byte
        assert kept[p].read_bytes() == bucket.get(urls[p])

    done, second = substitute(2, [closure[-1]])
    assert done.returncode == 0, done.stderr
    assert second == 1, f"second client: {second} GETs, expected nix-cache-info only"
    assert all((tmp_path / "store-2" / p.lstrip("/")).exists() for p in closure)

    # Bytes that are not what the narinfo names (same length): served, rejected by Nix, not kept.
    victim = closure[0]
    good = bucket.get(urls[victim])
    assert good is not None
    bucket.client.put_object(Bucket=bucket.name, Key=urls[victim], Body=bytes(len(good)))
    shutil.rmtree(nars_dir)
    done, _ = substitute(3, [victim])
    assert done.returncode != 0, "Nix accepted bytes that do not match the signed narinfo"
    # Nothing kept (a copy's temporary file goes once its writing thread is done with it).
    wait_until(lambda: not nars_dir.exists() or not any(nars_dir.iterdir()), 30, "nothing kept of the bad bytes")
    # The cache deleted by hand: read again from the bucket, and kept again.
    bucket.client.put_object(Bucket=bucket.name, Key=urls[victim], Body=good)
    done, third = substitute(4, [victim])
    assert done.returncode == 0, done.stderr
    assert third == 2, f"{third} GETs: nix-cache-info and the NAR (its narinfo is cached)"
    wait_until(kept[victim].exists, 30, "the NAR kept again")
    assert kept[victim].read_bytes() == good
    assert daemon.stop() == 0


def test_the_narinfo_cache_forgets_what_collections_delete(tmp_path: Path, bucket: Bucket, signing_key: Key) -> None:
    """A deletion learnt (another host's record, or this daemon's own collection) evicts the
    narinfo; a record that may have deleted anything empties the cache."""
    from nixcache.config import load_config
    from nixcache.daemon.bucket import Bucket as ServiceBucket
    from nixcache.daemon.service import Service

    settings = base_settings(tmp_path, bucket, signing_key[0])
    settings["substituter"] = {"listen": f"127.0.0.1:{free_port()}"}
    cfg, cfg_file = load_config(write_config(tmp_path / "config.toml", settings))

    async def go() -> None:
        svc = Service(cfg, cfg_file)
        svc.bucket = await ServiceBucket(cfg).open()
        await svc._start_substituter()
        try:
            cache, records = svc._cache, svc.bucket.uploader.records  # type: ignore[union-attr]
            assert cache is not None
            text = b"StorePath: /nix/store/x\n"
            cache.put("a" * 32, text)
            cache.put("b" * 32, text)
            records.learn({"a" * 32})  # this daemon's own collection
            assert cache.get("a" * 32) is None and cache.get("b" * 32) == text
            records._tell((), everything=True)  # an unreadable record
            assert cache.get("b" * 32) is None
        finally:
            await svc._stop_substituter()
            await svc.bucket.close()

    asyncio.run(go())


def test_a_narinfo_whose_nar_is_gone_leaves_the_cache_at_once(
    tmp_path: Path, private_server: SeaweedFS, signing_key: Key
) -> None:
    """Another host's collection deleted a path this daemon has not learnt of yet: the cached
    narinfo is served once more, its NAR is missing, and from then on the narinfo is 404."""
    bucket = new_bucket(private_server.endpoint)
    daemon, port = serving(tmp_path, bucket, signing_key)
    closure = nix_build(tmp_path, hook=write_hook_script(tmp_path, daemon.config))
    wait_until(lambda: all(bucket.has_narinfo(p) for p in closure), 60, "the closure pushed")
    narinfo = "/" + layout.narinfo_key(closure[0])
    status, body = request(port, "GET", narinfo)
    assert status == 200
    nar = next(line.split(": ", 1)[1] for line in body.decode().splitlines() if line.startswith("URL: "))
    for key in (narinfo[1:], nar):  # the collection's ordered deletes: narinfo, then NAR
        bucket.client.delete_object(Bucket=bucket.name, Key=key)
    assert request(port, "GET", narinfo)[0] == 200, "served from the cache: the deletion is not learnt yet"
    assert request(port, "GET", "/" + nar)[0] == 404
    assert request(port, "GET", narinfo)[0] == 404, "the narinfo left the cache with its NAR"
    assert daemon.stop() == 0

"""`nixcache status` over the control socket, and Prometheus metrics (listener and textfile)."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

from nixcache.bucket.seaweed import free_port
from tests.harness import (
    Bucket,
    Daemon,
    base_settings,
    nix_build,
    run_cli,
    wait_until,
    write_config,
    write_hook_script,
)

Key = tuple[Path, str]


def metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in metrics")


def test_status_and_metrics_of_a_running_daemon(tmp_path: Path, bucket: Bucket, signing_key: tuple[Path, str]) -> None:
    port = free_port()
    settings = base_settings(tmp_path, bucket, signing_key[0])
    settings["gc"] = {"grace_period": 0, "collect_interval": 1, "dereference_interval": 1}
    settings["metrics"] = {"listen": f"127.0.0.1:{port}", "textfile": str(tmp_path / "nixcache.prom")}
    config = write_config(tmp_path / "config.toml", settings)

    down = run_cli(config, "status")
    assert down.returncode == 1 and "the daemon is not running" in down.stderr

    daemon = Daemon(config, tmp_path / "daemon.log").start()
    closure = nix_build(tmp_path, hook=write_hook_script(tmp_path, config))
    (tmp_path / "gcroots" / "app").symlink_to(closure[-1])
    wait_until(lambda: bucket.gcinfos("gcroots/testhost/"), 20, "published")
    (tmp_path / "gcroots" / "app").unlink()
    wait_until(lambda: not bucket.has_narinfo(closure[-1]), 30, "collected")
    daemon.wait_event("gc.done", 10, count=3)

    status = json.loads(run_cli(config, "status", "--json").stdout)
    assert status["bucket"] == bucket.name and status["pending"] == 0 and status["failures"] == {}
    assert status["uploaded"] == 3
    assert status["requests"]["PutObject"] >= 6
    assert status["collection"]["summary"]["requests"] and status["dereference"]["next"] > status["dereference"]["last"]
    human = run_cli(config, "status").stdout
    assert "uploads: 3 done" in human and "collection: last" in human

    scraped = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode()
    assert metric(scraped, "nixcache_uploads_total") == 3
    assert metric(scraped, "nixcache_gcinfos_trashed_total") == 1
    assert metric(scraped, "nixcache_gc_deleted_objects_total") >= 7  # 3 narinfos, 3 NARs, 1 gcinfo
    assert metric(scraped, "nixcache_gc_deleted_bytes_total") > 0
    assert metric(scraped, "nixcache_pending_paths") == 0
    assert metric(scraped, 'nixcache_s3_requests_total{operation="PutObject"}') >= 6
    wait_until(lambda: (tmp_path / "nixcache.prom").exists(), 20, "the textfile")
    assert "nixcache_uploads_total" in (tmp_path / "nixcache.prom").read_text()
    assert daemon.stop() == 0


def test_metrics_listener_must_be_loopback(tmp_path: Path) -> None:
    from nixcache.config import parse_config
    from nixcache.errors import ConfigError

    base = {"s3": {"bucket": "abc"}, "signing": {"secret_key_file": "/k"}}
    assert parse_config({**base, "metrics": {"listen": "127.0.0.1:9101"}}).metrics.listen == "127.0.0.1:9101"
    try:
        parse_config({**base, "metrics": {"listen": "0.0.0.0:9101"}})
    except ConfigError as e:
        assert "metrics.listen" in str(e)
    else:
        raise AssertionError("a non-loopback listener was accepted")


# ---- as before the move to prometheus_client (issue 12's review) ------------------------------------------


def sample(text: str, name: str) -> str:
    """The value of sample ``name`` as written in the exposition (not parsed)."""
    for line in text.splitlines():
        if line.startswith(name + " "):
            return line.split()[1]
    raise AssertionError(f"{name} not in the exposition:\n{text}")


def status_of(config: Path) -> dict[str, Any]:
    done = run_cli(config, "status", "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)  # type: ignore[no-any-return]


def control(config: Path, command: str) -> str:
    """One command on the daemon's control socket (beside the FIFO), as `nixcache status` asks."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(config.parent / "run" / "control.sock"))
        sock.sendall(command.encode() + b"\n")
        chunks = []
        while data := sock.recv(65536):
            chunks.append(data)
    return b"".join(chunks).decode()


def with_listener(tmp: Path, bucket: Bucket, key: Key, listen: str | None = None) -> tuple[Path, int]:
    port = free_port()
    settings = base_settings(tmp, bucket, key[0])
    settings["metrics"] = {"listen": listen or f"127.0.0.1:{port}"}
    return write_config(tmp / "config.toml", settings), port


def test_uploaded_counts_the_workers_pushes_not_what_publishing_a_root_uploads(
    tmp_path: Path, bucket: Bucket, signing_key: Key
) -> None:
    """Before prometheus_client the daemon counted uploads in `Service._pushed` (a worker's push that
    succeeded): `status.uploaded`, `nixcache_uploads_total`, `…_nar_bytes_total` and
    `…_compressed_bytes_total` said what the hook's pending paths cost. Now
    `metrics.observe_upload` runs in `Uploader._upload`, for every upload of the process: a GC
    root whose closure was never pushed (built without the hook, a `nix-env -i`, a profile) is
    uploaded by the roots publisher and now counts as well (3 here, 0 before); so do paths
    uploaded by a batch push that failed later (retried in halves, then found present), and the
    rest of a push that a reload to another bucket interrupted."""
    config, port = with_listener(tmp_path, bucket, signing_key)
    closure = nix_build(tmp_path)  # no hook: nothing pending
    (tmp_path / "gcroots" / "app").symlink_to(closure[-1])
    daemon = Daemon(config, tmp_path / "daemon.log").start()
    daemon.wait_event("roots.published", 60)
    assert all(bucket.has_narinfo(p) for p in closure), "setup: the root's closure was published"
    scraped = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    status = status_of(config)
    assert daemon.stop() == 0
    counted = {
        "status.uploaded": status["uploaded"],
        "nixcache_uploads_total": float(sample(scraped, "nixcache_uploads_total")),
        "nixcache_upload_nar_bytes_total": float(sample(scraped, "nixcache_upload_nar_bytes_total")),
    }
    assert counted == {"status.uploaded": 0, "nixcache_uploads_total": 0, "nixcache_upload_nar_bytes_total": 0}, (
        f"no worker pushed anything, yet: {counted}"
    )


def test_the_metrics_listener_closes_a_connection_that_sends_nothing(
    tmp_path: Path, bucket: Bucket, signing_key: Key
) -> None:
    """The listener (asyncio, on the event loop) gives a request 5 s, then closes the
    connection. prometheus_client's own server has no timeout and a thread per connection: any
    local user's idle connections would each hold a thread for good (50: +50 threads)."""
    config, port = with_listener(tmp_path, bucket, signing_key)
    daemon = Daemon(config, tmp_path / "daemon.log").start()
    assert daemon.process is not None
    threads_before = len(os.listdir(f"/proc/{daemon.process.pid}/task"))
    idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(50)]
    try:
        time.sleep(7)
        closed = 0
        for conn in idle:
            conn.settimeout(0.2)
            with contextlib.suppress(TimeoutError):
                closed += conn.recv(1) == b""
        threads_after = len(os.listdir(f"/proc/{daemon.process.pid}/task"))
    finally:
        for conn in idle:
            conn.close()
    assert daemon.stop() == 0
    assert closed == 50, f"{50 - closed} of 50 idle connections still open after 7 s"
    assert threads_after <= threads_before + 2, f"daemon threads {threads_before} -> {threads_after}"


def test_a_taken_metrics_port_is_named_in_the_error(tmp_path: Path, bucket: Bucket, signing_key: Key) -> None:
    """With the port taken, serve exits 1 with "nixcache: error while attempting to bind on
    address ('127.0.0.1', PORT): address already in use" (asyncio's message), not the bare
    "Address already in use" of prometheus_client's server."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config, _ = with_listener(tmp_path, bucket, signing_key, listen=f"127.0.0.1:{port}")
        done = subprocess.run(
            [sys.executable, "-m", "nixcache.cli", "serve", "--config", str(config)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip
    assert done.returncode == 1
    assert str(port) in done.stderr, f"the error does not say which address: {done.stderr.strip()!r}"


SITE = '''
import socket
_real = socket.getaddrinfo
def getaddrinfo(host, port, family=0, type=0, proto=0, flags=0):
    """`localhost` as on NixOS and most distributions: ::1 and 127.0.0.1 (/etc/hosts)."""
    if host == "localhost":
        return [*_real("::1", port, socket.AF_INET6, type, proto, flags),
                *_real("127.0.0.1", port, socket.AF_INET, type, proto, flags)]
    return _real(host, port, family, type, proto, flags)
socket.getaddrinfo = getaddrinfo
'''


def test_listen_on_localhost_serves_every_loopback_address(tmp_path: Path, bucket: Bucket, signing_key: Key) -> None:
    """`listen = "localhost:PORT"` is accepted by the config. Where localhost is both ::1 and
    127.0.0.1 (NixOS's /etc/hosts), `asyncio.start_server("localhost", PORT)` listened
    on both; prometheus_client's server binds the first address getaddrinfo returns only, so a
    scrape of 127.0.0.1:PORT (or of [::1]:PORT, by the resolver's order) is refused."""
    port = free_port()
    config, _ = with_listener(tmp_path, bucket, signing_key, listen=f"localhost:{port}")
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITE)
    daemon = Daemon(config, tmp_path / "daemon.log").start(env={"PYTHONPATH": str(site)})
    reachable = {}
    for family, host in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET6, "::1")):
        with socket.socket(family) as sock:
            sock.settimeout(5)
            reachable[host] = sock.connect_ex((host, port)) == 0
    assert daemon.stop() == 0
    assert all(reachable.values()), f"listening on: {reachable}"


PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
    "text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)


def test_the_listener_answers_the_text_format_whatever_is_accepted(
    tmp_path: Path, bucket: Bucket, signing_key: Key
) -> None:
    """Before prometheus_client, the listener answered the text format 0.0.4 whatever the
    client asked; prometheus_client's own server answers Prometheus's Accept header with
    OpenMetrics (TYPE lines without `_total`, `# EOF`). It still answers 0.0.4 (the listener is
    ours: see daemon/control.py). Values are now written as prometheus_client writes them
    (`0.0`: the exposition format's floats, which Prometheus reads either way)."""
    config, port = with_listener(tmp_path, bucket, signing_key)
    daemon = Daemon(config, tmp_path / "daemon.log").start()
    text = control(config, "metrics")
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers={"Accept": PROMETHEUS_ACCEPT})
    with urllib.request.urlopen(request, timeout=10) as reply:
        content_type = reply.headers["Content-Type"]
        scraped = reply.read().decode()
    assert daemon.stop() == 0
    assert float(sample(text, "nixcache_uploads_total")) == 0 and float(sample(text, "nixcache_pending_paths")) == 0
    assert content_type.startswith("text/plain; version=0.0.4"), content_type
    assert "# TYPE nixcache_uploads_total counter" in scraped and "# EOF" not in scraped

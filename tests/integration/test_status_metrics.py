"""`nixcache status` over the control socket, and Prometheus metrics (listener and textfile)."""

from __future__ import annotations

import json
import urllib.request
from pathlib import Path

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

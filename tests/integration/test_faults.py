"""Fault injection: 500s, 503 SlowDown, connection resets and stalls between nixcache and
SeaweedFS, and the daemon killed at random points of upload, publish and collect. After each
scenario the bucket is checked with `nixcache verify`: nothing lost, nothing live deleted, no
dangling narinfo."""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path

import pytest

from nixcache.bucket.layout import gcinfo_name
from nixcache.bucket.seaweed import free_port
from tests.faultproxy import FaultProxy, Faults
from tests.harness import (
    Bucket,
    Daemon,
    add_blob,
    base_settings,
    closure_of,
    dangling_narinfos,
    nix_build,
    run_cli,
    wait_until,
    write_config,
    write_hook_script,
)


def verify_clean(config: Path) -> None:
    r = run_cli(config, "verify")
    assert r.returncode == 0, r.stdout + r.stderr


@pytest.fixture
def proxy(bucket: Bucket) -> FaultProxy:
    p = FaultProxy(free_port(), int(bucket.endpoint.rsplit(":", 1)[1]), Faults()).start()
    yield p  # type: ignore[misc]
    p.stop()


def configs(tmp: Path, bucket: Bucket, key: Path, proxy: FaultProxy) -> tuple[Path, Path]:
    """(through the faulty proxy, direct) configs of the same host."""
    settings = base_settings(tmp, bucket, key, retry_interval=1, part_size_mb=5)
    settings["s3"]["max_attempts"] = 8
    settings["gc"] = {"grace_period": 0, "collect_interval": 2, "dereference_interval": 2}
    direct = write_config(tmp / "direct.toml", settings)
    settings["s3"]["endpoint"] = proxy.endpoint
    return write_config(tmp / "config.toml", settings), direct


def test_uploads_publish_and_collect_survive_a_faulty_network(
    tmp_path: Path, bucket: Bucket, signing_key: tuple[Path, str], proxy: FaultProxy
) -> None:
    config, direct = configs(tmp_path, bucket, signing_key[0], proxy)
    daemon = Daemon(config, tmp_path / "daemon.log").start()
    hook = write_hook_script(tmp_path, config)
    built = [nix_build(tmp_path, hook=hook, out=f"r{n}") for n in range(4)]
    big = add_blob(tmp_path, 40 << 20)
    (tmp_path / "gcroots" / "big").symlink_to(big)
    for n, closure in enumerate(built):
        (tmp_path / "gcroots" / f"r{n}").symlink_to(closure[-1])
    everything = {p for c in built for p in c} | {big}
    wait_until(lambda: all(bucket.has_narinfo(p) for p in everything), 120, "every path despite the faults")
    wait_until(lambda: len(bucket.gcinfos("gcroots/testhost/")) == 5, 60, "every root published")
    # Drop two roots: dereference and collection run through the faults too.
    for n in (0, 1):
        (tmp_path / "gcroots" / f"r{n}").unlink()
    wait_until(lambda: not bucket.has_narinfo(built[0][-1]) and not bucket.has_narinfo(built[1][-1]), 120,
               "the dropped roots collected")  # fmt: skip
    assert sum(proxy.faults.injected.values()) >= 10, proxy.faults.injected
    assert daemon.stop() == 0
    assert all(bucket.has_narinfo(p) for c in built[2:] for p in c) and bucket.has_narinfo(big)
    assert dangling_narinfos(bucket) == []
    verify_clean(direct)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_daemon_killed_at_random_points_loses_nothing_and_deletes_nothing_live(
    tmp_path: Path, bucket: Bucket, signing_key: tuple[Path, str], proxy: FaultProxy, seed: int
) -> None:
    rng = random.Random(seed)
    proxy.faults.seed = seed
    config, direct = configs(tmp_path, bucket, signing_key[0], proxy)
    daemon = Daemon(config, tmp_path / "daemon.log")
    hook = write_hook_script(tmp_path, config)
    live: list[str] = []
    for n in range(3):
        daemon.start(wait_ready=False)
        closure = nix_build(tmp_path, hook=hook, out=f"r{n}")
        (tmp_path / "gcroots" / f"r{n}").symlink_to(closure[-1])
        live += closure
        if n == 2:  # drop the first root: the collector has work when we kill it
            (tmp_path / "gcroots" / "r0").unlink()
            live = [p for p in live if p not in closure_of(str(tmp_path / "r0"))]
        time.sleep(rng.uniform(0.2, 2.5))  # somewhere in upload, publish, dereference or collect
        daemon.signal(signal.SIGKILL)
        daemon.process.wait()  # type: ignore[union-attr]
        assert dangling_narinfos(bucket) == [], f"after kill {n}"
    proxy.enabled = False
    daemon.start()
    wait_until(lambda: all(bucket.has_narinfo(p) for p in live), 60, "every live path after the restarts")
    wait_until(lambda: {k.rsplit("/", 1)[1] for k in bucket.gcinfos("gcroots/testhost/")}
               == {gcinfo_name(str(Path(f"{tmp_path}/r{n}").resolve())) for n in (1, 2)}, 60, "roots")  # fmt: skip
    assert daemon.stop() == 0
    assert dangling_narinfos(bucket) == []
    verify_clean(direct)
    assert not list((tmp_path / "state" / "pending").iterdir()), "nothing left pending"

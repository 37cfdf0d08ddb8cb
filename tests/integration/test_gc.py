"""Garbage collection across hosts — real Nix, real SeaweedFS, the CLI as users run it."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from nixcache.bucket.layout import GC_LEASE, gcinfo_name
from nixcache.bucket.seaweed import free_port
from tests.harness import (
    Bucket,
    base_settings,
    build_pair,
    closure_of,
    dangling_narinfos,
    hash_part,
    nix_copy_from,
    run_cli,
    wait_until,
    write_config,
)

PROXY = Path(__file__).resolve().parents[2] / "bench" / "latency_proxy.py"


class Host:
    """One host's config and gcroots dir; commands run through the real CLI."""

    def __init__(self, tmp: Path, bucket: Bucket, key: Path, name: str, **gc: Any) -> None:
        self.dir = tmp / name
        self.dir.mkdir()
        settings = base_settings(self.dir, bucket, key)
        settings["hostname"] = name
        settings["gc"] = {"grace_period": 0, **gc}
        self.settings = settings
        self.config = write_config(self.dir / "config.toml", settings)

    def root(self, name: str, path: str) -> None:
        (self.dir / "gcroots" / name).symlink_to(path)

    def unroot(self, name: str) -> None:
        (self.dir / "gcroots" / name).unlink()

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        r = run_cli(self.config, *args)
        assert r.returncode == 0, r.stdout + r.stderr
        return r

    def variant(self, endpoint: str | None = None, **gc: Any) -> Path:
        """A copy of this host's config with another endpoint and/or [gc] settings."""
        settings = json.loads(json.dumps(self.settings))
        settings["s3"]["endpoint"] = endpoint or settings["s3"]["endpoint"]
        settings["gc"].update(gc)
        return write_config(self.dir / f"variant-{uuid.uuid4().hex[:6]}.toml", settings)


def slow_link(bucket: Bucket, delay_ms: int) -> tuple[int, subprocess.Popen[bytes]]:
    """A loopback proxy to the bucket's server adding ``delay_ms`` to every request."""
    port = free_port()
    proxy = subprocess.Popen([sys.executable, str(PROXY), str(port), bucket.endpoint.rsplit(":", 1)[1], str(delay_ms)])
    time.sleep(0.5)
    return port, proxy


def narinfos(bucket: Bucket) -> set[str]:
    return {k.removesuffix(".narinfo") for k in bucket.keys() if k.endswith(".narinfo")}


def two_hosts(tmp: Path, bucket: Bucket, key: tuple[Path, str], **gc: Any) -> tuple[Host, Host, str, str, str]:
    one, two, shared = build_pair(tmp)
    alpha, beta = Host(tmp, bucket, key[0], "alpha", **gc), Host(tmp, bucket, key[0], "beta", **gc)
    alpha.root("one", one)
    beta.root("two", two)
    alpha.run("publish")
    beta.run("publish")
    return alpha, beta, one, two, shared


def beta_drops_two(tmp: Path, bucket: Bucket, key: tuple[Path, str], **gc: Any) -> tuple[Host, Host, str, str, str]:
    """Both hosts publish their root, then beta drops its one and dereferences it."""
    alpha, beta, one, two, shared = two_hosts(tmp, bucket, key, **gc)
    beta.unroot("two")
    beta.run("dereference")
    return alpha, beta, one, two, shared


def test_only_paths_no_live_root_uses_are_deleted_and_the_rest_substitutes(
    tmp_path: Path, bucket: Bucket, signing_key: tuple[Path, str]
) -> None:
    alpha, _beta, one, two, shared = beta_drops_two(tmp_path, bucket, signing_key)
    before = set(bucket.keys())
    out = alpha.run("gc").stdout
    only_two = {hash_part(p) for p in closure_of(two)} - {hash_part(p) for p in closure_of(one)}
    assert len(only_two) == 2 and hash_part(shared) not in only_two
    assert narinfos(bucket) == {hash_part(p) for p in closure_of(one)}
    deleted = before - set(bucket.keys())
    assert {k for k in deleted if k.endswith(".narinfo")} == {h + ".narinfo" for h in only_two}
    assert sum(k.startswith("nar/") for k in deleted) == 2, "their NARs went too"
    assert bucket.keys("gctrash/") == [], "the processed trash is emptied"
    assert dangling_narinfos(bucket) == []
    assert "2 dead paths" in out
    copied = nix_copy_from(bucket, [one], tmp_path / "client", signing_key[1])
    assert copied.returncode == 0, copied.stderr
    # Nothing in the trash now: the next collection is one LIST.
    again = alpha.run("gc").stdout
    assert "'ListObjectsV2': 1}" in again, again


def test_a_nar_shared_with_a_live_path_survives(tmp_path: Path, bucket: Bucket, signing_key: tuple[Path, str]) -> None:
    content = f"same bytes {uuid.uuid4()}\n"
    files = []
    for name in ("copy-a", "copy-b"):
        (tmp_path / name).write_text(content)
        files.append(str(tmp_path / name))
    a, b = subprocess.run(["nix-store", "--add", *files], check=True, capture_output=True, text=True).stdout.split()
    alpha, beta = Host(tmp_path, bucket, signing_key[0], "alpha"), Host(tmp_path, bucket, signing_key[0], "beta")
    alpha.root("a", a)
    beta.root("b", b)
    alpha.run("publish")
    beta.run("publish")
    nars = bucket.keys("nar/")
    assert len(nars) == 1, "identical contents: one NAR for both paths"
    beta.unroot("b")
    beta.run("dereference")
    out = alpha.run("gc").stdout
    assert not bucket.has_narinfo(b) and bucket.has_narinfo(a)
    assert bucket.keys("nar/") == nars
    assert "1 NARs kept as shared" in out
    copied = nix_copy_from(bucket, [a], tmp_path / "client", signing_key[1])
    assert copied.returncode == 0, copied.stderr


def test_grace_period_protects_recent_uploads(tmp_path: Path, bucket: Bucket, signing_key: tuple[Path, str]) -> None:
    alpha, _beta, one, two, _ = beta_drops_two(tmp_path, bucket, signing_key, grace_period="1d")
    before = set(bucket.keys())
    out = alpha.run("gc").stdout
    assert "2 kept as younger than the grace period" in out
    assert before <= set(bucket.keys()), "nothing deleted, the trash gcinfo kept for later"
    # The same collection once the grace period is over (here: set to 0) deletes them.
    assert run_cli(alpha.variant(grace_period=0), "gc").returncode == 0
    assert not bucket.has_narinfo(two) and bucket.has_narinfo(one)


def test_lease_one_collector_at_a_time_and_stale_leases_expire(
    tmp_path: Path, bucket: Bucket, signing_key: tuple[Path, str]
) -> None:
    alpha, beta, one, two, _ = beta_drops_two(tmp_path, bucket, signing_key)

    # Two collectors at once: alpha's goes through a slow link (200 ms per request), so it
    # still holds the lease when beta's starts.
    port, proxy = slow_link(bucket, 200)
    try:
        slow = subprocess.Popen(
            [sys.executable, "-m", "nixcache.cli", "gc", "--config", str(alpha.variant(f"http://127.0.0.1:{port}"))],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        wait_until(lambda: bucket.get(GC_LEASE), 20, "alpha's lease")
        other = beta.run("gc").stdout
        assert other.startswith("skipped: lease held by alpha:"), other
        out, err = slow.communicate(timeout=120)
        assert slow.returncode == 0, err
        assert "deleted" in out and not bucket.has_narinfo(two)
    finally:
        proxy.terminate()
    assert bucket.get(GC_LEASE) is None, "released"

    # A lease left by a host that died: alive → skip; expired → taken over.
    alpha.unroot("one")
    alpha.run("dereference")
    lease = {"holder": "crashed-host:123", "expires": time.time() + 3600}
    bucket.client.put_object(Bucket=bucket.name, Key=GC_LEASE, Body=json.dumps(lease).encode())
    assert beta.run("gc").stdout.startswith("skipped: lease held by crashed-host:123")
    assert bucket.has_narinfo(one)
    lease["expires"] = time.time() - 1
    bucket.client.put_object(Bucket=bucket.name, Key=GC_LEASE, Body=json.dumps(lease).encode())
    done = beta.run("gc")
    assert "lease_taken_over" in done.stderr and not bucket.has_narinfo(one)


def test_kill9_while_deleting_then_the_next_run_completes(
    tmp_path: Path, bucket: Bucket, signing_key: tuple[Path, str]
) -> None:
    alpha, _beta, one, two, _ = beta_drops_two(tmp_path, bucket, signing_key)
    port, proxy = slow_link(bucket, 300)
    log = tmp_path / "gc.log"
    try:
        with log.open("w") as err:
            gc = subprocess.Popen(
                [sys.executable, "-m", "nixcache.cli", "gc", "--config",
                 str(alpha.variant(f"http://127.0.0.1:{port}"))],
                stdout=subprocess.DEVNULL, stderr=err,
            )  # fmt: skip
            wait_until(lambda: '"phase": "narinfos"' in log.read_text(), 60, "the narinfos deleted")
            gc.send_signal(signal.SIGKILL)
            gc.wait()
    finally:
        proxy.terminate()
    assert not bucket.has_narinfo(two), "killed after the narinfo phase"
    assert bucket.keys("gctrash/"), "…and before the trash was emptied"
    assert dangling_narinfos(bucket) == []
    nars_before = len(bucket.keys("nar/"))
    bucket.client.delete_object(Bucket=bucket.name, Key=GC_LEASE)  # its lease would expire by itself later
    alpha.run("gc")
    assert len(bucket.keys("nar/")) == nars_before - 2, "the next run deletes the NARs left behind"
    assert bucket.keys("gctrash/") == []
    assert dangling_narinfos(bucket) == []
    assert narinfos(bucket) == {hash_part(p) for p in closure_of(one)}


@pytest.mark.parametrize(
    ("where", "data"),
    [
        ("gcroots/gamma/junk-00000000000000000000000000000000.gcinfo.gz", b"\x1f\x8b truncated"),
        ("gctrash/beta/junk-00000000000000000000000000000000.gcinfo.gz", b"not gzip at all"),
        ("gctrash/flat-00000000000000000000000000000000.gcinfo.gz", None),
    ],
)
def test_a_corrupt_gcinfo_anywhere_stops_the_collection(
    tmp_path: Path, bucket: Bucket, signing_key: tuple[Path, str], where: str, data: bytes | None
) -> None:
    import gzip

    alpha, beta, _one, _two, _ = two_hosts(tmp_path, bucket, signing_key)
    beta.unroot("two")
    beta.run("dereference")
    body = data if data is not None else gzip.compress(b"00000000000000000000000000000000.narinfo\ngarbage line\n")
    bucket.client.put_object(Bucket=bucket.name, Key=where, Body=body)
    before = set(bucket.keys())
    r = run_cli(alpha.config, "gc")
    assert r.returncode == 1
    errors = [line for line in r.stderr.splitlines() if line.startswith("nixcache:")]
    assert len(errors) == 1 and where in errors[0], r.stderr  # one clear line (beside progress lines)
    assert before <= set(bucket.keys()), "nothing deleted"


def test_dry_run_prints_what_would_go_with_bytes_and_deletes_nothing(
    tmp_path: Path, bucket: Bucket, signing_key: tuple[Path, str]
) -> None:
    alpha, beta, _one, two, _ = two_hosts(tmp_path, bucket, signing_key)
    beta.unroot("two")
    beta.run("dereference")
    before = set(bucket.keys())
    out = alpha.run("gc", "--dry-run").stdout
    assert set(bucket.keys()) == before
    would = [ln.split()[2] for ln in out.splitlines() if ln.startswith("would delete ") and " objects, " not in ln]
    assert (
        len([k for k in would if k.endswith(".narinfo")]) == 2 and len([k for k in would if k.startswith("nar/")]) == 2
    )
    assert f"gctrash/beta/{gcinfo_name(two)}" in would
    sizes = {o["Key"]: o["Size"] for o in bucket.client.list_objects_v2(Bucket=bucket.name)["Contents"]}
    expected = sum(sizes[k] for k in would if not k.startswith("gctrash/"))
    assert f"({expected} bytes)" in out, out


def test_residual_deletes_only_what_no_live_root_accounts_for(
    tmp_path: Path, bucket: Bucket, signing_key: tuple[Path, str]
) -> None:
    alpha, _, one, two, _ = two_hosts(tmp_path, bucket, signing_key)
    (tmp_path / "stray").write_text(f"pushed, never rooted {uuid.uuid4()}\n")
    stray = subprocess.run(["nix-store", "--add", str(tmp_path / "stray")], check=True, capture_output=True,
                           text=True).stdout.strip()  # fmt: skip
    alpha.run("push", stray)
    bad = run_cli(alpha.config, "residual", "--older-than", "soon")
    assert bad.returncode == 2 and "not a duration" in bad.stderr
    assert alpha.run("residual", "--older-than", "1h", "--dry-run").stdout.startswith("would delete 0 objects")
    dry = alpha.run("residual", "--older-than", "0s", "--dry-run").stdout
    assert f"would delete {hash_part(stray)}.narinfo (residual)" in dry and bucket.has_narinfo(stray)
    alpha.run("residual", "--older-than", "0s")
    assert not bucket.has_narinfo(stray)
    assert all(bucket.has_narinfo(p) for p in [*closure_of(one), *closure_of(two)])
    assert dangling_narinfos(bucket) == []
    assert len(bucket.keys("nar/")) == len(set(closure_of(one)) | set(closure_of(two)))


def test_the_daemon_collects_on_its_schedule(tmp_path: Path, bucket: Bucket, signing_key: tuple[Path, str]) -> None:
    from tests.harness import Daemon

    alpha, _beta, one, two, _ = beta_drops_two(
        tmp_path, bucket, signing_key, collect_interval=1, dereference_interval=1
    )
    daemon = Daemon(alpha.config, tmp_path / "daemon.log").start()
    done = daemon.wait_event("gc.done", 20)
    assert not bucket.has_narinfo(two) and bucket.has_narinfo(one)
    assert done[0]["deleted"] > 0 and done[0]["dead_paths"] == 2
    idle = daemon.wait_event("gc.done", 20, count=2)[1]
    assert idle["requests"] == {"ListObjectsV2": 1}, "an empty trash costs one LIST"
    # An idle dereference cycle: one LIST of its folder, one of the deletion records (its
    # first cycles learn the collection's record: a GET, once).
    cycles = daemon.wait_event("dereference.done", 20, count=5)
    assert cycles[-1]["requests"] == {"ListObjectsV2": 2}, cycles[-1]
    assert daemon.stop() == 0


def test_du_exclusive_bytes_are_what_a_collection_then_frees(
    tmp_path: Path, bucket: Bucket, signing_key: tuple[Path, str]
) -> None:
    alpha, beta, one, two, _ = two_hosts(tmp_path, bucket, signing_key)
    report = json.loads(alpha.run("du", "--json").stdout)
    roots = {r["key"]: r for r in report["roots"]}
    key_two = f"gcroots/beta/{gcinfo_name(two)}"
    assert set(roots) == {f"gcroots/alpha/{gcinfo_name(one)}", key_two}
    assert roots[key_two]["paths"] == 3 and 0 < roots[key_two]["exclusive"] < roots[key_two]["bytes"]
    assert report["trash"] == 0 and report["residual"] == 0
    assert report["total"] == sum(o["Size"] for o in bucket.client.list_objects_v2(Bucket=bucket.name)["Contents"]
                                  if not o["Key"].startswith(("gcroots/", "nix-cache-info")))  # fmt: skip
    assert set(json.loads(alpha.run("du", "--json", "--host", "beta").stdout)["hosts"]) == {"beta"}
    human = alpha.run("du").stdout
    assert "host alpha (1 roots)" in human and "in the trash" in human

    beta.unroot("two")
    beta.run("dereference")
    assert json.loads(alpha.run("du", "--json").stdout)["trash"] == roots[key_two]["exclusive"]
    out = alpha.run("gc").stdout
    assert f"({roots[key_two]['exclusive']} bytes)" in out, out

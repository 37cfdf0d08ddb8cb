"""Upload pipeline against real Nix and real S3 servers (SeaweedFS and moto)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from nixcache.formats.narinfo import NarInfo
from nixcache.formats.signing import PublicKey
from tests.harness import (
    HOOK,
    Bucket,
    Daemon,
    add_blob,
    base_settings,
    dangling_narinfos,
    generate_key,
    hash_part,
    nix_build,
    nix_copy_from,
    wait_until,
    write_config,
    write_hook_script,
)


def start_daemon(tmp: Path, bucket: Bucket, key: tuple[Path, str], **upload: object) -> Daemon:
    config = write_config(tmp / "config.toml", base_settings(tmp, bucket, key[0], **upload))
    return Daemon(config, tmp / "daemon.log").start()


def send_and_wait_for_multipart(daemon: Daemon, bucket: Bucket, path: str) -> None:
    """Hand ``path`` to the daemon and return once its NAR's multipart upload is under way."""
    with open(daemon.config.parent / "run" / "hook.fifo", "w") as fifo:
        fifo.write(path + "\n")
    wait_until(
        lambda: bucket.client.list_multipart_uploads(Bucket=bucket.name).get("Uploads"),
        30, "a multipart upload in progress", interval=0.02,
    )  # fmt: skip


def assert_uploaded(bucket: Bucket, paths: list[str], public_key: str) -> None:
    """Every path has a narinfo signed by our key whose NAR exists with the right size."""
    key = PublicKey.parse(public_key)
    for path in paths:
        text = bucket.get(hash_part(path) + ".narinfo")
        assert text is not None, f"no narinfo for {path}"
        info = NarInfo.parse(text.decode())
        assert info.store_path == path
        assert key.verify(info.fingerprint(), info.sigs)
        head = bucket.client.head_object(Bucket=bucket.name, Key=info.url)
        assert head["ContentLength"] == info.file_size


def test_build_hook_uploads_closure_and_nix_substitutes_it(
    tmp_path: Path, any_bucket: Bucket, signing_key: tuple[Path, str]
) -> None:
    daemon = start_daemon(tmp_path, any_bucket, signing_key)
    hook = write_hook_script(tmp_path, daemon.config)
    closure = nix_build(tmp_path, hook=hook)
    assert len(closure) == 3
    wait_until(lambda: all(any_bucket.has_narinfo(p) for p in closure), 20, "closure in bucket")
    assert_uploaded(any_bucket, closure, signing_key[1])
    assert any_bucket.get("nix-cache-info") is not None

    # A second, empty store substitutes the closure over HTTP with signatures required.
    dest = tmp_path / "client-store"
    ok = nix_copy_from(any_bucket, [closure[-1]], dest, signing_key[1])
    assert ok.returncode == 0, ok.stderr
    for path in closure:
        assert (dest / path.lstrip("/")).exists()
    top = next(p for p in closure if p.endswith("-app"))
    assert (dest / top.lstrip("/") / "share/name").read_text() == Path(top, "share/name").read_text()

    # ...and refuses when only another key is trusted.
    _, other_public = generate_key(tmp_path, "someone-else-1")
    refused = nix_copy_from(any_bucket, [closure[-1]], tmp_path / "store-other-key", other_public)
    assert refused.returncode != 0
    assert "signature" in refused.stderr
    assert daemon.stop() == 0


def test_daemon_down_hook_spools_and_upload_follows(
    tmp_path: Path, bucket: Bucket, signing_key: tuple[Path, str]
) -> None:
    config = write_config(tmp_path / "config.toml", base_settings(tmp_path, bucket, signing_key[0]))
    hook = write_hook_script(tmp_path, config)
    closure = nix_build(tmp_path, hook=hook)  # no daemon: the build still succeeds
    spooled = list((tmp_path / "state" / "spool").iterdir())
    assert spooled, "the hook should have spooled the paths"

    # The hook itself returns fast with the daemon down (FIFO present, nobody reading).
    (tmp_path / "run").mkdir(exist_ok=True)
    os.mkfifo(tmp_path / "run" / "hook.fifo")
    env = {**os.environ, "NIXCACHE_CONFIG": str(config), "OUT_PATHS": closure[0], "DRV_PATH": ""}
    started = time.monotonic()
    rc = subprocess.run([str(HOOK)], env=env, timeout=5).returncode
    assert rc == 0 and time.monotonic() - started < 1.0

    daemon = Daemon(config, tmp_path / "daemon.log").start()
    wait_until(lambda: all(bucket.has_narinfo(p) for p in closure), 20, "spooled closure uploaded")
    assert not list((tmp_path / "state" / "spool").iterdir())
    wait_until(lambda: not list((tmp_path / "state" / "pending").iterdir()), 10, "journal empty")
    assert daemon.stop() == 0


def test_kill9_during_large_upload_loses_nothing_and_never_dangles(
    tmp_path: Path, bucket: Bucket, signing_key: tuple[Path, str]
) -> None:
    blob = add_blob(tmp_path, 200 << 20)
    daemon = start_daemon(tmp_path, bucket, signing_key, part_size_mb=5, compression_level=1)
    violations: list[list[str]] = []
    stop = threading.Event()

    def watch() -> None:  # the invariant, checked continuously while all this happens
        while not stop.is_set():
            bad = dangling_narinfos(bucket)
            if bad:
                violations.append(bad)
            time.sleep(0.05)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        send_and_wait_for_multipart(daemon, bucket, blob)
        daemon.kill9()
        assert not bucket.has_narinfo(blob), "killed too late: the upload had already finished"
        assert (tmp_path / "state" / "pending" / Path(blob).name).exists()

        daemon.start()
        wait_until(lambda: bucket.has_narinfo(blob), 60, "upload after restart")
    finally:
        stop.set()
        watcher.join()
    assert violations == []
    assert_uploaded(bucket, [blob], signing_key[1])
    assert daemon.stop() == 0


def test_endpoint_down_then_up_pending_uploads_complete(tmp_path: Path, signing_key: tuple[Path, str]) -> None:
    from nixcache.bucket.seaweed import SeaweedFS
    from tests.harness import new_bucket

    server = SeaweedFS(tmp_path / "weed")
    server.start()
    try:
        bucket = new_bucket(server.endpoint)
        daemon = start_daemon(tmp_path, bucket, signing_key)
        server.stop()
        closure = nix_build(tmp_path, hook=write_hook_script(tmp_path, daemon.config))
        daemon.wait_event("push.failed", 60)
        server.start()
        wait_until(lambda: all(bucket.has_narinfo(p) for p in closure), 90, "upload after endpoint is back")
        assert daemon.stop() == 0
    finally:
        server.stop()


def test_garbage_on_fifo_is_logged_and_skipped(tmp_path: Path, bucket: Bucket, signing_key: tuple[Path, str]) -> None:
    daemon = start_daemon(tmp_path, bucket, signing_key)
    fifo = tmp_path / "run" / "hook.fifo"
    closure = nix_build(tmp_path)
    not_valid = "/nix/store/" + "0" * 32 + "-never-built"
    fd = os.open(fifo, os.O_WRONLY)
    binary = bytes(b for b in range(256) if b != 10)
    for junk in (b"hello world\n", binary + b"\n", b"/x" * (1 << 19) + b"\n", not_valid.encode() + b"\n"):
        os.write(fd, junk)
        time.sleep(0.1)
    os.write(fd, closure[-1].encode() + b"\n")
    os.close(fd)
    wait_until(lambda: all(bucket.has_narinfo(p) for p in closure), 20, "good path uploaded after junk")
    assert daemon.alive()
    rejected = daemon.events("fifo.rejected")
    assert sum(e["lines"] for e in rejected) == 3, rejected
    skipped = daemon.events("path.skipped")
    assert [e["path"] for e in skipped] == [not_valid]
    assert "not valid" in skipped[0]["error"]
    wait_until(lambda: not list((tmp_path / "state" / "pending").iterdir()), 10, "journal empty")
    assert daemon.stop() == 0


def test_sighup_applies_new_config_and_keeps_old_one_when_broken(
    tmp_path: Path, bucket: Bucket, signing_key: tuple[Path, str]
) -> None:
    daemon = start_daemon(tmp_path, bucket, signing_key)
    fifo = tmp_path / "run" / "hook.fifo"

    def push_and_compression(out: str) -> str:
        closure = nix_build(tmp_path, out=out)
        with open(fifo, "w") as f:
            f.write(closure[-1] + "\n")
        wait_until(lambda: all(bucket.has_narinfo(p) for p in closure), 20, "upload")
        text = bucket.get(hash_part(closure[-1]) + ".narinfo")
        assert text is not None
        return NarInfo.parse(text.decode()).compression

    assert push_and_compression("r1") == "zstd"
    settings = base_settings(tmp_path, bucket, signing_key[0], compression="xz", workers=2)
    write_config(daemon.config, settings)
    daemon.signal(signal.SIGHUP)
    assert daemon.wait_event("config.reloaded", 10)[0]["compression"] == "xz"
    assert push_and_compression("r2") == "xz"

    daemon.config.write_text("this is [not toml\n")
    daemon.signal(signal.SIGHUP)
    daemon.wait_event("config.rejected", 10)
    assert daemon.alive()
    assert push_and_compression("r3") == "xz"
    assert daemon.stop() == 0


def test_sigterm_mid_upload_exits_0_and_leaves_the_path_pending(
    tmp_path: Path, bucket: Bucket, signing_key: tuple[Path, str]
) -> None:
    blob = add_blob(tmp_path, 150 << 20)
    daemon = start_daemon(tmp_path, bucket, signing_key, part_size_mb=5, drain_timeout=0)
    send_and_wait_for_multipart(daemon, bucket, blob)
    assert daemon.stop() == 0
    assert not bucket.has_narinfo(blob)
    assert (tmp_path / "state" / "pending" / Path(blob).name).exists()
    # The interrupted multipart upload was aborted, not left to be billed as storage.
    assert not bucket.client.list_multipart_uploads(Bucket=bucket.name).get("Uploads")
    daemon.start()
    wait_until(lambda: bucket.has_narinfo(blob), 60, "upload after restart")
    assert_uploaded(bucket, [blob], signing_key[1])
    assert daemon.stop() == 0


def test_large_path_is_pushed_in_bounded_memory(tmp_path: Path, bucket: Bucket, signing_key: tuple[Path, str]) -> None:
    blob = add_blob(tmp_path, 600 << 20)
    config = write_config(tmp_path / "config.toml", base_settings(tmp_path, bucket, signing_key[0], part_size_mb=8))
    proc = subprocess.Popen(
        [sys.executable, "-m", "nixcache.cli", "push", "--config", str(config), blob],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.stdout is not None
    # The push's own peak (VmHWM, sampled while it runs), not ru_maxrss: that also counts the
    # largest child it waited for (the `nix` commands it runs).
    own_peak_kb = 0
    sampler_done = threading.Event()

    def sample() -> None:
        nonlocal own_peak_kb
        while not sampler_done.wait(0.05):
            try:
                status_text = Path(f"/proc/{proc.pid}/status").read_text()
            except OSError:
                return
            for line in status_text.splitlines():
                if line.startswith("VmHWM:"):
                    own_peak_kb = max(own_peak_kb, int(line.split()[1]))

    sampler = threading.Thread(target=sample)
    sampler.start()
    summary = proc.stdout.read().decode()
    sampler_done.set()
    sampler.join()
    _, status, usage = os.wait4(proc.pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, summary
    peak_mb = own_peak_kb / 1024
    # Bounded: one 8 MiB part held, glibc's arenas capped (nixcache/memory.py): ~97 MB alone.
    assert 0 < peak_mb < 128, (
        f"push of a 600 MB path peaked at {peak_mb:.0f} MB RSS (with children: {usage.ru_maxrss >> 10} MB)"
    )
    assert "1 uploaded" in summary and "UploadPart" in summary
    assert_uploaded(bucket, [blob], signing_key[1])


def test_wrong_credentials_are_reported_and_a_reload_with_good_ones_uploads(
    tmp_path: Path, bucket: Bucket, signing_key: tuple[Path, str]
) -> None:
    settings = base_settings(tmp_path, bucket, signing_key[0])
    wrong = tmp_path / "wrong-credentials"
    wrong.write_text("[default]\naws_access_key_id = nobody\naws_secret_access_key = nothing\n")
    good = settings["s3"]["credentials_file"]
    settings["s3"]["credentials_file"] = str(wrong)
    config = write_config(tmp_path / "config.toml", settings)
    daemon = Daemon(config, tmp_path / "daemon.log").start()
    closure = nix_build(tmp_path, hook=write_hook_script(tmp_path, config))
    failed = daemon.wait_event("push.failed", 30)
    assert "403" in failed[0]["error"] and "credentials" in failed[0]["error"], failed[0]
    assert "nothing" not in (tmp_path / "daemon.log").read_text()  # the secret is never logged
    assert not any(bucket.has_narinfo(p) for p in closure)

    settings["s3"]["credentials_file"] = good
    write_config(config, settings)
    daemon.signal(signal.SIGHUP)
    daemon.wait_event("config.reloaded", 10)
    wait_until(lambda: all(bucket.has_narinfo(p) for p in closure), 30, "upload with the new credentials")
    assert daemon.stop() == 0


def test_sighup_to_another_bucket_rekeys_everything_that_belongs_to_a_bucket(
    tmp_path: Path, bucket: Bucket, signing_key: tuple[Path, str]
) -> None:
    """SIGHUP from bucket A to bucket B: the roots are published to B (A's listing of this host's
    gcinfos is not taken for B's), uploads go to B, and nothing is skipped because A has it
    (the presence caches and the deletion records belong to A)."""
    from nixcache.bucket.layout import gcinfo_name
    from tests.harness import new_bucket, run_cli

    daemon = start_daemon(tmp_path, bucket, signing_key)
    fifo = tmp_path / "run" / "hook.fifo"
    rooted = nix_build(tmp_path, out="rooted")
    (tmp_path / "gcroots" / "r").symlink_to(rooted[-1])
    wait_until(lambda: bucket.gcinfos("gcroots/testhost/"), 20, "the root published to A")
    pushed = nix_build(tmp_path, out="pushed")
    with open(fifo, "w") as f:
        f.write(pushed[-1] + "\n")
    wait_until(lambda: all(bucket.has_narinfo(p) for p in pushed + rooted), 20, "both closures in A")

    b = new_bucket(bucket.endpoint)
    write_config(daemon.config, base_settings(tmp_path, b, signing_key[0]))
    daemon.signal(signal.SIGHUP)
    daemon.wait_event("bucket.changed", 10)
    wait_until(lambda: b.gcinfos("gcroots/testhost/"), 20, "the root published to B")
    assert b.gcinfos("gcroots/testhost/") == ["gcroots/testhost/" + gcinfo_name(rooted[-1])]
    assert all(b.has_narinfo(p) for p in rooted), "the root's closure, present in A, uploaded to B"
    assert b.get("gcroots/testhost/.claim") is not None, "B's folder claimed for this machine"

    with open(fifo, "w") as f:  # in A already: B does not have it
        f.write(pushed[-1] + "\n")
    fresh = nix_build(tmp_path, out="fresh")
    with open(fifo, "w") as f:
        f.write(fresh[-1] + "\n")
    wait_until(lambda: all(b.has_narinfo(p) for p in pushed + fresh), 20, "uploads go to B")
    assert not any(bucket.has_narinfo(p) for p in fresh if p not in pushed + rooted), "nothing new went to A"
    assert daemon.stop() == 0
    assert_uploaded(b, pushed + fresh + rooted, signing_key[1])
    verify = run_cli(daemon.config, "verify")
    assert verify.returncode == 0, verify.stdout + verify.stderr

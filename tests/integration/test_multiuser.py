"""The daemon as NixOS's module runs it (issue 11): an unprivileged service user, a real
nix-daemon running the post-build hook, GC roots in homes the service cannot read.

Real components only: the machine's /nix store and gcroots, a nix-daemon started here with its
own nix.conf, ``nixcache serve`` as the system user ``nixcache-test`` (tests/multiuser.py says
how it is set up), SeaweedFS. Needs root.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import pytest

from nixcache.bucket.layout import gcinfo_name
from nixcache.formats import gcinfo
from tests.harness import NIX, Bucket, dangling_narinfos, hash_part, nix_copy_from, wait_until
from tests.multiuser import (
    RETRY_INTERVAL,
    NixDaemon,
    Service,
    ServiceDaemon,
    ServiceEnv,
    add_paths_via_daemon,
    as_user,
    build_via_daemon,
    client_env,
    ensure_service_user,
    lay_out_service,
    running_nix_daemon,
    service_python,
    snapshot_package,
    world_dir,
)

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="starts nix-daemon and runs as a service user: root only")

HOST = "gcroots/testhost/"
TRASH = "gctrash/testhost/"
AUTO_ROOTS = Path("/nix/var/nix/gcroots/auto")
RETRY_ROUNDS = 3


@pytest.fixture(scope="module")
def service_env() -> Iterator[ServiceEnv]:
    user = ensure_service_user()
    python = service_python()
    root = Path(tempfile.mkdtemp(prefix="nixcache-multiuser-", dir="/tmp"))
    root.chmod(0o755)
    try:
        env = ServiceEnv(user, python, snapshot_package(world_dir(root / "lib")), root)
        env.check()
        yield env
    finally:
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class Host:
    service: Service
    nix_daemon: NixDaemon
    logs: Path
    """pytest's tmp_path: the logs are written by root and kept for a look after a failure."""

    def start_service(self) -> ServiceDaemon:
        return self.service.daemon(self.logs / "nixcache.log").start()


@pytest.fixture
def host(service_env: ServiceEnv, bucket: Bucket, signing_key: tuple[Path, str], tmp_path: Path) -> Iterator[Host]:
    service = lay_out_service(service_env, service_env.root / tmp_path.name, bucket, signing_key[0])
    with running_nix_daemon(service.nix_conf_dir, tmp_path / "nix-daemon.log") as nix_daemon:
        try:
            yield Host(service, nix_daemon, tmp_path)
        finally:  # the service first, then nix-daemon (running_nix_daemon kills it, whatever happened)
            for daemon in ServiceDaemon.running:
                if isinstance(daemon, ServiceDaemon) and daemon.alive():
                    daemon.kill9()


def problems_about(daemon: ServiceDaemon, about: str) -> list[str]:
    """What the daemon logged about ``about`` (roots.skipped and the like)."""
    return [f"{e['event']}: {e['problem']}" for e in daemon.events() if about in str(e.get("problem", ""))]


@pytest.mark.parametrize("unreadable", ["chmod-000", "link-loop"])
def test_root_in_a_home_the_service_cannot_read_is_published_kept_and_trashed_only_once_gone(
    host: Host, bucket: Bucket, unreadable: str
) -> None:
    service = host.service
    daemon = host.start_service()
    # Another user's home (root's here), 0700: the service user cannot even look inside.
    home = world_dir(service.base / "home" / "alice", 0o700)
    proj = world_dir(home / "proj")
    result = proj / "result"
    top, closure = build_via_daemon(host.logs, out_link=result)
    assert any(os.readlink(link) == str(result) for link in AUTO_ROOTS.iterdir()), "Nix registered no auto/ root"
    peek = subprocess.run(["stat", str(result)], capture_output=True, **as_user(service.env.user))
    assert peek.returncode != 0, "the service user can read alice's home: this test would prove nothing"

    key = HOST + gcinfo_name(top)
    try:
        wait_until(lambda: key in bucket.gcinfos(HOST), 30, "the gcinfo of the root in alice's home")
    except AssertionError as e:
        raise AssertionError(f"{e}; the daemon logged: {problems_about(daemon, str(result))}") from None
    data = bucket.get(key)
    assert data is not None
    info = gcinfo.parse(data, key)
    assert info.root == top
    assert sorted(m.hash_part for m in info.members) == sorted(hash_part(p) for p in closure)
    assert all(bucket.has_narinfo(p) for p in closure)

    # The out-link becomes unreadable, not gone: nothing may be trashed.
    if unreadable == "chmod-000":
        proj.chmod(0)
    else:
        result.unlink()
        result.symlink_to("result")  # a link loop
    rounds = daemon.count("roots.published", "roots.publish_failed")
    wait_until(lambda: daemon.count("roots.published", "roots.publish_failed") >= rounds + 2, 20, "two roots rounds")
    dereferences = daemon.count("dereference.done", "dereference.skipped", "dereference.failed")
    wait_until(
        lambda: daemon.count("dereference.done", "dereference.skipped", "dereference.failed") >= dereferences + 2,
        20, "two dereference cycles of the daemon",
    )  # fmt: skip
    by_hand = service.run_cli("dereference")
    assert bucket.gcinfos(HOST) == [key] and bucket.keys(TRASH) == [], (
        f"{unreadable}: a root the service cannot read was trashed as if gone; "
        f"daemon: {daemon.events('gcinfo.trashed')}; `nixcache dereference`: {by_hand.stdout}{by_hand.stderr}"
    )

    # Now gone for real: the next dereference trashes it.
    result.unlink()
    by_hand = service.run_cli("dereference")
    assert by_hand.returncode == 0, by_hand.stderr
    try:
        wait_until(lambda: bucket.keys(TRASH) == [TRASH + gcinfo_name(top)], 15, "the gone root's gcinfo in the trash")
    except AssertionError as e:
        raise AssertionError(f"{e}; `nixcache dereference`: {by_hand.stdout}{by_hand.stderr}") from None
    assert bucket.gcinfos(HOST) == []
    assert service.pending == []
    assert daemon.stop() == 0


def test_build_by_nix_daemon_is_pushed_by_the_service_user_and_substituted_with_signatures(
    host: Host, bucket: Bucket, signing_key: tuple[Path, str]
) -> None:
    service = host.service
    daemon = host.start_service()
    client = subprocess.run([*NIX, "show-config"], capture_output=True, text=True, env=client_env(), check=True)
    client_hook = [v.strip() for k, _, v in (ln.partition("=") for ln in client.stdout.splitlines())
                   if k.strip() == "post-build-hook"]  # fmt: skip
    assert client_hook == [""], "the client sets a hook: it must come from nix-daemon's nix.conf only"
    top, closure = build_via_daemon(host.logs)
    assert len(closure) == 3
    wait_until(lambda: all(bucket.has_narinfo(p) for p in closure), 30, "the closure in the bucket")
    wait_until(lambda: service.pending == [], 10, "an empty journal")
    from_fifo = {e["path"] for e in daemon.events("path.received") if e.get("source") == "fifo"}
    assert set(closure) <= from_fifo, f"not through the FIFO: {set(closure) - from_fifo}"
    assert service.spooled == []

    dest = host.logs / "client-store"
    copied = nix_copy_from(bucket, [top], dest, signing_key[1])
    assert copied.returncode == 0, copied.stderr
    for path in closure:
        assert (dest / path.lstrip("/")).exists(), path
    assert (dest / top.lstrip("/") / "share/name").read_text() == Path(top, "share/name").read_text()
    assert daemon.stop() == 0


def test_nix_daemon_killed_and_restarted_while_50_paths_are_pending_loses_none(host: Host, bucket: Bucket) -> None:
    service = host.service
    paths = add_paths_via_daemon(host.logs, 50)
    daemon = host.start_service()
    host.nix_daemon.kill()
    down = subprocess.run(["nix", "path-info", paths[0]], capture_output=True, text=True,
                          env=service.environment(), **as_user(service.env.user))  # fmt: skip
    assert down.returncode != 0, "nix-daemon still answers"

    def nothing_dropped() -> int:
        skipped = daemon.events("path.skipped")
        assert not skipped, (
            f"{len(skipped)} pending path(s) dropped while nix-daemon was down, e.g. {skipped[0]}; "
            f"{len(service.pending)} of 50 left in the journal"
        )
        return len(service.pending)

    with service.fifo.open("w") as fifo:
        fifo.write("".join(p + "\n" for p in paths))
    wait_until(lambda: nothing_dropped() == 50, 10, "50 entries in the journal")

    violations: list[str] = []
    stop = threading.Event()

    def watch() -> None:  # a path leaves the journal only once its narinfo is in the bucket
        while not stop.is_set():
            try:
                journal = set(service.pending)
                narinfos = set(bucket.keys())
            except Exception as e:  # the check itself failed: say so rather than pass silently
                violations.append(f"cannot check: {e!r}")
                return
            violations.extend(
                p for p in paths if Path(p).name not in journal and hash_part(p) + ".narinfo" not in narinfos
            )
            time.sleep(0.2)

    def retried_for_three_rounds() -> bool:
        left = nothing_dropped()
        assert left == 50, f"the journal lost paths: {left} of 50 left"
        # Failures logged, and attempts still made RETRY_ROUNDS retry intervals after the first.
        times = [datetime.fromisoformat(e["timestamp"]) for e in daemon.events("push.failed")]
        return bool(times) and (max(times) - min(times)).total_seconds() >= RETRY_ROUNDS * RETRY_INTERVAL

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        wait_until(retried_for_three_rounds, 30, f"push attempts failing for {RETRY_ROUNDS} retry intervals")
        assert len(service.pending) == 50
        assert not any(bucket.has_narinfo(p) for p in paths)

        host.nix_daemon.start()
        wait_until(lambda: all(bucket.has_narinfo(p) for p in paths), 60, "the 50 paths in the bucket")
        wait_until(lambda: service.pending == [], 10, "an empty journal")
    finally:
        stop.set()
        watcher.join()
    assert violations == [], f"left the journal before their narinfo was in the bucket: {sorted(set(violations))}"
    assert daemon.events("path.skipped") == []
    assert dangling_narinfos(bucket) == []
    assert daemon.stop() == 0

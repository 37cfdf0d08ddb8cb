"""Adversarial sequences, third pass: the daemon's intake, its batches and reloads, and roots it
cannot follow (the last three commits: backlog, batched pushes, SIGHUP to another bucket,
unresolved links).

Each test forces one interleaving in-process (the daemon's `Service` driven step by step, real
SeaweedFS, real Nix) and asserts an invariant on what survives it: journal entries, the spool,
the bucket's narinfos, the trash. Each failed on the code as it was when written; each is
named after the hole it found, and passes now that the hole is closed (commit b160f5d).
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nixcache.bucket import layout
from nixcache.bucket.seaweed import SeaweedFS
from nixcache.config import load_config
from nixcache.daemon import service as service_module
from nixcache.daemon.service import Service
from nixcache.local import hook, roots, store
from nixcache.local.journal import Journal
from tests.harness import Bucket, new_bucket, write_config
from tests.integration.test_adversarial2 import close, run, service_of
from tests.integration.test_consistency import add_text
from tests.integration.test_gc import Host

Key = tuple[Path, str]


@pytest.fixture
def other_bucket(seaweedfs: SeaweedFS) -> Iterator[Bucket]:
    """A second bucket on the same server (same credentials): where a SIGHUP moves the daemon."""
    b = new_bucket(seaweedfs.endpoint)
    yield b
    try:
        for key in b.keys():
            b.client.delete_object(Bucket=b.name, Key=key)
        b.client.delete_bucket(Bucket=b.name)
    except Exception:
        pass


def point_at(host: Host, bucket: Bucket) -> None:
    """Edit ``host``'s config file in place to use ``bucket`` (then SIGHUP)."""
    settings = json.loads(json.dumps(host.settings))
    settings["s3"]["bucket"] = bucket.name
    write_config(host.config, settings)


def still_pending(state_dir: Path) -> set[str]:
    """What a restarted daemon would upload: the journal, plus the spool it imports."""
    journal = Journal(state_dir)
    got: list[str] = []
    for f in journal.spool_dir.iterdir():
        if not f.name.startswith("."):
            got += f.read_text().split()
    return set(journal.pending()) | set(got)


# ---- 1. SIGTERM closes the FIFO with hooks' lines still in it -------------------------------------


def test_sigterm_drops_lines_a_hook_wrote_to_the_fifo_just_before(
    tmp_path: Path, bucket: Bucket, signing_key: Key
) -> None:
    """A build finishes as the daemon is told to stop (a `nixos-rebuild switch` restarts it).
    The hook opens the FIFO (the daemon still holds it: no ENXIO), writes its line — the write
    succeeds, so it spools nothing and exits 0: handed over. In the same loop iteration the
    SIGTERM handler runs (`stopping.set`). `run` wakes first (its wakeup was queued before the
    loop polled the FIFO again) and `_drain` calls `_close_fifo()`: `remove_reader` cancels
    the pending read, `os.close` discards the pipe's buffer. The line was never read, so never
    journaled; it is neither in pending/ nor in the spool: a restart never uploads it (I1:
    "SIGTERM during intake"). The docs' "SIGTERM stops reading the FIFO" does it without
    reading what is already in it. Responsible: service.py `_close_fifo` (closes without
    draining the FIFO until EAGAIN), called first thing by `_drain`."""
    alpha = Host(tmp_path, bucket, signing_key[0], "alpha")
    path = add_text(tmp_path, "built-at-sigterm")
    cfg, cfg_file = load_config(alpha.config)

    async def go() -> None:
        svc = Service(cfg, cfg_file)
        svc._open_fifo()
        loop = asyncio.get_running_loop()

        async def serve_until_sigterm() -> None:  # what `Service.run` does after start-up
            await svc.stopping.wait()
            await svc._drain([])

        serving = asyncio.create_task(serve_until_sigterm())
        await asyncio.sleep(0.05)
        handed_over: list[list[bytes]] = []

        def hook_then_sigterm() -> None:
            handed_over.append(hook.send_to_fifo(str(cfg.fifo), [path.encode() + b"\n"]))
            svc.stopping.set()  # the SIGTERM handler `run` installs

        loop.call_soon(hook_then_sigterm)
        await asyncio.wait_for(serving, 60)
        assert handed_over == [[]], "setup: the hook wrote its line to the FIFO (nothing to spool)"

    run(go())
    assert path in still_pending(cfg.state_dir), "a path the hook handed over is in no journal nor spool"


# ---- 2. SIGHUP to another bucket while a batch's entries are being removed -------------------------


def test_a_reload_to_another_bucket_while_a_batch_is_forgotten_drops_the_rest_of_the_batch(
    tmp_path: Path, bucket: Bucket, other_bucket: Bucket, signing_key: Key, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker pushes a batch [p1, p2] to bucket A; it succeeds. `_pushed` checks once that the
    daemon still uses A (`bucket.target != self.bucket.target`: no), then removes the journal
    entries one by one, each `await asyncio.to_thread(journal.remove)` (a slow disk). SIGHUP to
    bucket B lands during the first removal. The loop goes on: p2's entry is removed although
    the daemon is now configured for B and p2 is not in B. Nothing else brings it there (only
    roots are republished to the new bucket): I1, "a pending journal entry is removed only once
    its closure is in the bucket it is configured for now". Responsible: service.py `_pushed`
    (the target check before the `for path in paths: await self._forget(path)` loop, not per
    path)."""
    alpha = Host(tmp_path, bucket, signing_key[0], "alpha")
    p1, p2 = add_text(tmp_path, "p1"), add_text(tmp_path, "p2")
    real_remove = Journal.remove
    reached, go_on = threading.Event(), threading.Event()

    def slow_remove(self: Journal, store_path: str) -> None:
        if store_path == p1:
            reached.set()
            go_on.wait(60)
        real_remove(self, store_path)

    monkeypatch.setattr(Journal, "remove", slow_remove)

    async def go() -> None:
        svc = await service_of(alpha)
        try:
            await svc._intake([p1, p2], "fifo")
            taken = [svc.backlog.take(0.0), svc.backlog.take(0.0)]  # the feeder → the queue → a worker
            assert sorted(p for p in taken if p) == sorted([p1, p2])
            batch = asyncio.create_task(svc._process_batch([p1, p2]))
            assert await asyncio.to_thread(reached.wait, 120), "setup: the batch was pushed to A"
            point_at(alpha, other_bucket)
            await svc.reload()  # SIGHUP
            assert svc.bucket is not None and svc.bucket.cfg.s3.bucket == other_bucket.name
            go_on.set()
            await asyncio.wait_for(batch, 120)
        finally:
            go_on.set()
            await close(svc)

    run(go())
    assert bucket.has_narinfo(p2), "setup: p2 went to A"
    pending = still_pending(Path(alpha.settings["state_dir"]))
    assert p2 in pending or other_bucket.has_narinfo(p2), (
        "p2 left the journal while the daemon uses B, and B does not have it"
    )


# ---- 3. an unknown link holds its *last* target; the one it leads to now is trashed ---------------


class _HomeUnreadable:
    """`os` as an unprivileged service sees it: inside ``home`` (0700), lstat is EACCES."""

    def __init__(self, home: Path) -> None:
        self._home = str(home) + "/"

    def lstat(self, path: Any, *args: Any, **kw: Any) -> os.stat_result:
        if str(path).startswith(self._home):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return os.lstat(path, *args, **kw)

    def __getattr__(self, name: str) -> Any:
        return getattr(os, name)


def test_a_link_repointed_while_nobody_can_read_it_gets_the_root_it_now_leads_to_trashed(
    tmp_path: Path, bucket: Bucket, signing_key: Key, monkeypatch: pytest.MonkeyPatch
) -> None:
    """alice's `~/proj/result` → S1 is registered as `gcroots/auto-x`; `gcroots/pin` → S2 is
    another root. Both are published; roots-known.json records auto-x → S1, pin → S2. Then,
    while nix-daemon restarts (every `nix` call fails) and alice's home is 0700 to the service:
    alice re-points `result` to S2 (a rollback, a rebuild) and the pin is removed. Nix's
    collector now has S2 as a root (auto-x → ~/proj/result → S2) and S1 as none. The scan:
    auto-x is unresolved (EACCES), Nix cannot be asked, so `resolve` holds S1, "its last known
    target", and reports the scan complete (`Scan.complete` ignores `held`). Dereference then
    moves S2's gcinfo to the trash: a live root dereferenced, and the next collection deletes
    its closure from the bucket (I2: "a link re-pointed while unreadable", "nix-daemon
    unavailable"). Holding the last target is safe only if the link cannot have changed; while
    a link is unknown any store path may be what it roots. Responsible: roots.py `resolve`
    (`held` instead of `unreadable`) with `Scan.complete`."""
    home = tmp_path / "home" / "alice" / "proj"
    home.mkdir(parents=True)
    s1, s2 = add_text(tmp_path, "s1"), add_text(tmp_path, "s2")
    alpha = Host(tmp_path, bucket, signing_key[0], "alpha")
    (home / "result").symlink_to(s1)
    alpha.root("auto-x", str(home / "result"))
    alpha.root("pin", s2)
    trash_of_s2 = layout.trash_folder("alpha") + layout.gcinfo_name(s2)

    async def go() -> None:
        svc = await service_of(alpha)
        watcher = roots.Watcher()
        try:
            await svc._roots_round(watcher)  # both published; their targets remembered
            assert bucket.keys(layout.roots_folder("alpha")) and set(svc.live_roots) == {s1, s2}, "setup"
            # nix-daemon restarting; alice's home unreadable to the service; she re-points result.
            monkeypatch.setenv("NIX_REMOTE", "daemon")
            monkeypatch.setenv("NIX_DAEMON_SOCKET_PATH", str(tmp_path / "no-nix-daemon" / "socket"))
            monkeypatch.setattr(roots, "os", _HomeUnreadable(tmp_path / "home"))
            (home / "result").unlink()
            (home / "result").symlink_to(s2)
            alpha.unroot("pin")
            await svc._roots_round(watcher)
            await svc.dereference_now()
        finally:
            watcher.close()
            await close(svc)

    run(go())
    assert trash_of_s2 not in bucket.keys(layout.trash_folder("alpha")), (
        "S2 is a root for Nix (auto-x → ~/proj/result → S2) and was moved to the trash"
    )


# ---- 4. SIGHUP to another bucket during a dereference: the old bucket's listing is kept -----------


def test_a_reload_to_another_bucket_during_a_dereference_never_publishes_the_roots_there(
    tmp_path: Path, bucket: Bucket, other_bucket: Bucket, signing_key: Key
) -> None:
    """alpha's daemon has published root R to bucket A. Its dereference cycle starts: `Publisher.
    dereference` → `list_remote(A)` (a LIST). SIGHUP to bucket B lands during that LIST:
    `reload` sets `publisher.remote = None` ("its gcinfos are listed afresh") and asks the roots
    loop to publish every root to B. Then the LIST of A returns and `list_remote` stores it in
    `self.remote`. The roots round on B takes `self.remote` (A's listing) as B's: R's gcinfo has
    the same bytes, so R is "unchanged" — no push, no gcinfo in B. The docs promise "every root
    is published to it at once"; B holds neither R's closure nor any gcinfo naming it (a
    residual collection on B would take what the hook pushed of R; a client cannot substitute
    it) until the next dereference cycle happens to list B (`gc.dereference_interval`; never
    while dereference is disabled). The same happens when the round itself started on A and
    waited for `roots_lock`. Responsible: publisher.py `list_remote` (assigns `self.remote`
    whichever bucket it listed) with service.py `reload` (`self.publisher.remote
    = None` while a job of the old bucket still runs)."""
    alpha = Host(tmp_path, bucket, signing_key[0], "alpha")
    r = add_text(tmp_path, "r")
    alpha.root("r", r)
    gcinfo = layout.roots_folder("alpha") + layout.gcinfo_name(r)

    async def go() -> None:
        svc = await service_of(alpha)
        watcher = roots.Watcher()
        try:
            await svc._roots_round(watcher)
            assert gcinfo in bucket.keys(layout.roots_folder("alpha")), "setup: R published to A"
            assert svc.bucket is not None
            s3a = svc.bucket.s3
            real_list_keys = s3a.list_keys
            reached, go_on = asyncio.Event(), asyncio.Event()

            async def held_list_keys(prefix: str, *args: Any, **kw: Any) -> Any:
                reached.set()
                await go_on.wait()
                async for obj in real_list_keys(prefix, *args, **kw):
                    yield obj

            s3a.list_keys = held_list_keys  # type: ignore[method-assign]
            dereference = asyncio.create_task(svc.dereference_now())
            await asyncio.wait_for(reached.wait(), 60)
            point_at(alpha, other_bucket)
            await svc.reload()  # SIGHUP
            go_on.set()
            await asyncio.wait_for(dereference, 60)
            await svc._roots_round(watcher)  # the round the reload asked for
        finally:
            watcher.close()
            await close(svc)

    run(go())
    assert other_bucket.has_narinfo(r) and gcinfo in other_bucket.keys(layout.roots_folder("alpha")), (
        "after SIGHUP to B, root R is neither pushed nor published to B"
    )


# ---- 5. two SIGHUPs whose reloads end in the other order ---------------------------------------------


def test_two_reloads_ending_out_of_order_leave_the_daemon_on_the_older_config(
    tmp_path: Path, bucket: Bucket, other_bucket: Bucket, seaweedfs: SeaweedFS, signing_key: Key,
    monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    """The admin points the config at bucket B and sends SIGHUP, then, seconds later, fixes it
    to bucket C and sends SIGHUP again. Each SIGHUP starts its own `reload` task
    (`_background_task(self.reload())`); each reads the file, then awaits `Bucket(cfg).open()`
    (creating the client may wait on a credentials provider: IMDS, SSO, a slow disk). The
    second opens first and installs C; then the first completes and installs B over it:
    `self.bucket`, `self.cfg` are the older config's. The daemon now pushes to B and removes
    journal entries for paths that are not in C, the bucket it is configured for (I1), until
    the next SIGHUP. Responsible: service.py `reload` (no serialisation of reloads, no check
    that a newer one already applied)."""
    alpha = Host(tmp_path, bucket, signing_key[0], "alpha")
    third = new_bucket(seaweedfs.endpoint)
    p = add_text(tmp_path, "after-two-reloads")
    real_open = service_module.Bucket.open
    first_opening, first_go = asyncio.Event(), asyncio.Event()
    calls = 0

    async def open_(self: service_module.Bucket) -> service_module.Bucket:
        nonlocal calls
        calls += 1
        if calls == 1:  # the first SIGHUP's client is slow to create
            first_opening.set()
            await first_go.wait()
        return await real_open(self)

    async def go() -> None:
        svc = await service_of(alpha)
        try:
            monkeypatch.setattr(service_module.Bucket, "open", open_)
            point_at(alpha, other_bucket)
            first = asyncio.create_task(svc.reload())  # SIGHUP (config: B)
            await asyncio.wait_for(first_opening.wait(), 60)
            point_at(alpha, third)
            second = asyncio.create_task(svc.reload())  # SIGHUP (config: C)
            await asyncio.sleep(1)  # the second would now overtake the first, were they not serialised
            first_go.set()
            await asyncio.wait_for(asyncio.gather(first, second), 60)
            assert svc.cfg.s3.bucket == third.name
            await svc._intake([p], "fifo")
            assert svc.backlog.take(0.0) == p
            await svc._process(p)
        finally:
            first_go.set()
            await close(svc)

    try:
        run(go())
        pending = still_pending(Path(alpha.settings["state_dir"]))
        assert p in pending or third.has_narinfo(p), (
            "the config says bucket C; the daemon pushed to B and dropped the journal entry"
        )
    finally:
        for key in third.keys():
            third.client.delete_object(Bucket=third.name, Key=key)
        third.client.delete_bucket(Bucket=third.name)


# ---- 6. a path reported again while its failed push is being judged "gone" ------------------------


def test_a_path_rebuilt_and_reported_while_its_push_is_judged_gone_is_dropped(
    tmp_path: Path, bucket: Bucket, signing_key: Key, monkeypatch: pytest.MonkeyPatch
) -> None:
    """P is pending. A garbage collection deletes it; the worker's push fails (StoreError) and
    `_gone` asks `nix-store --check-validity`: invalid. While that answer is on its way, P is
    built again (same path: same inputs) and the hook reports it: `_intake` finds the journal
    entry present and `Backlog.add` finds P taken (in flight), so the report changes nothing.
    Then the worker acts on its stale answer: `path.skipped`, `_forget(P)` removes the entry.
    P is valid, was handed over after it became valid again, and is in no journal, no
    backlog, no bucket: never uploaded (I1: "paths that become invalid, the same path reported
    twice"). Responsible: service.py `_process` (forgets on a validity answer older than a
    report that arrived meanwhile) with backlog.py `add` (a report of a taken path is
    dropped, not remembered for after the attempt)."""
    alpha = Host(tmp_path, bucket, signing_key[0], "alpha")
    source = tmp_path / "rebuildable"
    source.write_text(f"same inputs, same path {os.urandom(8).hex()}\n")

    def nix_store(*args: str) -> str:
        return subprocess.run(["nix-store", *args], check=True, capture_output=True, text=True).stdout.strip()

    p = nix_store("--add", str(source))
    real_invalid_paths = store.invalid_paths

    async def go() -> None:
        svc = await service_of(alpha)

        async def invalid_paths(paths: list[str]) -> list[str]:
            answer = await real_invalid_paths(paths)
            if p in answer:  # meanwhile: rebuilt, and the hook reports it
                assert await asyncio.to_thread(nix_store, "--add", str(source)) == p
                await svc._intake([p], "fifo")
            return answer

        try:
            await svc._intake([p], "fifo")
            assert svc.backlog.take(0.0) == p
            await asyncio.to_thread(nix_store, "--delete", p)  # a garbage collection
            monkeypatch.setattr(store, "invalid_paths", invalid_paths)
            await svc._process(p)
        finally:
            await close(svc)

    run(go())
    assert nix_store("--check-validity", "--print-invalid", p) == "", "setup: P is valid again"
    assert p in still_pending(Path(alpha.settings["state_dir"])) or bucket.has_narinfo(p), (
        "P, reported once valid again, was dropped on the stale 'no longer valid' answer"
    )


# ---- 7. a week of spooled paths blocks the event loop ---------------------------------------------


def test_importing_a_spool_of_100k_paths_blocks_the_event_loop_for_seconds(
    tmp_path: Path, bucket: Bucket, signing_key: Key
) -> None:
    """The daemon was down for a week on a busy builder: hooks spooled 100,000 paths. At start
    `import_spool` journals them in a thread (good), then `_pending` runs on the event loop:
    one `log.info("path.received")` per new path plus a Backlog add, 100,000 times, with no
    await between. For that long (seconds; more when journald is slow to drain stderr) the loop
    answers no `nixcache status`, sends no watchdog ping, reads no FIFO (hooks spool instead).
    I3/I4: "status answers fast with 100k pending", "no event loop blocked for long".
    Responsible: service.py `_pending` (a log line per path, on the loop), called by
    `import_spool`."""
    alpha = Host(tmp_path, bucket, signing_key[0], "alpha")
    cfg, cfg_file = load_config(alpha.config)
    spool = Path(Journal(cfg.state_dir).spool_dir)
    alphabet = "0123456789abcdfghijklmnpqrsvwxyz"
    lines = [
        "/nix/store/" + "".join(alphabet[(i >> (5 * k)) & 31] for k in range(32)) + f"-built-{i}\n"
        for i in range(100_000)
    ]
    for n in range(100):  # a hundred hooks' spool files
        (spool / f"{n:04d}-1.paths").write_text("".join(lines[n * 1000 : (n + 1) * 1000]))
    worst = 0.0

    async def go() -> None:
        nonlocal worst
        svc = Service(cfg, cfg_file)
        loop = asyncio.get_running_loop()
        done = asyncio.Event()

        async def ticker() -> None:  # what a status query or the watchdog needs: a turn of the loop
            nonlocal worst
            last = loop.time()
            while not done.is_set():
                await asyncio.sleep(0.01)
                now = loop.time()
                worst = max(worst, now - last - 0.01)
                last = now

        tick = asyncio.create_task(ticker())
        await svc.import_spool()
        done.set()
        await tick
        assert len(svc.backlog) == 100_000, "setup: every spooled path is pending"

    run(go())
    assert worst < 1.0, f"the event loop was blocked for {worst:.1f} s in one stretch"


# ---- 8. a regular file named by a store path is a root for Nix, not for the scan ------------------


def test_a_root_kept_by_a_regular_file_in_the_roots_directory_is_dereferenced(
    tmp_path: Path, bucket: Bucket, signing_key: Key
) -> None:
    """Nix's collector (LocalStore::findRoots, checked with this machine's Nix 2.8 on a chroot
    store: `--print-roots` lists it, `--print-dead` spares it) takes a *regular file* in the
    roots directories whose name is a valid store path's base name as a root of that path, as
    well as symlinks. nixcache's scan reports it "not a symlink" and skips it, yet counts the
    scan complete. So: `gcroots/pin` → S is published; S is also pinned by a plain file
    `gcroots/<S's base name>`; the symlink is removed. S is still a root for Nix, but the next
    dereference trashes its gcinfo (I2, "as Nix's collector sees it"). Predates the last three
    commits. Responsible: roots.py `scan.visit_dir` (`else: result.problems.append(... "not a
    symlink")`)."""
    s = add_text(tmp_path, "pinned-by-file")
    alpha = Host(tmp_path, bucket, signing_key[0], "alpha")
    alpha.root("pin", s)
    (alpha.dir / "gcroots" / s.rsplit("/", 1)[1]).write_text("")
    trash_of_s = layout.trash_folder("alpha") + layout.gcinfo_name(s)

    async def go() -> None:
        svc = await service_of(alpha)
        watcher = roots.Watcher()
        try:
            await svc._roots_round(watcher)
            assert set(svc.live_roots) == {s}, "setup: S published"
            alpha.unroot("pin")
            await svc._roots_round(watcher)
            await svc.dereference_now()
        finally:
            watcher.close()
            await close(svc)

    run(go())
    assert trash_of_s not in bucket.keys(layout.trash_folder("alpha")), (
        "S is still a root for Nix (a regular file named by it in the roots directory) and was trashed"
    )

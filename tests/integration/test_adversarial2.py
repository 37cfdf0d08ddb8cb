"""Adversarial sequences, second pass (after the fixes of test_adversarial.py).

Each test asserts what docs/gc.md promises for the sequence in its docstring; each failed on the
code as it was when written. Interleavings are forced in-process against the real SeaweedFS
bucket, real Nix and the real classes (the daemon's `Service` too, driven step by step): a method
wrapped to run another host's command at a chosen point, or to fail as a dropped connection would.

Most sequences start from "H8": `a` and `b` have identical contents (one NAR, `nar/<h>.nar.zst`);
beta rooted `b`, published, dropped it, dereferenced. alpha uploads `a` (rewrites the NAR, then
writes a's narinfo) while beta collects: beta's reads come before a's narinfo, its deletes after,
so a's narinfo names a deleted NAR until alpha's check after its writes finds it ("What remains"
#1). What differs is what happens to that check.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from nixcache.bucket import deletions, layout
from nixcache.bucket.s3 import S3
from nixcache.config import Config, load_config, load_signing_key
from nixcache.daemon.service import Bucket as ServiceBucket
from nixcache.daemon.service import Service
from nixcache.errors import NixcacheError, S3Error
from nixcache.ops.collect import Collector
from nixcache.ops.publish import Publisher
from nixcache.ops.roots import local_roots
from nixcache.ops.upload import Uploader
from tests.harness import (
    Bucket,
    Daemon,
    build_pair,
    closure_of,
    dangling_narinfos,
    run_cli,
    write_config,
)
from tests.integration.test_adversarial import (
    collect_losing_the_network_at_the_done_record,
    interrupted_publish,
    two_in_betas_trash,
)
from tests.integration.test_consistency import add_text, assert_whole, nix_copy_into, same_content_pair
from tests.integration.test_gc import Host
from tests.stripproxy import StripProxy

Key = tuple[Path, str]


def cfg_of(host: Host | Path) -> Config:
    return load_config(host.config if isinstance(host, Host) else host)[0]


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(coro)  # type: ignore[arg-type]


class Killed(Exception):
    """Stands for kill -9 of the process at that point."""


def variant(host: Host, name: str, **sections: dict[str, Any]) -> Path:
    """A copy of ``host``'s config (same state_dir) with some sections updated."""
    settings = json.loads(json.dumps(host.settings))
    for section, values in sections.items():
        settings.setdefault(section, {}).update(values)
    return write_config(host.dir / f"{name}.toml", settings)


def twins(tmp_path: Path, bucket: Bucket, signing_key: Key) -> tuple[str, str, Host, Host]:
    """`a`, `b` identical contents; beta rooted `b`, published, dropped it, dereferenced."""
    a, b = same_content_pair(tmp_path)
    alpha, beta = Host(tmp_path, bucket, signing_key[0], "alpha"), Host(tmp_path, bucket, signing_key[0], "beta")
    beta.root("b", b)
    beta.run("publish")
    beta.unroot("b")
    beta.run("dereference")
    return a, b, alpha, beta


@contextlib.asynccontextmanager
async def collection_racing(
    bcfg: Config, s3a: S3, narinfo_key: str, then: Callable[[], Awaitable[None]]
) -> AsyncIterator[asyncio.Task[Any]]:
    """beta's collection reads the bucket before alpha's PUT of ``narinfo_key`` and deletes
    after it (H8); right after that PUT and the collection, ``then()`` runs in alpha's job (raise
    Killed: kill -9 there; or break the network for what follows)."""
    async with S3(bcfg.s3) as s3b:
        state_read, written = asyncio.Event(), asyncio.Event()
        collector = Collector(bcfg, s3b)
        real_read_state = collector.read_state

        async def read_state() -> Any:
            state = await real_read_state()
            state_read.set()
            await written.wait()
            return state

        collector.read_state = read_state  # type: ignore[method-assign]
        gc = asyncio.create_task(collector.collect())
        real_put = s3a.put
        fired = False

        async def put(key: str, body: bytes, *args: Any, **kw: Any) -> None:
            nonlocal fired
            if key == narinfo_key and not fired:
                fired = True
                await state_read.wait()
                await real_put(key, body, *args, **kw)
                written.set()
                assert (await gc).deleted > 0, "setup: the collection deleted something"
                await then()
                return
            await real_put(key, body, *args, **kw)

        s3a.put = put  # type: ignore[method-assign]
        try:
            yield gc
        finally:
            s3a.put = real_put  # type: ignore[method-assign]
            if not gc.done():
                gc.cancel()
                with contextlib.suppress(BaseException):
                    await gc


async def killed() -> None:
    raise Killed


def records_list_fails_once(monkeypatch: pytest.MonkeyPatch) -> Callable[[], Awaitable[None]]:
    """``then``: the next LIST of gc/records/ fails (a network drop), later ones work."""

    async def then() -> None:
        real = deletions.list_records

        async def down(_bucket: S3) -> deletions.View:
            monkeypatch.setattr(deletions, "list_records", real)
            raise S3Error("gc/records/: connection reset")

        monkeypatch.setattr(deletions, "list_records", down)

    return then


async def service_of(host: Host) -> Service:
    """The daemon of ``host``, in-process, driven step by step (no loops started)."""
    cfg, path = load_config(host.config)
    svc = Service(cfg, path)
    svc.bucket = await ServiceBucket(cfg).open()
    selected, scan = await local_roots(cfg)
    svc.live_roots, svc.roots_complete = selected, scan.complete
    return svc


async def close(svc: Service) -> None:
    for task in list(svc.workers.values()):
        task.cancel()
    await asyncio.gather(*svc.workers.values(), return_exceptions=True)
    await asyncio.gather(*svc._background, return_exceptions=True)
    if svc.bucket is not None:
        await svc.bucket.close()


def nar_deleted_under_a(bucket: Bucket, a: str) -> None:
    assert bucket.has_narinfo(a) and dangling_narinfos(bucket) == [layout.narinfo_key(a)], (
        "setup: a's NAR went under its narinfo"
    )


# ---- 1. `nixcache publish` re-run after an interrupted publish ---------------------------------------


def test_a_publish_rerun_takes_every_retained_record_as_settled_and_never_repairs_the_nar(
    tmp_path: Path, bucket: Bucket, signing_key: Key
) -> None:
    """H8 with publish: alpha roots `a` and runs `nixcache publish`; it writes a's NAR and
    narinfo while beta collects `b` (reads before, deletes after: a's NAR goes), and is killed
    (Ctrl-C, kill -9, network) right after a's narinfo, before any check. The user runs `nixcache
    publish` again — a new process, which per rule 9 "checks every retained record". But
    publish(learn=True) LISTs the records *before* `uploader.begin()`, so its baseline already
    holds beta's done record: the settle never looks at it; `touched` holds only deleted *paths*
    (b), not NARs; a's narinfo is present, so nothing is uploaded. The gcinfo is written; a's
    narinfo names a missing NAR for good (I1; the live root does not substitute).
    Responsible: publisher.py `if learn: await uploader.records.refresh()` before `base =
    uploader.begin()`."""
    a, _b, alpha, beta = twins(tmp_path, bucket, signing_key)
    alpha.root("a", a)
    acfg, bcfg = cfg_of(alpha), cfg_of(beta)

    async def go() -> None:
        async with S3(acfg.s3) as s3a, collection_racing(bcfg, s3a, layout.narinfo_key(a), killed):
            selected, _ = await local_roots(acfg)
            with pytest.raises(Killed):
                await Publisher(acfg).publish(Uploader(acfg, s3a, load_signing_key(acfg)), selected, learn=True)

    run(go())
    nar_deleted_under_a(bucket, a)
    out = alpha.run("publish").stdout  # the user runs it again
    assert "published 1" in out, out
    assert_whole(bucket, alpha, signing_key[1], [a], tmp_path)


# ---- 2. the daemon: a publish round that fails between its writes and its check -----------------------


def test_a_daemon_publish_that_failed_after_its_writes_is_retried_with_a_fresh_baseline(
    tmp_path: Path, bucket: Bucket, signing_key: Key, monkeypatch: pytest.MonkeyPatch
) -> None:
    """H8 in alpha's daemon, through the publish round: the round pushes root `a` (NAR, then
    narinfo) while beta collects `b`; the LIST of gc/records/ of the round's first check fails
    (network drop), the round fails ("roots.publish_failed"), no gcinfo written. The dereference
    cycle then LISTs the records (beta's done record learnt). The next round re-pushes `a` with
    `uploader.begin()` — a baseline that holds beta's record — finds a's narinfo present, checks
    nothing, writes the gcinfo. A push keeps its baseline for its retry (`_retry_base`), a publish
    does not. I1 broken for good for a live root. Responsible: publisher.py `base =
    uploader.begin()` (no retry baseline for publish's pushes: `uploader.push(roots, base)`)."""
    a, _b, alpha, beta = twins(tmp_path, bucket, signing_key)
    alpha.root("a", a)
    bcfg = cfg_of(beta)

    async def go() -> None:
        svc = await service_of(alpha)
        try:
            assert svc.bucket is not None and svc.bucket.uploader is not None
            uploader = svc.bucket.uploader
            async with collection_racing(
                bcfg, uploader.s3, layout.narinfo_key(a), records_list_fails_once(monkeypatch)
            ):
                with pytest.raises(S3Error):  # _roots_round logs roots.publish_failed
                    await svc.publisher.publish(uploader, svc.live_roots)
            await svc.dereference_now()  # the half-hourly cycle: LIST the records, forget
            result = await svc.publisher.publish(uploader, svc.live_roots)  # the next round
            assert result.published == [a], result
        finally:
            await close(svc)

    run(go())
    assert_whole(bucket, alpha, signing_key[1], [a], tmp_path)


# ---- 3. the daemon after a restart: "its first jobs check every retained record" ------------------------


def test_a_restarted_daemon_retries_a_pending_push_after_its_dereference_cycle_primed_the_tracker(
    tmp_path: Path, bucket: Bucket, signing_key: Key
) -> None:
    """H8 in alpha's daemon: a worker pushes `a` (from the hook) while beta collects, and the daemon
    is killed -9 right after a's narinfo; `a` stays pending in the journal. The daemon restarts;
    its dereference loop (started once the roots are scanned) LISTs the records before the worker
    gets to `a` (4 workers, a long queue after a big build). The retry has no `_retry_base` (new
    process) and `begin()` takes every record this process has learnt — beta's included — as
    settled: "a new process knows none" holds only for jobs that begin before its first refresh.
    a's narinfo present → nothing uploaded, nothing checked; `a` leaves the journal. I1 for good.
    Responsible: uploader.py `base = self._retry_base.pop(key, None) or self.begin()` (and
    service.py dereference_now's refresh priming the shared Tracker)."""
    a, _b, alpha, beta = twins(tmp_path, bucket, signing_key)
    acfg, bcfg = cfg_of(alpha), cfg_of(beta)

    async def first_life() -> None:
        async with S3(acfg.s3) as s3a, collection_racing(bcfg, s3a, layout.narinfo_key(a), killed):
            with pytest.raises(Killed):
                await Uploader(acfg, s3a, load_signing_key(acfg)).push([a])

    async def second_life() -> None:
        svc = await service_of(alpha)
        try:
            svc.journal.add(a)
            await svc.dereference_now()
            await svc._process(a)
            assert svc.journal.pending() == [], "the retry succeeded"
        finally:
            await close(svc)

    run(first_life())
    nar_deleted_under_a(bucket, a)
    run(second_life())
    assert_whole(bucket, alpha, signing_key[1], [a], tmp_path)


# ---- 4. SIGHUP drops the retry baselines ---------------------------------------------------------------


def test_a_reload_between_a_failed_push_and_its_retry_loses_the_retry_baseline(
    tmp_path: Path, bucket: Bucket, signing_key: Key, monkeypatch: pytest.MonkeyPatch
) -> None:
    """H8 in alpha's daemon: a worker pushes `a` while beta collects; the LIST of its check fails
    (network): push.failed, its baseline kept in `_retry_base` for the retry. The dereference cycle
    learns beta's record. Then SIGHUP (a nixos-rebuild switch): `Service.reload` builds a new
    Uploader and carries over `known_present` and the Tracker — not `_retry_base`. The retry of `a`
    takes `begin()`, which holds beta's record: nothing checked; a's narinfo names a missing NAR
    for good (I1). Responsible: service.py reload (no `_retry_base` carried over)."""
    a, _b, alpha, beta = twins(tmp_path, bucket, signing_key)
    bcfg = cfg_of(beta)

    async def go() -> None:
        svc = await service_of(alpha)
        try:
            assert svc.bucket is not None and svc.bucket.uploader is not None
            s3a = svc.bucket.uploader.s3
            async with collection_racing(bcfg, s3a, layout.narinfo_key(a), records_list_fails_once(monkeypatch)):
                svc.journal.add(a)
                await svc._process(a)
            assert a in svc.errors and svc.journal.pending() == [a], "setup: the push failed, a stays pending"
            nar_deleted_under_a(bucket, a)
            await svc.dereference_now()
            await svc.reload()
            await svc._process(a)  # the retry, retry_interval later
            assert svc.journal.pending() == [], svc.errors
        finally:
            await close(svc)

    run(go())
    assert_whole(bucket, alpha, signing_key[1], [a], tmp_path)


# ---- 5. SIGHUP: the old and the new Tracker share their containers -------------------------------------


def test_after_a_reload_a_record_learnt_by_an_old_job_is_never_learnt_by_the_new_tracker(
    tmp_path: Path, bucket: Bucket, signing_key: Key
) -> None:
    """alpha's daemon pushed `two` (hook; beta's copy present: two's closure cached as present).
    beta drops `two` and collects: two's closure goes. Job A (a worker push of `u1`, old client)
    is in flight when SIGHUP comes. `Tracker.adopt` makes the new Tracker share the old one's
    `done` dict, `deleted` and `doubtful` sets, and the new Uploader the same `known_present`
    set. Job B on the new Uploader begins (its forget() swaps in a fresh `doubtful`). A's check
    then learns beta's record in the *old* Tracker: `_learn` inserts it into the shared `done`
    dict, puts its paths into the old `doubtful` only, and A's forget() evicts them from a *new*
    set it assigns to the old Uploader — the shared one keeps them. The new Tracker now "knows"
    the record (it is in `done`) without ever having learnt it: no eviction, no epoch bump, and
    every later job takes it as settled. A publish of root `two` (rooted again) trusts the cache,
    checks nothing and writes a gcinfo listing three missing paths. I4 and I2, for the life of the
    process. Responsible: deletions.py Tracker.adopt (shared mutable state) with service.py reload
    (`new.uploader.known_present = old.uploader.known_present`)."""
    _one, two, _shared = build_pair(tmp_path)
    beta = Host(tmp_path, bucket, signing_key[0], "beta")
    beta.root("two", two)
    beta.run("publish")
    alpha = Host(tmp_path, bucket, signing_key[0], "alpha")
    u1, u2 = add_text(tmp_path, "u1"), add_text(tmp_path, "u2")
    acfg = cfg_of(alpha)

    def beta_collects_two() -> None:
        beta.unroot("two")
        beta.run("dereference")
        beta.run("gc")

    def hold_at(s3: S3, key: str) -> tuple[asyncio.Event, asyncio.Event]:
        reached, go_on = asyncio.Event(), asyncio.Event()
        real_put = s3.put

        async def put(k: str, body: bytes, *args: Any, **kw: Any) -> None:
            if k == key:
                reached.set()
                await go_on.wait()
            await real_put(k, body, *args, **kw)

        s3.put = put  # type: ignore[method-assign,assignment]
        return reached, go_on

    async def go() -> None:
        svc = await service_of(alpha)
        try:
            old = svc.bucket
            assert old is not None and old.uploader is not None
            await old.uploader.push([two])  # the hook: present, cached
            await asyncio.to_thread(beta_collects_two)
            assert not any(bucket.has_narinfo(p) for p in closure_of(two)), "setup: beta collected two"

            async def job(b: ServiceBucket, path: str) -> None:
                with b.use() as uploader:
                    await uploader.push([path])

            a_reached, a_go = hold_at(old.uploader.s3, layout.narinfo_key(u1))
            job_a = asyncio.create_task(job(old, u1))
            await a_reached.wait()
            await svc.reload()  # SIGHUP
            new = svc.bucket
            assert new is not None and new is not old and new.uploader is not None
            b_reached, b_go = hold_at(new.uploader.s3, layout.narinfo_key(u2))
            job_b = asyncio.create_task(job(new, u2))
            await b_reached.wait()
            a_go.set()
            await job_a
            b_go.set()
            await job_b
            alpha.root("two", two)
            selected, _ = await local_roots(acfg)
            with new.use() as uploader:
                result = await svc.publisher.publish(uploader, selected)  # a roots round
            assert result.published == [two], result
        finally:
            await close(svc)

    run(go())
    assert_whole(bucket, alpha, signing_key[1], [two], tmp_path)


# ---- 6. an unreadable done record evicts nothing from the presence cache -------------------------------


def test_an_unreadable_done_record_leaves_the_presence_cache_trusted(
    tmp_path: Path, bucket: Bucket, signing_key: Key
) -> None:
    """One process of alpha (daemon-like: one Uploader). It pushed `two` (beta's copy present:
    cached as present). beta drops `two` and collects with a nixcache version whose record format
    this one cannot read (rule 9: "counts as covering every path: checked once per process").
    Job 1 (an unrelated push) learns it: `Record.parse` → `everything=True` with empty `paths`, so
    `_learn` adds nothing to `doubtful` — nothing is evicted — and job 1's check covers only job 1's
    closure. Job 2, a publish of root `two`: its baseline holds the record (settled), the cache
    says two's closure is present; nothing pushed, nothing checked; the gcinfo lists three
    missing paths. I4, I2. Responsible: deletions.py Tracker._learn (`self.doubtful |=
    record.paths`, empty for an unreadable record; the cache should be cleared)."""
    _one, two, _shared = build_pair(tmp_path)
    beta = Host(tmp_path, bucket, signing_key[0], "beta")
    beta.root("two", two)
    beta.run("publish")
    alpha = Host(tmp_path, bucket, signing_key[0], "alpha")
    unrelated = add_text(tmp_path, "unrelated")
    acfg = cfg_of(alpha)

    def beta_collects_two_with_another_version() -> None:
        beta.unroot("two")
        beta.run("dereference")
        beta.run("gc")
        for key in bucket.keys("gc/records/"):
            body = gzip.compress(json.dumps({"version": 2, "deleted": {"narinfos": ["…"]}}).encode())
            bucket.client.put_object(Bucket=bucket.name, Key=key, Body=body)

    async def go() -> None:
        async with S3(acfg.s3) as s3:
            uploader = Uploader(acfg, s3, load_signing_key(acfg))
            await uploader.push([two])
            await asyncio.to_thread(beta_collects_two_with_another_version)
            assert not any(bucket.has_narinfo(p) for p in closure_of(two)), "setup: beta collected two"
            await uploader.push([unrelated])  # job 1
            alpha.root("two", two)
            selected, _ = await local_roots(acfg)
            result = await Publisher(acfg).publish(uploader, selected)  # job 2
            assert result.published == [two], result

    run(go())
    assert_whole(bucket, alpha, signing_key[1], [two], tmp_path)


# ---- 7. upload.compression changed between an attempt and its retry -------------------------------------


def test_a_retry_after_switching_compression_misses_the_nar_deleted_under_the_first_attempts_narinfo(
    tmp_path: Path, bucket: Bucket, signing_key: Key
) -> None:
    """H8, then alpha's operator switches upload.compression from zstd to xz and runs `nixcache
    push a` again (what "What remains" #1 says repairs it; with zstd it does). The retry checks
    every retained record, but for NARs only "under the name this host gives it" *now*:
    `nar/<h>.nar.xz`. beta's done record lists the exact keys it deleted (`nar/<h>.nar.zst`, and
    no NAR hashes), so no hit; a's narinfo is present, nothing uploaded, exit 0. a's narinfo still
    names the deleted `.zst`: I1 for good. Responsible: uploader.py settle `nar_owner =
    {layout.nar_key(..., self.cfg.upload.compression) ...}` (the NAR a narinfo names is not what
    it checks) with gc.py's done record (`Record(rid, gone_paths, frozenset(), gone_nars)`)."""
    a, _b, alpha, beta = twins(tmp_path, bucket, signing_key)
    acfg, bcfg = cfg_of(alpha), cfg_of(beta)

    async def go() -> None:
        async with S3(acfg.s3) as s3a, collection_racing(bcfg, s3a, layout.narinfo_key(a), killed):
            with pytest.raises(Killed):
                await Uploader(acfg, s3a, load_signing_key(acfg)).push([a])

    run(go())
    nar_deleted_under_a(bucket, a)
    xz = variant(alpha, "xz", upload={"compression": "xz"})
    r = run_cli(xz, "push", a)
    assert r.returncode == 0, r.stderr
    assert_whole(bucket, alpha, signing_key[1], [a], tmp_path)


# ---- 8. sole_collector: the daemon and a hand-run `nixcache gc` on the same host ------------------------


def test_sole_collector_a_hand_run_gc_closes_the_daemons_live_record_and_its_stale_plan_deletes_repaired_paths(
    tmp_path: Path, bucket: Bucket, signing_key: Key
) -> None:
    """(Fixed: a lock file in state_dir keeps one collection per host; the hand-run one skips.)
    A provider that ignores conditional writes (the strip proxy), beta configured
    `gc.sole_collector = true` as docs/nixos.md says (collect only there). beta's daemon collects:
    open record R1, reads the bucket (two is dead: in beta's trash, no live gcinfo) — slow (a
    big bucket). Meanwhile beta's operator runs `nixcache gc` by hand on the same host: nothing
    excludes it (the lease is a plain PUT there); its `_tidy_records` closes R1 as "died open"
    and its own collection deletes two's closure. alpha roots `two` and publishes: R1 looks done,
    alpha repairs what is missing *now*, writes its gcinfo, checks again: settled. The daemon's
    collection resumes and deletes two's closure from its stale plan (its lease check made no
    request: not past half-life). alpha never looks at R1 again. I2 broken for good.
    Responsible: gc.py `_collect` (no local exclusion of two collectors in one sole_collector
    host) and `_tidy_records` (closes any open record it finds)."""
    alpha, beta, two = two_in_betas_trash(tmp_path, bucket, signing_key)

    async def go(proxy_endpoint: str) -> None:
        bcfg = cfg_of(beta.variant(proxy_endpoint, sole_collector=True))
        async with S3(bcfg.s3) as s3b:
            state_read, resume = asyncio.Event(), asyncio.Event()
            daemon_gc = Collector(bcfg, s3b)
            real_read_state = daemon_gc.read_state

            async def read_state() -> Any:
                state = await real_read_state()
                state_read.set()
                await resume.wait()
                return state

            daemon_gc.read_state = read_state  # type: ignore[method-assign]
            task = asyncio.create_task(daemon_gc.collect())
            await state_read.wait()
            by_hand = await asyncio.to_thread(run_cli, beta.variant(proxy_endpoint, sole_collector=True), "gc")
            assert by_hand.returncode == 0, by_hand.stdout + by_hand.stderr
            assert "another collection is running on this host" in by_hand.stdout, by_hand.stdout
            # alpha's publish meets the daemon's open record: it waits for it, then repairs.
            publish = asyncio.create_task(asyncio.to_thread(alpha.run, "publish"))
            await asyncio.sleep(3)
            resume.set()
            assert (await task).deleted > 0
            await publish

    with StripProxy.for_endpoint(bucket.endpoint) as proxy:
        run(go(proxy.endpoint))
    assert_whole(bucket, alpha, signing_key[1], [two], tmp_path)


# ---- 9. an abandoned record is never closed while the trash is empty: every push pays ------------------


def test_an_abandoned_record_with_an_empty_trash_stays_open_and_every_push_pays_for_it(
    tmp_path: Path, bucket: Bucket, signing_key: Key
) -> None:
    """H1's sequence: alpha's collection deletes everything (trash gcinfo included) and the network
    drops at its `.done` PUT. The docs: "the next collector, holding the lease, closes it ... so
    hosts check those paths once, and stop waiting on it". But the next collections stop at their
    first LIST (the trash is empty) and never reach `_tidy_records`; nor is any record pruned. So
    the record stays open for good, and every job of every host whose closure meets any of its
    candidates — which are *all* members of the trash gcinfo, live shared ones included — waits
    on it again (GET .done, GET lease), HEADs the hits, and LISTs the records twice. A push's
    extra cost should be one LIST; here a daemon's second push of an unchanged closure costs 7
    requests, forever. Responsible: gc.py `collect` (`if trash_objs or residual_age`: tidy only
    behind a non-empty trash) and deletions.py Tracker.conflicts (an abandoned open record is
    settled only in that job's baseline)."""
    from tests.integration.test_gc import beta_drops_two

    alpha, _beta, one, two, _shared = beta_drops_two(tmp_path, bucket, signing_key)
    cfg = cfg_of(alpha)

    collect_losing_the_network_at_the_done_record(cfg)
    assert bucket.keys("gctrash/") == [] and not bucket.has_narinfo(two), "setup"
    alpha.run("gc")  # an hour later: the next collection (the daemon's, or by hand)

    async def daemon_pushes() -> dict[str, int]:
        async with S3(cfg.s3) as s3:
            uploader = Uploader(cfg, s3, load_signing_key(cfg))
            await uploader.push([one])
            await uploader.push([one])  # re-asks once what the record made doubtful
            third = await uploader.push([one])  # nothing changed
            return dict(third.requests)

    costs = run(daemon_pushes())
    # (Fixed: the first host to wait on it finds the lease gone and closes it.)
    opened = [k for k in bucket.keys("gc/records/") if k.endswith(".open")]
    closed = [k for k in bucket.keys("gc/records/") if k.endswith(".done")]
    problems = []
    if len(closed) != len(opened):
        problems.append(f"the record that died open was never closed by the next collection: {opened}, done {closed}")
    if costs != {"ListObjectsV2": 1}:
        problems.append(f"a daemon's push of an unchanged closure cost {costs}, not one LIST")
    assert problems == [], "\n".join(problems)


# ---- 10. the conditional-write probe caches a network error as "ignored" ---------------------------------


def test_a_transient_error_during_the_probe_is_cached_as_a_provider_ignoring_conditional_writes(
    tmp_path: Path, bucket: Bucket, signing_key: Key
) -> None:
    """alpha's first collection probes conditional writes; one of the probe's PUTs fails with a
    transient error (a 503 SlowDown / a timeout past the retries). `conditional_writes` catches
    any NixcacheError as "not honoured" and caches it in state_dir/conditional-writes.json for
    good: from then on every collection on this host refuses ("this provider ignores conditional
    writes") on a provider that honours them — the daemon never collects again, until someone
    deletes that file. Responsible: lease.py conditional_writes (`except NixcacheError: honoured =
    False`, then cached)."""
    from tests.integration.test_gc import beta_drops_two

    alpha, _beta, _one, two, _shared = beta_drops_two(tmp_path, bucket, signing_key)
    cfg = cfg_of(alpha)

    async def first() -> None:
        async with S3(cfg.s3) as s3:
            real_put_if = s3.put_if

            async def put_if(key: str, body: bytes, **kw: Any) -> str | None:
                if key == "gc/probe":
                    s3.put_if = real_put_if  # type: ignore[method-assign]
                    raise S3Error(f"s3://{s3.bucket}/{key}: SlowDown (HTTP 503)")
                return await real_put_if(key, body, **kw)

            s3.put_if = put_if  # type: ignore[method-assign]
            await Collector(cfg, s3).collect()

    with pytest.raises(NixcacheError):
        run(first())
    r = run_cli(alpha.config, "gc")  # an hour later, the network is fine
    assert r.returncode == 0, r.stderr.strip().splitlines()[-1]
    assert not bucket.has_narinfo(two)


# ---- 11. a collector with a cold index leaks the NARs `nix copy` named -----------------------------------


def test_a_collector_that_has_not_indexed_a_nix_copied_path_leaks_its_nar(
    tmp_path: Path, bucket: Bucket, signing_key: Key
) -> None:
    """`c` was written by `nix copy` (its NAR named by file hash: `nar/<fileHash>.nar.xz`). beta
    roots `c`, publishes, drops it, dereferences. alpha collects (a fresh host, or any host whose
    index has not synced since `c` was written): the announce lists the NAR keys the index knows
    *before* `read_state` syncs it, so `restrict` drops `c`'s NAR from the plan (not announced,
    and a file hash is no NAR hash); c's narinfo and the trash gcinfo go. Nothing names the NAR
    and nothing will ever be a candidate for it again: leaked for good, unless residual runs (off
    by default in the daemon). Cost, not safety. Responsible: gc.py _announce_plan_delete (`known
    = self.index.urls(paths)` read from an unsynced index)."""
    alpha, beta = Host(tmp_path, bucket, signing_key[0], "alpha"), Host(tmp_path, bucket, signing_key[0], "beta")
    c = add_text(tmp_path, "copied")
    nar = nix_copy_into(bucket, c, tmp_path, signing_key[0])
    beta.root("c", c)
    beta.run("publish")
    beta.unroot("c")
    beta.run("dereference")
    alpha.run("gc")
    # (Fixed: c's NAR was not announced, so c waits — narinfo and trash gcinfo — for the next
    # collection, which announces it by the URL it has indexed meanwhile.)
    assert bucket.has_narinfo(c) and nar in bucket.keys("nar/") and bucket.gcinfos("gctrash/")
    alpha.run("gc")
    assert not bucket.has_narinfo(c) and bucket.gcinfos("gctrash/") == [], "c was collected"
    assert nar not in bucket.keys("nar/"), f"{nar}: no narinfo names it any more, and nothing will collect it"


# ---- 12. a daemon with dereference off never LISTs the records -----------------------------------------


def test_a_daemon_with_dereference_disabled_never_rechecks_a_root_a_collection_took(
    tmp_path: Path, bucket: Bucket, signing_key: Key, monkeypatch: pytest.MonkeyPatch
) -> None:
    """H2 (a publish interrupted right after its gcinfo PUT, beta's collection having taken two's
    closure in between), then alpha's daemon — configured `gc.dereference = false` (supported:
    rule 1's test) — runs. Its only LIST of gc/records/ outside jobs is inside `dereference_now`,
    behind `if self.cfg.gc.dereference` (and `roots_complete`: one unreadable roots directory
    has the same effect); its publish rounds see the gcinfo unchanged and check nothing. Rule 9:
    "The daemon LISTs the records once per dereference cycle, and a publish re-pushes every root
    whose closure holds a path a learnt record deleted". Never here: the live gcinfo lists three
    missing paths for good (I2). Responsible: service.py `_dereference_loop` / `dereference_now`
    (the records refresh gated with the dereference)."""
    alpha, beta, two = two_in_betas_trash(tmp_path, bucket, signing_key)
    interrupted_publish(alpha, beta, monkeypatch)
    assert not any(bucket.has_narinfo(p) for p in closure_of(two)), "setup: beta collected two's closure"
    config = variant(alpha, "no-dereference", gc={"dereference": False}, roots={"rescan_interval": 1})
    daemon = Daemon(config, tmp_path / "daemon.log").start()
    daemon.wait_event("roots.published", 30, count=4)
    time.sleep(2)
    assert daemon.stop() == 0
    assert_whole(bucket, alpha, signing_key[1], [two], tmp_path)

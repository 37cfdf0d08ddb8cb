"""Adversarial sequences against docs/gc.md's invariants (I1-I4) and its "when in doubt, keep".

Found by an adversarial review of the collector and the deletion records; each test asserts
what the docs promise for the sequence in its docstring (which says how it broke before the
fix: every one of them failed on that code). Interleavings are forced
in-process (real SeaweedFS, real Nix, the real classes; a method wrapped to run another
host's command at a chosen point, or to fail as a dropped connection would).
"""

from __future__ import annotations

import asyncio
import gzip
import lzma
import time
from collections.abc import Awaitable
from pathlib import Path
from typing import Any

import pytest

from nixcache.bucket import deletions, layout
from nixcache.bucket.s3 import S3
from nixcache.config import Config, load_config, load_signing_key
from nixcache.errors import S3Error
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
    hash_part,
    nix_copy_from,
    run_cli,
)
from tests.integration.test_consistency import (
    add_text,
    assert_whole,
    nix_copy_into,
)
from tests.integration.test_gc import Host, beta_drops_two

Key = tuple[Path, str]


def cfg_of(host: Host) -> Config:
    return load_config(host.config)[0]


def run(coro: Awaitable[Any]) -> Any:
    return asyncio.run(coro)  # type: ignore[arg-type]


def records(bucket: Bucket) -> list[str]:
    return sorted(k.removeprefix("gc/records/") for k in bucket.keys("gc/records/"))


def collect_losing_the_network_at_the_done_record(cfg: Config) -> None:
    """A collection that deletes, then cannot PUT its `.done` record (the network drops): its
    `.open` record stays behind."""

    async def go() -> None:
        async with S3(cfg.s3) as s3:
            real_put = s3.put

            async def put(key: str, body: bytes, *a: Any, **kw: Any) -> None:
                if key.endswith(".done"):
                    raise S3Error(f"s3://{s3.bucket}/{key}: connection reset")
                await real_put(key, body, *a, **kw)

            s3.put = put  # type: ignore[method-assign]
            await Collector(cfg, s3).collect()

    with pytest.raises(S3Error):
        run(go())


# ---- H1: an open record that is never closed ------------------------------------------------------


def test_h1_an_abandoned_deletion_record_makes_every_later_push_fail(
    tmp_path: Path, bucket: Bucket, signing_key: Key
) -> None:
    """alpha roots `one`, beta roots `two` (both reference `shared`); beta drops `two`. alpha
    collects; the network drops when it PUTs its `.done` record (or: alpha is killed -9 after its
    deletes and its lease expires). The `.open` record stays for gc.record_retention (7 days).
    Every later push or publish whose closure meets that record's candidates — which are *all*
    members of the trash gcinfos, live ones like `shared` included — waits on it, takes it as
    abandoned, "repairs", then does it again (the open record is never marked settled), and
    after MAX_REPAIRS fails: "the bucket kept changing under this push". Liveness, 7 days."""
    alpha, _beta, one, two, shared = beta_drops_two(tmp_path, bucket, signing_key)
    cfg = cfg_of(alpha)

    collect_losing_the_network_at_the_done_record(cfg)
    assert not bucket.has_narinfo(two) and bucket.has_narinfo(shared), "setup: the collection deleted two"
    assert [r.rsplit(".", 1)[1] for r in records(bucket)] == ["open"], records(bucket)

    # The network is back. A plain push of a path whose closure holds `shared`:
    started = time.monotonic()
    r = run_cli(alpha.config, "push", one)
    took = time.monotonic() - started
    assert r.returncode == 0, f"push of `one` failed after {took:.1f}s:\n{r.stderr[-1500:]}"
    # and a publish of a new root holding `shared`:
    alpha.root("two-again", two)
    r = run_cli(alpha.config, "publish")
    assert r.returncode == 0, f"publish failed:\n{r.stdout}{r.stderr[-1500:]}"


# ---- H2: a publish interrupted after its gcinfo PUT ------------------------------------------------


def interrupted_publish(alpha: Host, beta: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    """alpha publishes (root `two`, all present). Between its pre-check and its gcinfo PUT, beta
    collects (two's closure is in beta's trash and alpha's gcinfo is not written yet). Right
    after the PUT the network drops: the LIST of gc/records/ that should follow fails."""
    cfg = cfg_of(alpha)

    async def down(_bucket: S3) -> deletions.View:
        raise S3Error("gc/records/: connection reset")

    async def go() -> None:
        async with S3(cfg.s3) as s3:
            real_put = s3.put

            async def put(key: str, body: bytes, *a: Any, **kw: Any) -> None:
                if key.startswith("gcroots/alpha/") and key.endswith(layout.GCINFO_SUFFIX):
                    beta.run("gc")
                    await real_put(key, body, *a, **kw)
                    monkeypatch.setattr(deletions, "list_records", down)
                    return
                await real_put(key, body, *a, **kw)

            s3.put = put  # type: ignore[method-assign]
            selected, _ = await local_roots(cfg)
            await Publisher(cfg).publish(Uploader(cfg, s3, load_signing_key(cfg)), selected)

    with pytest.raises(S3Error):
        run(go())
    monkeypatch.undo()


def two_in_betas_trash(tmp_path: Path, bucket: Bucket, signing_key: Key) -> tuple[Host, Host, str]:
    _one, two, _shared = build_pair(tmp_path)
    alpha = Host(tmp_path, bucket, signing_key[0], "alpha", collect=False, dereference_interval=1)
    beta = Host(tmp_path, bucket, signing_key[0], "beta")
    beta.root("two", two)
    beta.run("publish")
    beta.unroot("two")
    beta.run("dereference")
    alpha.root("two", two)
    return alpha, beta, two


def test_h2_a_publish_interrupted_after_its_gcinfo_put_is_never_repaired_by_publishing_again(
    tmp_path: Path, bucket: Bucket, signing_key: Key, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sequence: beta publishes `two`, drops it, dereferences. alpha roots `two` and runs
    `nixcache publish`: pre-check (no records) → [beta: gc deletes two's closure] → alpha's
    gcinfo PUT → the records LIST fails (network; equally Ctrl-C / kill -9 there), exit 1. The
    user runs `nixcache publish` again: "published 0, unchanged 1", exit 0 — the unchanged gcinfo
    is skipped because `touched` (Tracker.deleted) is taken before any LIST in a fresh process,
    so it is always empty for the CLI. I2 broken for good: a live gcinfo lists 3 missing paths."""
    alpha, beta, two = two_in_betas_trash(tmp_path, bucket, signing_key)
    interrupted_publish(alpha, beta, monkeypatch)
    assert not any(bucket.has_narinfo(p) for p in closure_of(two)), "setup: beta collected two's closure"
    alpha.run("publish")
    assert_whole(bucket, alpha, signing_key[1], [two], tmp_path)


def test_h2b_after_any_cli_push_the_daemon_never_repairs_it_either(
    tmp_path: Path, bucket: Bucket, signing_key: Key, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The same interrupted publish; then `nixcache push <anything>` on alpha (same state_dir):
    its check LISTs the records, GETs beta's done record and saves its id as seen in
    deletion-records.json — but what it learnt (`deleted`) lives in memory and dies with the
    CLI. alpha's daemon then starts: the record is "seen", its roots unchanged, so neither its
    dereference cycles (refresh: nothing fresh) nor its publish rounds ever re-check `two`.
    (Same in one daemon: a worker's check saves the id, then a restart before the roots loop
    took `deleted`.) I2 broken for good."""
    alpha, beta, two = two_in_betas_trash(tmp_path, bucket, signing_key)
    interrupted_publish(alpha, beta, monkeypatch)
    alpha.run("push", add_text(tmp_path, "unrelated"))
    daemon = Daemon(alpha.config, tmp_path / "daemon.log").start()
    daemon.wait_event("dereference.done", 30, count=3)
    daemon.wait_event("roots.published", 30)
    assert daemon.stop() == 0
    assert_whole(bucket, alpha, signing_key[1], [two], tmp_path)


# ---- H3: residual and a narinfo nixcache cannot parse ----------------------------------------------


def test_h3_residual_deletes_the_nar_of_a_rooted_narinfo_it_cannot_parse(
    tmp_path: Path, bucket: Bucket, signing_key: Key
) -> None:
    """`nix copy --to 's3://…?narinfo-compression=xz'` stores narinfos xz-compressed with
    `Content-Encoding: xz` (Nix reads them fine: HTTP decompresses). nixcache GETs the raw bytes:
    not UTF-8 → UNREADABLE. alpha roots that path and publishes (present: not pushed again).
    `nixcache residual --older-than 0s`: no narinfo is doomed, so plan_collection never raises
    UnsafeToCollect (`if e.url is None and doomed`), and the residual NAR sweep deletes every old
    NAR no *readable* narinfo names — the rooted path's NAR (named by file hash, so not covered by
    the live member's NAR hash either). I1 broken for a rooted path; "when in doubt, keep" not
    applied."""
    alpha = Host(tmp_path, bucket, signing_key[0], "alpha")
    copied = add_text(tmp_path, "copied")
    nar = nix_copy_into(bucket, copied, tmp_path, signing_key[0])
    key = f"{hash_part(copied)}.narinfo"
    text = bucket.get(key)
    assert text is not None
    bucket.client.put_object(Bucket=bucket.name, Key=key, Body=lzma.compress(text),
                             ContentType="text/x-nix-narinfo", ContentEncoding="xz")  # fmt: skip
    alpha.root("copied", copied)
    alpha.run("publish")
    before = nix_copy_from(bucket, [copied], tmp_path / "client-before", signing_key[1])
    assert before.returncode == 0, f"setup: Nix substitutes the compressed narinfo: {before.stderr}"
    out = alpha.run("residual", "--older-than", "0s").stdout
    problems = []
    if bucket.get(nar) is None:
        problems.append(f"residual deleted {nar}, the NAR of the rooted {key}: {out.splitlines()[0]}")
    after = nix_copy_from(bucket, [copied], tmp_path / "client-after", signing_key[1])
    if after.returncode != 0:
        problems.append(f"the rooted path no longer substitutes: {after.stderr.strip()[-300:]}")
    assert problems == [], "\n".join(problems)


# ---- H4: untrash ------------------------------------------------------------------------------------


def test_h4_untrash_after_a_partial_collection_leaves_a_live_gcinfo_with_missing_paths(
    tmp_path: Path, bucket: Bucket, signing_key: Key, monkeypatch: pytest.MonkeyPatch
) -> None:
    """alpha roots `two`, publishes, drops it, dereferences. alpha's gc deletes two's narinfos,
    then fails on the NAR batch (network; or kill -9 between batches): the trash gcinfo stays
    (trash last). alpha re-roots `two` and runs `nixcache untrash two` (README: "move back from
    the trash"), then `nixcache publish`: "unchanged 1" — untrash copied a gcinfo listing deleted
    paths into gcroots/ without any check (no LIST of gc/records/ after that write, rule 9), and
    publish trusts an unchanged gcinfo. I2 broken after the publish finished. (Without untrash,
    publish would have pushed the closure again.)"""
    _one, two, _shared = build_pair(tmp_path)
    alpha = Host(tmp_path, bucket, signing_key[0], "alpha")
    alpha.root("two", two)
    alpha.run("publish")
    alpha.unroot("two")
    alpha.run("dereference")
    cfg = cfg_of(alpha)

    async def collect_failing_at_the_nars() -> None:
        async with S3(cfg.s3) as s3:
            real = s3.delete_many

            async def delete_many(keys: list[str]) -> None:
                if any(k.startswith("nar/") for k in keys):
                    raise S3Error("nar/: connection reset")
                await real(keys)

            s3.delete_many = delete_many  # type: ignore[method-assign]
            await Collector(cfg, s3).collect()

    with pytest.raises(S3Error):
        run(collect_failing_at_the_nars())
    assert not any(bucket.has_narinfo(p) for p in closure_of(two)) and bucket.gcinfos("gctrash/"), "setup"
    alpha.root("two", two)
    alpha.run("untrash", two)
    alpha.run("publish")
    assert_whole(bucket, alpha, signing_key[1], [two], tmp_path)


# ---- H6: a job that outlives gc.record_retention -----------------------------------------------------


def test_h6_a_push_suspended_longer_than_record_retention_misses_the_deletion(
    tmp_path: Path, bucket: Bucket, signing_key: Key
) -> None:
    """gc.record_retention = 4s here stands for 7 days. alpha pushes `two`: `shared` is found
    present (beta published `one`), then alpha is suspended (laptop lid) before it writes two's
    narinfo. beta drops `one` and collects (deleting `shared`); a later collection prunes the
    records as old. alpha resumes, writes two's narinfo (referencing `shared`) and LISTs the
    records: none, so nothing to repair; the push succeeds. The staleness rule ("not listed for
    half the retention: forget") is applied by forget() only *after* conflicts() has answered.
    I1 broken for good (a daemon never re-checks a pushed path)."""
    one, two, shared = build_pair(tmp_path)
    beta = Host(tmp_path, bucket, signing_key[0], "beta", record_retention=4)
    alpha = Host(tmp_path, bucket, signing_key[0], "alpha", record_retention=4)
    beta.root("one", one)
    beta.run("publish")
    cfg = cfg_of(alpha)
    two_key = f"{hash_part(two)}.narinfo"
    stray = add_text(tmp_path, "stray")

    async def suspended_push() -> None:
        async with S3(cfg.s3) as s3:
            real_put = s3.put

            async def put(key: str, body: bytes, *a: Any, **kw: Any) -> None:
                if key == two_key:
                    beta.unroot("one")
                    beta.run("dereference")
                    beta.run("gc")
                    time.sleep(5)  # noqa: ASYNC251  (the suspension freezes the whole process)
                    # Any later collection prunes the records older than the retention:
                    beta.root("stray", stray)
                    beta.run("publish")
                    beta.unroot("stray")
                    beta.run("dereference")
                    beta.run("gc")
                await real_put(key, body, *a, **kw)

            s3.put = put  # type: ignore[method-assign]
            await Uploader(cfg, s3, load_signing_key(cfg)).push([two])

    run(suspended_push())
    assert bucket.has_narinfo(two) and bucket.has_narinfo(shared), "shared, collected meanwhile, is back"
    assert_whole(bucket, alpha, signing_key[1], [two], tmp_path)


# ---- H7: a stale "present" re-added after the eviction (I4) -------------------------------------------


def test_h7_a_presence_answered_before_a_deletion_and_cached_after_its_eviction_reaches_a_gcinfo(
    tmp_path: Path, bucket: Bucket, signing_key: Key
) -> None:
    """One daemon-like process of alpha (one Uploader, concurrent jobs); beta published `one`.
    Job A pushes `two`: its presence check for `shared` is answered "present", but the answer
    reaches A late (a slow link; or `_filter_present`'s multi-page LIST, whose result is cached
    only after the last page). Meanwhile beta drops `one` and collects (`shared` goes), and job B
    (an unrelated push) LISTs the records: `shared` is evicted from the presence cache — it was
    not there yet. Then A caches `shared` as present: nothing will ever evict it again (the record
    is now "seen"). A's upload of two's narinfo fails (transient error), so A never runs its
    check. Job C publishes alpha's root `one`: `shared` "present" → skipped; settled includes
    beta's record → no repair; gcinfo written. A is retried: same. I4 (and I1, I2), for the life
    of the process."""
    one, two, shared = build_pair(tmp_path)
    beta = Host(tmp_path, bucket, signing_key[0], "beta")
    beta.root("one", one)
    beta.run("publish")
    alpha = Host(tmp_path, bucket, signing_key[0], "alpha")
    alpha.root("one", one)
    unrelated = add_text(tmp_path, "unrelated")
    cfg = cfg_of(alpha)
    shared_key, two_key = layout.narinfo_key(shared), layout.narinfo_key(two)

    def beta_collects_one() -> None:
        beta.unroot("one")
        beta.run("dereference")
        beta.run("gc")

    async def go() -> None:
        async with S3(cfg.s3) as s3:
            uploader = Uploader(cfg, s3, load_signing_key(cfg))
            real_exists, real_put = s3.exists, s3.put
            answered, resume = asyncio.Event(), asyncio.Event()
            network = {"two_fails": True}

            async def exists(key: str) -> bool:
                present = await real_exists(key)
                if key == shared_key and not resume.is_set():
                    answered.set()
                    await resume.wait()  # the answer ("present") reaches job A late
                return present

            async def put(key: str, body: bytes, *a: Any, **kw: Any) -> None:
                if key == two_key and network["two_fails"]:
                    raise S3Error(f"s3://{s3.bucket}/{key}: connection reset")
                await real_put(key, body, *a, **kw)

            s3.exists = exists  # type: ignore[method-assign]
            s3.put = put  # type: ignore[method-assign]
            job_a = asyncio.create_task(uploader.push([two]))
            await answered.wait()
            await asyncio.to_thread(beta_collects_one)
            assert not bucket.has_narinfo(shared), "setup: beta collected shared"
            await uploader.push([unrelated])  # job B: its check learns beta's record
            resume.set()
            with pytest.raises(S3Error):
                await job_a  # fails before its own check; a daemon retries it later
            selected, _ = await local_roots(cfg)
            published = await Publisher(cfg).publish(uploader, selected)  # job C
            assert published.published == [one], published
            network["two_fails"] = False
            await uploader.push([two])  # job A, retried
            assert shared in uploader.known_present

    run(go())
    assert_whole(bucket, alpha, signing_key[1], [one, two], tmp_path)


# ---- H8: a NAR deleted under a narinfo whose writer died before its check ------------------------------


class Killed(Exception):
    """Stands for kill -9 of the pushing process at that point."""


def test_h8_a_nar_deleted_under_a_fresh_narinfo_is_never_repaired_by_the_retry(
    tmp_path: Path, bucket: Bucket, signing_key: Key
) -> None:
    """`a` and `b` have identical contents (one NAR). beta roots `b`, publishes, drops it,
    dereferences. alpha pushes `a` (NAR rewritten, then narinfo) while beta collects: beta's reads
    come before a's narinfo, its deletes after (docs/gc.md "What remains" #2) — and alpha is
    killed right after writing a's narinfo, before its check. "What remains" #1 says the retry
    asks the bucket again and re-uploads; but the retry finds a's *narinfo* present, writes no
    NAR, and checks the done record only for the paths of its closure (a's narinfo was not
    deleted) and for NARs *it wrote* (none). `nixcache push a` exits 0; a's narinfo names a
    deleted NAR for good (I1)."""
    from tests.integration.test_consistency import same_content_pair

    a, b = same_content_pair(tmp_path)
    alpha, beta = Host(tmp_path, bucket, signing_key[0], "alpha"), Host(tmp_path, bucket, signing_key[0], "beta")
    beta.root("b", b)
    beta.run("publish")
    beta.unroot("b")
    beta.run("dereference")
    acfg, bcfg = cfg_of(alpha), cfg_of(beta)
    a_key = layout.narinfo_key(a)

    async def go() -> None:
        async with S3(acfg.s3) as s3a, S3(bcfg.s3) as s3b:
            state_read, narinfo_written = asyncio.Event(), asyncio.Event()
            collector = Collector(bcfg, s3b)
            real_read_state = collector.read_state

            async def read_state() -> Any:
                state = await real_read_state()
                state_read.set()
                await narinfo_written.wait()
                return state

            collector.read_state = read_state  # type: ignore[method-assign]
            gc = asyncio.create_task(collector.collect())
            real_put = s3a.put

            async def put(key: str, body: bytes, *args: Any, **kw: Any) -> None:
                if key == a_key:
                    await state_read.wait()
                    await real_put(key, body, *args, **kw)
                    narinfo_written.set()
                    await gc
                    raise Killed
                await real_put(key, body, *args, **kw)

            s3a.put = put  # type: ignore[method-assign]
            with pytest.raises(Killed):
                await Uploader(acfg, s3a, load_signing_key(acfg)).push([a])
            assert (await gc).deleted > 0

    run(go())
    assert bucket.has_narinfo(a) and dangling_narinfos(bucket), "setup: a's NAR went under its narinfo"
    retry = alpha.run("push", a).stdout  # the retry after the restart
    assert "1 uploaded" in retry, retry
    assert_whole(bucket, alpha, signing_key[1], [a], tmp_path)


# ---- H9: one record this version cannot parse stops every host ------------------------------------------


def test_h9_one_unreadable_deletion_record_fails_every_push_and_publish_of_every_host(
    tmp_path: Path, bucket: Bucket, signing_key: Key
) -> None:
    """A record under gc/records/ that does not parse (another nixcache version's format, a
    foreign tool, a bad upload): Tracker.refresh raises NixcacheError on it, so every push's and
    publish's check fails — every host, new ones too (open records are GET even when primed) —
    until a collection prunes it by age (gc.record_retention, 7 days). Nothing in it could be
    relied on, so the safe reading would be "anything may be deleted", not "nothing works"."""
    one, _two, _shared = build_pair(tmp_path)
    alpha = Host(tmp_path, bucket, signing_key[0], "alpha")
    bucket.client.put_object(Bucket=bucket.name, Key="gc/records/20990101T000000Z-gamma-v2.open",
                             Body=gzip.compress(b'{"id": "x", "version": 2, "candidates": []}'))  # fmt: skip
    r = run_cli(alpha.config, "push", one)
    assert r.returncode == 0, r.stderr.strip().splitlines()[-1]

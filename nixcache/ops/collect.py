"""Garbage collection of the bucket by GC roots: the execution (the plan is gcplan.py).

One collection: LIST the trash (empty: done, one request); probe once that the provider
honours conditional writes; take the lease; announce what may go (deletion record, open);
read the gcinfos and every narinfo (index) and NAR; plan; delete in order, renewing the
lease before each batch; record what went (deletion record, done); release the lease. The
safety argument is docs/gc.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from nixcache.bucket import deletions, layout, lease, s3
from nixcache.bucket.deletions import Record
from nixcache.bucket.inventory import UNREADABLE, Edges, Obj, gcinfo_listing, listing
from nixcache.bucket.narindex import NarIndex
from nixcache.config import Config
from nixcache.errors import NixcacheError
from nixcache.formats.gcinfo import Gcinfo, GcinfoError, Member, parse
from nixcache.logs import get
from nixcache.ops.plan import Plan, candidates_of, plan_collection
from nixcache.progress import silent

log = get("nixcache.ops.collect")

ProgressFn = Callable[..., None]  # (text, done=0, total=0)


class GcinfoCache:
    """Raw gcinfos on local disk keyed by ETag: an unchanged gcinfo is downloaded once."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.downloads = 0
        self.members: dict[str, Member] = {}
        """one Member per distinct line, shared by every gcinfo read through this cache."""

    async def read(self, bucket: s3.S3, obj: Obj) -> Gcinfo:
        """Decompressing, parsing and the cache's file I/O run in a thread: a daemon's event
        loop keeps answering (status, the watchdog, uploads) while it collects."""
        path = self.dir / obj.etag if obj.etag.isalnum() else None
        cached = await asyncio.to_thread(self._read_cached, path, obj.key)
        if cached is not None:
            self.hits += 1
            return cached
        got = await bucket.get_with_etag(obj.key)
        if got is None:
            raise GcinfoError(f"{obj.key}: listed but gone when read (changed under us); retry later")
        self.downloads += 1
        keep = path if path is not None and got[1].strip('"') == obj.etag else None
        return await asyncio.to_thread(self._parse_and_keep, got[0], obj.key, keep)

    def _read_cached(self, path: Path | None, key: str) -> Gcinfo | None:
        if path is None or not path.exists():
            return None
        return parse(path.read_bytes(), key, self.members)

    def _parse_and_keep(self, data: bytes, key: str, path: Path | None) -> Gcinfo:
        gcinfo = parse(data, key, self.members)  # never cache what does not parse
        if path is not None:
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return gcinfo

    def prune(self, keep: Iterable[str]) -> None:
        wanted = set(keep)
        for f in self.dir.iterdir():
            if f.name not in wanted:
                f.unlink(missing_ok=True)


@dataclass
class GcResult:
    skipped: str | None = None
    plan: Plan = field(default_factory=Plan)
    gcinfos_read: int = 0
    gcinfos_cached: int = 0
    narinfos_read: int = 0
    deleted: int = 0
    record: str | None = None
    requests: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0


@dataclass
class State:
    """What the collector reads of the bucket before it plans."""

    live: dict[str, Gcinfo]
    narinfos: dict[str, Obj]
    edges: dict[str, Edges]
    nars: dict[str, Obj]
    live_objs: dict[str, Obj]


def unsafe_provider(bucket: s3.S3) -> str:
    return (
        f"s3://{bucket.bucket}: this provider ignores conditional writes (If-None-Match/If-Match on PUT), "
        "so the lease cannot keep a second collector out. Collect on one host only: set gc.sole_collector = true "
        "there and gc.collect = false everywhere else (docs/nixos.md, providers)"
    )


class Collector:
    def __init__(self, cfg: Config, bucket: s3.S3, progress: ProgressFn = silent) -> None:
        self.cfg = cfg
        self.bucket = bucket
        self.cache = GcinfoCache(cfg.state_dir / "gcinfo-cache")
        self.index = NarIndex(cfg.state_dir / "narinfo-index.sqlite")
        self.progress = progress
        self._live_etags: set[str] = set()
        self._trash_mtimes: dict[str, float] = {}

    async def read_gcinfos(self, objs: dict[str, Obj]) -> dict[str, Gcinfo]:
        out = {}
        for n, (key, obj) in enumerate(sorted(objs.items()), 1):
            out[key] = await self.cache.read(self.bucket, obj)
            self.progress("reading gcinfos", n, len(objs))
        return out

    async def bucket_objects(self) -> tuple[dict[str, Obj], dict[str, Obj]]:
        """Every narinfo (by hash part) and every NAR (by key), from two LISTs side by side."""
        self.progress("listing narinfos and NARs")
        top, nar_listing = await asyncio.gather(listing(self.bucket, "", "/"), listing(self.bucket, layout.NAR_PREFIX))
        narinfos = {h: o for o in top.values() if (h := layout.hash_of_narinfo_key(o.key))}
        return narinfos, {k: o for k, o in nar_listing.items() if k.startswith(layout.NAR_PREFIX)}

    async def read_state(self) -> State:
        live_objs = await gcinfo_listing(self.bucket, layout.ROOTS_PREFIX)
        live = await self.read_gcinfos(live_objs)
        self.cache.members.clear()  # the gcinfos hold their members; the lines can go
        narinfos, nars = await self.bucket_objects()
        edges = await self.index.sync(self.bucket, narinfos, self.progress)
        for h in [h for h in narinfos if h not in edges]:  # gone between LIST and GET
            del narinfos[h]
        self._live_etags = {o.etag for o in live_objs.values()}
        return State(live, narinfos, edges, nars, live_objs)

    async def _plan(self, trash: dict[str, Gcinfo], state: State, residual_age: float | None) -> Plan:
        """Plan in a thread (seconds for 100,000 narinfos: the event loop must not wait)."""
        return await asyncio.to_thread(
            plan_collection, trash, state.live, state.narinfos, state.edges, state.nars, time.time(),
            self.cfg.gc.grace_period, residual_age, self._trash_mtimes,
        )  # fmt: skip

    async def collect(
        self,
        dry_run: bool = False,
        holder: str | None = None,
        residual_age: float | None = None,
        trash: bool = True,
    ) -> GcResult:
        """One collection (of the trash, and of residual objects when ``residual_age`` is set).
        Raises NixcacheError, with nothing deleted, on any unreadable gcinfo or narinfo that
        matters, and LeaseLost if it lost its lease part way (what it deleted is recorded)."""
        started = time.monotonic()
        result = GcResult()
        with s3.job_requests() as counter:
            try:
                trash_objs = await gcinfo_listing(self.bucket, layout.TRASH_PREFIX) if trash else {}
                if trash_objs or residual_age is not None:  # an empty trash costs that one LIST
                    with self._local_lock(dry_run) as other:
                        if other:
                            result.skipped = "another collection is running on this host"
                        else:
                            await self._collect(trash_objs, dry_run, holder, residual_age, result)
            finally:
                result.requests = counter
                result.seconds = time.monotonic() - started
        return result

    @contextlib.contextmanager
    def _local_lock(self, dry_run: bool) -> Iterator[bool]:
        """One collection at a time on this host (the daemon's and a hand-run one), whatever
        the provider: the lease alone cannot tell them apart where conditional writes are
        ignored (gc.sole_collector). Yields True if another one holds it."""
        if dry_run:
            yield False
            return
        path = self.cfg.state_dir / "collect.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield True
                return
            try:
                yield False
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    async def _collect(
        self,
        trash_objs: dict[str, Obj],
        dry_run: bool,
        holder: str | None,
        residual_age: float | None,
        result: GcResult,
    ) -> None:
        held: lease.Lease | None = None
        rid = deletions.new_id(self.cfg.hostname)
        if not dry_run:
            probe_cache = self.cfg.state_dir / "conditional-writes.json"
            if not await lease.conditional_writes(self.bucket, probe_cache) and not self.cfg.gc.sole_collector:
                raise NixcacheError(unsafe_provider(self.bucket))
            got = await lease.acquire(
                self.bucket, holder or f"{self.cfg.hostname}:{os.getpid()}", self.cfg.gc.lease_ttl, record=rid
            )
            if isinstance(got, str):
                result.skipped = f"lease held by {got}"
                return
            held = got
        self._trash_mtimes = {k: o.mtime for k, o in trash_objs.items()}
        try:
            trash = await self.read_gcinfos(trash_objs)
            if dry_run:
                state = await self.read_state()
                result.plan = await self._plan(trash, state, residual_age)
            else:
                assert held is not None
                await self._announce_plan_delete(trash, residual_age, rid, held, result)
            self.cache.prune([*(o.etag for o in trash_objs.values()), *self._live_etags])
            result.gcinfos_read = self.cache.downloads
            result.gcinfos_cached = self.cache.hits
            result.narinfos_read = self.index.downloads
        finally:
            if held is not None:
                await lease.release(self.bucket, held)

    async def _announce_plan_delete(
        self, trash: dict[str, Gcinfo], residual_age: float | None, rid: str, held: lease.Lease, result: GcResult
    ) -> None:
        """Write the open deletion record *before* reading what justifies any deletion, plan
        only within what it announced, delete, and close the record with what went —
        whatever happens once it is open (docs/gc.md, rule 9)."""
        paths, nar_hashes = candidates_of(trash)
        nar_keys: set[str] = set()
        if residual_age is not None:  # residual candidates are only known from a first read
            first = await self._plan(trash, await self.read_state(), residual_age)
            paths |= first.paths()
            nar_keys |= set(first.nars)
        if not paths and not nar_keys:  # trash gcinfos with no members: nothing to announce
            result.plan = Plan(trash=sorted(trash))
            await self._delete(result, held, set(), set())
            return
        await self._tidy_records()
        known = await asyncio.to_thread(self.index.urls, paths)  # NARs named otherwise than by narHash
        announced = Record(rid, frozenset(paths), frozenset(nar_hashes), frozenset(nar_keys | known))
        await self.bucket.put(deletions.open_key(rid), announced.render(), "application/gzip")
        gone_paths: set[str] = set()
        gone_nars: set[str] = set()
        try:
            state = await self.read_state()
            await lease.hold(self.bucket, held)
            result.plan = restrict(await self._plan(trash, state, residual_age), announced, state.edges, trash)
            await self._delete(result, held, gone_paths, gone_nars)
        finally:
            done = Record(rid, frozenset(gone_paths), frozenset(), frozenset(gone_nars))
            await self.bucket.put(deletions.done_key(rid), done.render(), "application/gzip")
            result.record = rid

    async def _delete(self, result: GcResult, held: lease.Lease, gone_paths: set[str], gone_nars: set[str]) -> None:
        """Each batch completes before the next starts (separate requests): narinfos with
        referrers first, so no narinfo that stays names a deleted one; then the NARs, so no
        narinfo names a deleted NAR; the trash gcinfos last, so a crash anywhere leaves the
        trash in place and the next collection redoes what is left. The lease is checked
        (renewed past half-life) before each batch. A batch counts as gone from the moment it
        is sent (``gone_*``: what the done record reports), in case it fails half-way."""
        plan = result.plan
        # Referrers first, in requests of up to 1000 keys: one request per layer would keep
        # the order inside a request too, at one request per level of the dead graph (a deep
        # closure: dozens); a request cut short can only leave a dead narinfo whose dead
        # reference went, and the next collection finishes it (docs/gc.md, rule 6).
        phases = [("narinfos", plan.narinfos), ("nars", plan.nars), ("trash", plan.trash)]
        total = len(plan.objects())
        for phase, keys in phases:
            for start in range(0, len(keys), 1000):
                batch = keys[start : start + 1000]
                await lease.hold(self.bucket, held)
                if phase == "narinfos":
                    gone_paths.update(k.removesuffix(".narinfo") for k in batch)
                elif phase == "nars":
                    gone_nars.update(batch)
                await self.bucket.delete_many(batch)
                result.deleted += len(batch)
                self.progress(f"deleting {phase}", result.deleted, total)
                log.info("gc.deleted_batch", phase=phase, objects=len(batch), deleted=result.deleted)

    async def _tidy_records(self) -> None:
        """With the lease held, before announcing: close the records of collections that
        died open (their collector no longer holds the lease, so it deletes nothing more:
        what it announced is recorded as deleted, and hosts check it), and delete records
        older than gc.record_retention. One LIST; a GET and a PUT per dead collection."""
        objs = await listing(self.bucket, deletions.PREFIX)
        done = {k[: -len(deletions.DONE)] for k in objs if k.endswith(deletions.DONE)}
        for key in sorted(objs):
            rid = key[len(deletions.PREFIX) : -len(deletions.OPEN)]
            if key.endswith(deletions.OPEN) and key[: -len(deletions.OPEN)] not in done:
                data = await self.bucket.get(key)
                if data is not None:
                    await self.bucket.put(deletions.done_key(rid), data, "application/gzip")
                    log.warning("gc.closed_abandoned_record", record=rid)
        old = time.time() - self.cfg.gc.record_retention
        stale = [o.key for o in objs.values() if o.mtime < old]
        if stale:
            await self.bucket.delete_many(stale)


def restrict(plan: Plan, announced: Record, edges: Mapping[str, Edges], trash: Mapping[str, Gcinfo]) -> Plan:
    """Keep only deletions the open record announced (pure): anything else may be what a
    host wrote after the record and relied on, unseen by it. A path whose NAR (by its URL)
    was not announced keeps its narinfo, and its trash gcinfo, for the next collection —
    which announces it — rather than leaving that NAR behind for good."""
    nars = [k for k in plan.nars if announced.hits((), (k,))]
    unannounced = set(plan.nars) - set(nars)
    waiting = {h for h in plan.paths() if (url := edges.get(h, UNREADABLE).url) and url in unannounced}
    layers = (
        [k for k in layer if (h := k.removesuffix(".narinfo")) in announced.paths and h not in waiting]
        for layer in plan.narinfo_layers
    )
    plan.narinfo_layers = [layer for layer in layers if layer]
    plan.nars = nars
    plan.trash = [k for k in plan.trash if not any(m.hash_part in waiting for m in trash[k].members)]
    return plan

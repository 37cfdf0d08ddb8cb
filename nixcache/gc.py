"""Garbage collection of the bucket by GC roots: planning (pure) and execution.

dead = closure(trash gcinfos) - closure(live gcinfos of every host), then, for each dead
path, its narinfo and — unless a live path shares it or it is too young — its NAR. The safety
argument is in docs/gc.md; every rule there is a branch of :func:`plan_collection`.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from nixcache import layout, s3
from nixcache.config import Config
from nixcache.gcinfo import Gcinfo, GcinfoError, Member, parse
from nixcache.logs import get
from nixcache.progress import silent
from nixcache.uploader import LIST_COST_IN_HEADS

log = get("nixcache.gc")

ProgressFn = Callable[..., None]  # (text, done=0, total=0)


@dataclass(frozen=True)
class Obj:
    """An object from a LIST: key, size, last modification (epoch seconds), ETag."""

    key: str
    size: int
    mtime: float
    etag: str = ""

    @classmethod
    def from_listing(cls, entry: dict[str, Any]) -> Obj:
        modified = entry.get("LastModified")
        mtime = modified.timestamp() if isinstance(modified, datetime) else 0.0
        return cls(str(entry["Key"]), int(entry.get("Size", 0)), mtime, str(entry.get("ETag", "")).strip('"'))


@dataclass
class Plan:
    narinfos: list[str] = field(default_factory=list)
    nars: list[str] = field(default_factory=list)
    trash: list[str] = field(default_factory=list)
    dead_paths: int = 0
    kept_young: int = 0
    kept_shared_nar: int = 0
    nar_hash_unknown: int = 0
    bytes: int = 0

    def objects(self) -> list[str]:
        """Deletion order: narinfos, then NARs, then the trash gcinfos (see docs/gc.md)."""
        return [*self.narinfos, *self.nars, *self.trash]


def dead_members(trash: dict[str, Gcinfo], live: dict[str, Gcinfo]) -> dict[str, Member]:
    """closure(trash) - closure(live), by narinfo hash (pure)."""
    live_hashes = {m.hash_part for g in live.values() for m in g.members}
    dead: dict[str, Member] = {}
    for g in trash.values():
        for m in g.members:
            if m.hash_part not in live_hashes and (m.hash_part not in dead or m.nar_hash):
                dead[m.hash_part] = m
    return dead


def use_heads(n_dead: int, n_known_paths: int) -> bool:
    """Ask about the dead paths' objects one HEAD each (narinfo + NAR), or LIST the bucket?
    The bucket holds about ``n_known_paths`` narinfos and as many NARs; a LIST page (1000
    keys) costs about LIST_COST_IN_HEADS HEADs."""
    pages = 2 * (n_known_paths // 1000 + 1)
    return 2 * n_dead < pages * LIST_COST_IN_HEADS


def plan_collection(
    trash: dict[str, Gcinfo],
    live: dict[str, Gcinfo],
    narinfos: dict[str, Obj],
    nars: dict[str, Obj],
    now: float,
    grace: float,
) -> Plan:
    """What a collection deletes (pure). ``narinfos`` is keyed by hash part, ``nars`` by key."""
    plan = Plan()
    protected_nars = {m.nar_hash for g in live.values() for m in g.members if m.nar_hash}
    # A live member without a NAR hash (the original tool's format) could share any NAR.
    live_nars_known = all(m.nar_hash for g in live.values() for m in g.members)

    def young(obj: Obj | None) -> bool:
        return obj is not None and now - obj.mtime < grace

    dead = dead_members(trash, live)
    plan.dead_paths = len(dead)
    kept: set[str] = set()
    for h, m in dead.items():
        if young(narinfos.get(h)) or any(young(nars.get(k)) for k in layout.nar_candidates(m.nar_hash or "")):
            kept.add(h)
            if m.nar_hash:
                protected_nars.add(m.nar_hash)
    plan.kept_young = len(kept)
    planned_nars: set[str] = set()

    for h, m in sorted(dead.items()):
        if h in kept:
            continue
        obj = narinfos.get(h)
        if obj is not None:
            plan.narinfos.append(obj.key)
            plan.bytes += obj.size
        if m.nar_hash is None:
            plan.nar_hash_unknown += 1  # left to `nixcache residual`
            continue
        if m.nar_hash in protected_nars or not live_nars_known:
            plan.kept_shared_nar += 1
            continue
        for key in layout.nar_candidates(m.nar_hash):
            nar = nars.get(key)
            if nar is not None and key not in planned_nars:  # dead paths may share a NAR
                planned_nars.add(key)
                plan.nars.append(key)
                plan.bytes += nar.size
    # A trash gcinfo goes only once all its dead members are gone: one with a member kept for
    # being young stays, so a later collection (after the grace period) still finds it. One
    # whose twin is still in gcroots/ is being moved right now (dereference copies, then
    # deletes): its members looked live only because of that twin, so it stays for next time.
    for key, g in sorted(trash.items()):
        twin = layout.ROOTS_PREFIX + key[len(layout.TRASH_PREFIX) :]
        if not any(m.hash_part in kept for m in g.members) and twin not in live:
            plan.trash.append(key)
    return plan


@dataclass
class Residual:
    narinfos: list[str] = field(default_factory=list)
    nars: list[str] = field(default_factory=list)
    bytes: int = 0


def plan_residual(
    live: dict[str, Gcinfo],
    narinfos: dict[str, Obj],
    nars: dict[str, Obj],
    urls_of_unlisted: dict[str, str | None],
    now: float,
    older_than: float,
) -> Residual:
    """Objects no live root accounts for, older than ``older_than`` (pure).

    ``urls_of_unlisted``: for every narinfo that stays and is in no live gcinfo with a NAR
    hash, the NAR URL it names (None if it could not be read: then no NAR is deleted)."""
    plan = Residual()
    live_members = {m.hash_part: m for g in live.values() for m in g.members}
    kept_nars: set[str] = set()
    for h, obj in sorted(narinfos.items()):
        member = live_members.get(h)
        if member is None and now - obj.mtime >= older_than:
            plan.narinfos.append(obj.key)
            plan.bytes += obj.size
            continue
        if member is not None and member.nar_hash:
            kept_nars.update(layout.nar_candidates(member.nar_hash))
        elif h in urls_of_unlisted:
            url = urls_of_unlisted[h]
            if url is None:
                return Residual(narinfos=plan.narinfos, bytes=plan.bytes)  # unsure: keep every NAR
            kept_nars.add(url)
    for key, obj in sorted(nars.items()):
        if key not in kept_nars and now - obj.mtime >= older_than:
            plan.nars.append(key)
            plan.bytes += obj.size
    return plan


# ---- execution ------------------------------------------------------------------------------


@dataclass
class Lease:
    """The collector's lease: a bucket object written with ``If-None-Match: *``."""

    etag: str
    holder: str


async def acquire_lease(bucket: s3.S3, holder: str, ttl: float) -> Lease | str:
    """The lease, or the description of whoever holds it. A stale lease (past its expiry) is
    taken over with ``If-Match`` on its ETag, so two hosts cannot both take it over."""
    body = json.dumps({"holder": holder, "expires": time.time() + ttl}).encode()
    for _ in range(2):
        etag = await bucket.put_if(layout.GC_LEASE, body, none_match=True)
        if etag is not None:
            return Lease(etag, holder)
        current = await bucket.get_with_etag(layout.GC_LEASE)
        if current is None:
            continue  # released meanwhile: try again
        data, current_etag = current
        try:
            info = json.loads(data)
            other, expires = str(info["holder"]), float(info["expires"])
        except (ValueError, KeyError, TypeError):
            other, expires = "unreadable lease", 0.0
        if expires > time.time():
            return f"{other} (until {datetime.fromtimestamp(expires).isoformat(timespec='seconds')})"
        etag = await bucket.put_if(layout.GC_LEASE, body, match=current_etag)
        if etag is not None:
            log.warning("gc.lease_taken_over", stale_holder=other)
            return Lease(etag, holder)
    return "another collector (lease contended)"


async def release_lease(bucket: s3.S3, lease: Lease) -> None:
    await bucket.delete_if(layout.GC_LEASE, lease.etag)


class GcinfoCache:
    """Raw gcinfos on local disk keyed by ETag: an unchanged gcinfo is downloaded once."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.hits = 0
        self.downloads = 0

    async def read(self, bucket: s3.S3, obj: Obj) -> Gcinfo:
        path = self.dir / obj.etag if obj.etag.isalnum() else None
        data: bytes | None = None
        if path is not None and path.exists():
            data = path.read_bytes()
            self.hits += 1
        else:
            got = await bucket.get_with_etag(obj.key)
            if got is None:
                raise GcinfoError(f"{obj.key}: listed but gone when read (changed under us); retry later")
            data = got[0]
            self.downloads += 1
            gcinfo = parse(data, obj.key)  # never cache what does not parse
            if path is not None and got[1].strip('"') == obj.etag:
                tmp = path.with_suffix(".tmp")
                tmp.write_bytes(data)
                os.replace(tmp, path)
            return gcinfo
        return parse(data, obj.key)

    def prune(self, keep: Iterable[str]) -> None:
        wanted = set(keep)
        for f in self.dir.iterdir():
            if f.name not in wanted:
                f.unlink(missing_ok=True)


@dataclass
class GcResult:
    skipped: str | None = None
    plan: Plan = field(default_factory=Plan)
    residual: Residual | None = None
    gcinfos_read: int = 0
    gcinfos_cached: int = 0
    deleted: int = 0
    requests: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0


async def listing(bucket: s3.S3, prefix: str, delimiter: str | None = None) -> dict[str, Obj]:
    """Every object under ``prefix``, by key."""
    return {o.key: o for o in [Obj.from_listing(e) async for e in bucket.list_keys(prefix, delimiter)]}


async def gcinfo_listing(bucket: s3.S3, prefix: str) -> dict[str, Obj]:
    """The gcinfos under ``prefix`` (``gcroots/`` or ``gctrash/``, every host), by key."""
    return {k: o for k, o in (await listing(bucket, prefix)).items() if k.endswith(layout.GCINFO_SUFFIX)}


class Collector:
    def __init__(self, cfg: Config, bucket: s3.S3, progress: ProgressFn = silent) -> None:
        self.cfg = cfg
        self.bucket = bucket
        self.cache = GcinfoCache(cfg.state_dir / "gcinfo-cache")
        self.progress = progress

    async def read_gcinfos(self, objs: dict[str, Obj]) -> dict[str, Gcinfo]:
        out = {}
        for n, (key, obj) in enumerate(sorted(objs.items()), 1):
            out[key] = await self.cache.read(self.bucket, obj)
            self.progress("reading gcinfos", n, len(objs))
        return out

    async def _heads(self, dead: dict[str, Member]) -> tuple[dict[str, Obj], dict[str, Obj]]:
        """The dead paths' narinfos and NARs, one HEAD each (16 at a time); a NAR's
        compression is unknown, so its candidate names are tried most likely first."""
        narinfos: dict[str, Obj] = {}
        nars: dict[str, Obj] = {}
        sem = asyncio.Semaphore(16)

        async def head(key: str) -> Obj | None:
            async with sem:
                meta = await self.bucket.head(key)
            if meta is None:
                return None
            modified = meta.get("LastModified")
            mtime = modified.timestamp() if isinstance(modified, datetime) else 0.0
            return Obj(key, int(meta.get("ContentLength", 0)), mtime)

        async def one(h: str, m: Member) -> None:
            if (obj := await head(f"{h}.narinfo")) is not None:
                narinfos[h] = obj
            for key in layout.nar_candidates(m.nar_hash) if m.nar_hash else []:
                if (nar := await head(key)) is not None:
                    nars[key] = nar
                    break

        await asyncio.gather(*(one(h, m) for h, m in dead.items()))
        return narinfos, nars

    async def bucket_objects(self) -> tuple[dict[str, Obj], dict[str, Obj]]:
        self.progress("listing narinfos and NARs")
        # The two listings are independent: run them side by side.
        top, nar_listing = await asyncio.gather(listing(self.bucket, "", "/"), listing(self.bucket, layout.NAR_PREFIX))
        narinfos = {h: o for o in top.values() if (h := layout.hash_of_narinfo_key(o.key))}
        nars = {k: o for k, o in nar_listing.items() if layout.hash_of_nar_key(k)}
        return narinfos, nars

    async def collect(
        self,
        dry_run: bool = False,
        holder: str | None = None,
        residual_age: float | None = None,
        trash: bool = True,
    ) -> GcResult:
        """One collection (of the trash, and of residual objects when ``residual_age`` is set).
        Raises GcinfoError, with nothing deleted, on any unreadable gcinfo."""
        started = time.monotonic()
        result = GcResult()
        with s3.job_requests() as counter:
            trash_objs = await gcinfo_listing(self.bucket, layout.TRASH_PREFIX) if trash else {}
            if trash_objs or residual_age is not None:  # an empty trash costs that one LIST
                await self._collect(trash_objs, dry_run, holder, residual_age, result)
            result.requests = counter
        result.seconds = time.monotonic() - started
        return result

    async def _collect(
        self,
        trash_objs: dict[str, Obj],
        dry_run: bool,
        holder: str | None,
        residual_age: float | None,
        result: GcResult,
    ) -> None:
        lease = None
        if not dry_run:
            got = await acquire_lease(
                self.bucket, holder or f"{self.cfg.hostname}:{os.getpid()}", self.cfg.gc.lease_ttl
            )
            if isinstance(got, str):
                result.skipped = f"lease held by {got}"
                return
            lease = got
        try:
            live_objs = await gcinfo_listing(self.bucket, layout.ROOTS_PREFIX)
            trash = await self.read_gcinfos(trash_objs)
            live = await self.read_gcinfos(live_objs)
            result.gcinfos_read = self.cache.downloads
            result.gcinfos_cached = self.cache.hits
            known = len({m.hash_part for g in (*trash.values(), *live.values()) for m in g.members})
            dead = dead_members(trash, live)
            if residual_age is None and use_heads(len(dead), known):
                narinfos, nars = await self._heads(dead)
            else:
                narinfos, nars = await self.bucket_objects()
            now = time.time()
            result.plan = plan_collection(trash, live, narinfos, nars, now, self.cfg.gc.grace_period)
            if residual_age is not None:
                gone = set(result.plan.narinfos)
                remaining = {h: o for h, o in narinfos.items() if o.key not in gone}
                result.residual = await self._residual(live, remaining, nars, now, residual_age)
            if not dry_run:
                await self._delete(result)
            self.cache.prune(o.etag for o in [*trash_objs.values(), *live_objs.values()])
        finally:
            if lease is not None:
                await release_lease(self.bucket, lease)

    async def _residual(
        self, live: dict[str, Gcinfo], narinfos: dict[str, Obj], nars: dict[str, Obj], now: float, age: float
    ) -> Residual:
        live_members = {m.hash_part: m for g in live.values() for m in g.members}
        urls: dict[str, str | None] = {}
        for h, obj in narinfos.items():
            member = live_members.get(h)
            if member is not None and member.nar_hash:
                continue  # its NAR is known from the gcinfo
            if member is None and now - obj.mtime >= age:
                continue  # residual itself
            # A narinfo that stays and no gcinfo describes (young, or an old-format member):
            # read which NAR it names, so that NAR is not taken for residual.
            text = await self.bucket.get(obj.key)
            lines = (text or b"").decode(errors="replace").splitlines()
            urls[h] = next((ln[5:].strip() for ln in lines if ln.startswith("URL: ")), None)
        return plan_residual(live, narinfos, nars, urls, now, age)

    async def _delete(self, result: GcResult) -> None:
        """Each phase completes before the next starts (separate requests): narinfos first, so
        no narinfo ever points at a deleted NAR; the trash gcinfos last, so a crash anywhere
        leaves the trash in place and the next collection redoes what is left."""
        plan, residual = result.plan, result.residual or Residual()
        phases = (
            ("narinfos", [*plan.narinfos, *residual.narinfos]),
            ("nars", [*plan.nars, *residual.nars]),
            ("trash", plan.trash),
        )
        for phase, keys in phases:
            for start in range(0, len(keys), 1000):
                batch = keys[start : start + 1000]
                await self.bucket.delete_many(batch)
                result.deleted += len(batch)
                self.progress(f"deleting {phase}", start + len(batch), len(keys))
                log.info("gc.deleted_batch", phase=phase, objects=len(batch), deleted=result.deleted)

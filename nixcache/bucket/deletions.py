"""Deletion records: how every host learns what a collection deletes, and when.

A collection writes ``gc/records/<id>.open`` — every path (hash part), NAR hash and NAR key
it may delete — *before* it reads the state that justifies its deletions, and
``gc/records/<id>.done`` — what it did delete — when it has finished. A host writes first
(narinfos, gcinfo), then LISTs ``gc/records/``: either the collector's read saw the host's
writes (and keeps what they need), or the host sees the record and repairs what it relied on
(docs/gc.md, rule 9). The same LIST — empty of news when nothing happened — evicts the
host's "already in the bucket" cache.

Records are small gzip JSON; a host GETs each at most twice (open, done). The collector
deletes records older than ``gc.record_retention``; a host that has not listed them for that
long forgets everything it believed present.
"""

from __future__ import annotations

import asyncio
import gzip
import json
import secrets
import time
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from nixcache.bucket import layout, s3
from nixcache.bucket.lease import read_lease
from nixcache.errors import NixcacheError
from nixcache.logs import get

log = get("nixcache.bucket.deletions")

PREFIX = "gc/records/"
OPEN, DONE = ".open", ".done"
VERIFIED = ".verified"
"""local only: what this host found whole after that record was done."""
ABANDON_MARGIN = 300.0
"""Seconds past a lease's expiry (by this host's clock) before its record is taken as
abandoned: room for clock skew between hosts."""


@dataclass(frozen=True)
class Record:
    """What one collection may delete (open) or did delete (done)."""

    id: str
    paths: frozenset[str] = frozenset()
    nar_hashes: frozenset[str] = frozenset()
    nar_keys: frozenset[str] = frozenset()
    everything: bool = False
    """An unreadable record: it may have deleted anything (when in doubt, check all)."""

    def render(self) -> bytes:
        body = {"id": self.id, "paths": sorted(self.paths), "nar_hashes": sorted(self.nar_hashes),
                "nar_keys": sorted(self.nar_keys)}  # fmt: skip
        return gzip.compress(json.dumps(body).encode(), mtime=0)

    @classmethod
    def parse(cls, data: bytes, what: str) -> Record:
        try:
            body = json.loads(gzip.decompress(data))
            return cls(
                str(body["id"]),
                frozenset(map(str, body["paths"])),
                frozenset(map(str, body["nar_hashes"])),
                frozenset(map(str, body["nar_keys"])),
            )
        except (OSError, EOFError, zlib.error, ValueError, KeyError, TypeError) as e:
            log.error("deletions.unreadable_record", record=what, error=str(e), then="checking every path it may cover")
            return cls(what.rsplit("/", 1)[-1].split(".", 1)[0], everything=True)

    def hits(self, paths: Iterable[str], nar_keys: Iterable[str]) -> set[str]:
        """Which of these hash parts / NAR keys this record covers (pure)."""
        if self.everything:
            return {*paths, *nar_keys}
        out = {h for h in paths if h in self.paths}
        for key in nar_keys:
            digest = layout.hash_of_nar_key(key)
            if key in self.nar_keys or (digest is not None and digest in self.nar_hashes):
                out.add(key)
        return out


def new_id(hostname: str) -> str:
    return f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{hostname}-{secrets.token_hex(3)}"


def open_key(record_id: str) -> str:
    return f"{PREFIX}{record_id}{OPEN}"


def done_key(record_id: str) -> str:
    return f"{PREFIX}{record_id}{DONE}"


@dataclass
class View:
    """The records as listed once: ids by state."""

    open: set[str] = field(default_factory=set)
    done: set[str] = field(default_factory=set)
    mtimes: dict[str, float] = field(default_factory=dict)


async def list_records(bucket: s3.S3) -> View:
    view = View()
    async for obj in bucket.list_keys(PREFIX):
        key = str(obj["Key"])
        name = key[len(PREFIX) :]
        modified = obj.get("LastModified")
        mtime = modified.timestamp() if isinstance(modified, datetime) else 0.0
        if name.endswith(DONE):
            view.done.add(name[: -len(DONE)])
            view.mtimes[name[: -len(DONE)]] = mtime
        elif name.endswith(OPEN):
            rid = name[: -len(OPEN)]
            view.open.add(rid)
            view.mtimes.setdefault(rid, mtime)
    view.open -= view.done
    return view


@dataclass(frozen=True)
class Baseline:
    """When a job began (a job longer than half the retention may have missed records)."""

    began: float


class Tracker:
    """A host's view of the deletion records of one bucket.

    After its writes, a job checks its closure against *every* retained done record — not
    only those that appeared since it began: an earlier attempt (another process, before a
    restart, a reload, or a failed round) may have written narinfos it never checked. What a
    HEAD found present after a record was done stays fine until a later record, so each
    (record, path or NAR) is asked about at most once per host (``verified``, kept). Record
    contents are kept in ``cache_dir``: each is downloaded once per host, ever."""

    def __init__(self, bucket: s3.S3, cache_dir: Path | None, retention: float) -> None:
        self.bucket = bucket
        self.cache_dir = cache_dir
        self.retention = retention
        self.done: dict[str, Record] = {}
        """every done record listed, by id, learnt by this process."""
        self.open: dict[str, Record] = {}
        self.deleted: set[str] = set()
        """hash parts deleted by collections learnt of, not yet re-checked by the publisher."""
        self.doubtful: set[str] = set()
        """hash parts deleted or announced for deletion, not yet evicted from a presence cache."""
        self.verified: set[tuple[str, str]] = set()
        """(record id, hash part or NAR key) found present after that record was done."""
        self.forget_all = False
        """an unreadable record was learnt: it may have deleted anything this host cached."""
        self.listeners: list[Callable[[Iterable[str], bool], None]] = []
        """Told of every deletion learnt (hash parts; True: it may have deleted anything): other
        caches of this bucket's contents (the substituter's narinfos)."""
        self.epoch = 0
        """bumped whenever a record is learnt: a presence answer obtained across a bump is not
        cached (the record may have been learnt, and evicted, while the answer was on its way)."""
        self.last_listed = 0.0
        self._lock = asyncio.Lock()

    @property
    def stale(self) -> bool:
        """True if this process may have missed records (not listed for half the retention):
        whatever it believes present must be asked again."""
        return time.time() - self.last_listed > self.retention / 2

    def baseline(self) -> Baseline:
        return Baseline(time.time())

    def _read_cached(self, rid: str) -> bytes | None:
        if self.cache_dir is None:
            return None
        try:
            return (self.cache_dir / f"{rid}{DONE}").read_bytes()
        except OSError:
            return None

    def _write_cached(self, rid: str, data: bytes, listed: set[str]) -> None:
        if self.cache_dir is None:
            return
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.cache_dir / f"{rid}.tmp"
            tmp.write_bytes(data)
            tmp.replace(self.cache_dir / f"{rid}{DONE}")
            for f in self.cache_dir.iterdir():
                rid_of = f.name.rsplit(".", 1)[0]
                if f.name.endswith((DONE, VERIFIED)) and rid_of not in listed:
                    f.unlink(missing_ok=True)  # pruned from the bucket
        except OSError as e:  # said once; this process then downloads what it needs
            log.warning("deletions.cache_not_written", path=str(self.cache_dir), error=e.strerror)
            self.cache_dir = None

    def _read_verified(self, rid: str) -> set[tuple[str, str]]:
        if self.cache_dir is None:
            return set()
        try:
            return {(rid, item) for item in (self.cache_dir / f"{rid}{VERIFIED}").read_text().split()}
        except OSError:
            return set()

    def _append_verified(self, pairs: set[tuple[str, str]]) -> None:
        if self.cache_dir is None:
            return
        by_record: dict[str, list[str]] = {}
        for rid, item in pairs:
            by_record.setdefault(rid, []).append(item)
        try:
            for rid, items in by_record.items():
                with (self.cache_dir / f"{rid}{VERIFIED}").open("a") as f:
                    f.write("".join(i + "\n" for i in items))
        except OSError:
            pass  # only asked again by the next process

    async def mark_verified(self, pairs: set[tuple[str, str]]) -> None:
        """These (record, path or NAR) were found whole after that record was done: they stay
        so until a later record, so no process of this host asks about them again."""
        self.verified |= pairs
        await asyncio.to_thread(self._append_verified, pairs)

    def _learn(self, record: Record, done: bool) -> None:
        self.epoch += 1
        self.doubtful |= record.paths
        self.forget_all |= record.everything
        self._tell(record.paths, record.everything)
        if done:
            self.done[record.id] = record
            self.deleted |= record.paths

    async def refresh(self) -> dict[str, Record]:
        """LIST the records; learn the new ones (a done record from the local cache, else one
        GET). Returns every open record. One LIST when nothing happened."""
        async with self._lock:
            listed_at = time.time()
            view = await list_records(self.bucket)
            new_done = sorted(view.done - set(self.done))
            for rid in new_done:
                data = await asyncio.to_thread(self._read_cached, rid)
                self.verified |= await asyncio.to_thread(self._read_verified, rid)
                if data is None:
                    data = await self.bucket.get(done_key(rid))
                    if data is None:
                        continue  # pruned meanwhile
                    await asyncio.to_thread(self._write_cached, rid, data, view.done)
                self._learn(Record.parse(data, done_key(rid)), done=True)
            for rid in sorted(view.open - set(self.open)):
                data = await self.bucket.get(open_key(rid))
                if data is not None:
                    self.open[rid] = Record.parse(data, open_key(rid))
                    self._learn(self.open[rid], done=False)
            self.open = {rid: r for rid, r in self.open.items() if rid in view.open}
            self.done = {rid: r for rid, r in self.done.items() if rid in view.done}
            self.verified = {(rid, item) for rid, item in self.verified if rid in self.done}
            self.last_listed = listed_at
            if new_done:
                log.info("deletions.learnt", records=len(new_done), paths=sum(len(self.done[r].paths)
                         for r in new_done if r in self.done))  # fmt: skip
            return dict(self.open)

    async def wait_done(self, rid: str, announced: Record, poll: float = 2.0, patience: float = 120.0) -> Record:
        """Wait until the collection ``rid`` is done — or abandoned (its lease gone, taken
        over, or expired by our clock with a margin): then it deletes nothing more, and
        everything it announced is taken as deleted. Past ``patience`` seconds, raise: the
        job is retried later (a daemon's path stays pending) rather than holding a worker."""
        deadline = time.monotonic() + patience
        while True:
            data = await self.bucket.get(done_key(rid))
            if data is not None:
                return Record.parse(data, done_key(rid))
            lease = await read_lease(self.bucket)
            if lease is None or lease.record != rid or time.time() > lease.expires + ABANDON_MARGIN:
                # Its collector deletes nothing more: close the record with all it announced
                # (a superset of what went), so no host waits on it again.
                log.warning("deletions.abandoned_collection", record=rid)
                await self.bucket.put(done_key(rid), announced.render(), "application/gzip")
                return announced
            if time.monotonic() > deadline:
                raise NixcacheError(
                    f"collection {rid} by {lease.holder} may be deleting paths this job relies on and is still "
                    "running; will check again"
                )
            log.info("deletions.waiting_for_collection", record=rid, holder=lease.holder)
            await asyncio.sleep(poll)

    async def conflicts(self, base: Baseline, paths: set[str], nar_keys: set[str]) -> set[tuple[str, str]]:
        """After a job's writes: (record id, hash part or NAR key) for each of ``paths`` and
        ``nar_keys`` (what it wrote or relied on) that a retained record says a collection
        deleted and that was not found present since — to be asked about (HEAD). Waits for
        open collections that cover any of them. A job that ran longer than half the
        retention may have missed pruned records: all of its paths and NARs are returned."""
        open_now = await self.refresh()
        if time.time() - base.began > self.retention / 2:
            log.warning("deletions.job_outlived_retention", then="checking every path")
            return {("", item) for item in (*paths, *nar_keys)}
        for rid, announced in open_now.items():
            if announced.hits(paths, nar_keys):
                self._learn(await self.wait_done(rid, announced), done=True)
                self.open.pop(rid, None)
        return {(rid, item) for rid, r in self.done.items() for item in r.hits(paths, nar_keys)} - self.verified

    def adopt(self, old: Tracker) -> None:
        """Start from what ``old`` (the same bucket, through a client closed on reload) knew —
        copies: jobs still running on the old client must not learn records for this one
        (it learns them itself, and evicts them from its own cache)."""
        self.done, self.open, self.verified = dict(old.done), dict(old.open), set(old.verified)
        self.deleted, self.doubtful = set(old.deleted), set(old.doubtful)
        self.forget_all, self.epoch, self.last_listed = old.forget_all, old.epoch, old.last_listed
        self.listeners = list(old.listeners)

    def learn(self, paths: set[str]) -> None:
        """This process deleted ``paths`` itself (its own collection)."""
        self.epoch += 1
        self.deleted |= paths
        self.doubtful |= paths
        self._tell(paths, False)

    def _tell(self, paths: Iterable[str], everything: bool) -> None:
        for listener in self.listeners:
            try:
                listener(paths, everything)
            except Exception as e:  # a cache's trouble must not stop the records being learnt
                log.exception("deletions.listener_failed", error=repr(e))

    def take_deleted(self) -> set[str]:
        out, self.deleted = self.deleted, set()
        return out

    def take_doubtful(self) -> set[str]:
        out, self.doubtful = self.doubtful, set()
        return out

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
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from nixcache import layout, s3
from nixcache.errors import NixcacheError
from nixcache.lease import read_lease
from nixcache.logs import get

log = get("nixcache.deletions")

PREFIX = "gc/records/"
OPEN, DONE = ".open", ".done"
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
            raise NixcacheError(f"{what}: unreadable deletion record ({e})") from None

    def hits(self, paths: Iterable[str], nar_keys: Iterable[str]) -> set[str]:
        """Which of these hash parts / NAR keys this record covers (pure)."""
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


class Tracker:
    """A host's view of the deletion records of one bucket.

    ``seen`` holds the ids of the *done* records this host has processed; it is kept in
    ``state_file`` so a restarted host still learns what it missed meanwhile. A host with no
    such file (new) takes every existing record as seen: it has relied on nothing yet."""

    def __init__(self, bucket: s3.S3, state_file: Path | None, retention: float) -> None:
        self.bucket = bucket
        self.state_file = state_file
        self.retention = retention
        self.seen: set[str] | None = None
        self.done: dict[str, Record] = {}
        """done records processed by this process, by id."""
        self.open: dict[str, Record] = {}
        self.deleted: set[str] = set()
        """hash parts deleted by collections learnt of, not yet taken by the publisher."""
        self.doubtful: set[str] = set()
        """hash parts deleted or announced for deletion, not yet evicted from a presence cache."""
        self.last_listed = 0.0
        self._lock = asyncio.Lock()

    def _load(self) -> set[str] | None:
        if self.state_file is None:
            return None
        try:
            data = json.loads(self.state_file.read_text())
            ids = data.get(self.bucket.bucket) if isinstance(data, dict) else None
            return {str(x) for x in ids} if isinstance(ids, list) else None
        except (OSError, ValueError):
            return None

    def _save(self) -> None:
        if self.state_file is None or self.seen is None:
            return
        try:
            data = json.loads(self.state_file.read_text()) if self.state_file.exists() else {}
            data = data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            data = {}
        data[self.bucket.bucket] = sorted(self.seen)
        try:
            self.state_file.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.state_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(data))
            tmp.replace(self.state_file)
        except OSError as e:  # said once; this process then keeps it in memory only
            log.warning("deletions.state_not_saved", path=str(self.state_file), error=e.strerror)
            self.state_file = None

    @property
    def stale(self) -> bool:
        """True if this host may have missed records (not listed for half the retention):
        whatever it believes present must be asked again."""
        return time.time() - self.last_listed > self.retention / 2

    async def start(self) -> set[str]:
        """Load (or, for a new host, prime) what was seen; return the ids now settled: what
        a job starting now need not worry about."""
        if self.seen is None:
            saved = await asyncio.to_thread(self._load)
            if saved is None:
                await self.refresh()
            else:
                self.seen = saved
        return set(self.seen or ())

    async def refresh(self) -> tuple[list[Record], dict[str, Record]]:
        """LIST the records; GET the new ones. Returns (done records not processed before,
        every open record). One LIST when nothing happened."""
        async with self._lock:
            listed_at = time.time()
            view = await list_records(self.bucket)
            primed = False
            if self.seen is None:
                saved = await asyncio.to_thread(self._load)
                self.seen, primed = (saved, False) if saved is not None else (set(view.done), True)
            fresh: list[Record] = []
            for rid in sorted(view.done - self.seen):
                data = await self.bucket.get(done_key(rid))
                if data is None:
                    continue  # pruned meanwhile
                record = Record.parse(data, done_key(rid))
                fresh.append(record)
                self.done[rid] = record
                self.deleted |= record.paths
                self.doubtful |= record.paths
            for rid in sorted(view.open - set(self.open)):
                data = await self.bucket.get(open_key(rid))
                if data is not None:
                    self.open[rid] = Record.parse(data, open_key(rid))
                    self.doubtful |= self.open[rid].paths
            self.open = {rid: r for rid, r in self.open.items() if rid in view.open}
            self.done = {rid: r for rid, r in self.done.items() if rid in view.done}
            if primed or fresh or not (self.seen <= view.done):
                self.seen = (self.seen & view.done) | {r.id for r in fresh}
                await asyncio.to_thread(self._save)
            self.last_listed = listed_at
            if fresh:
                log.info("deletions.learnt", records=[r.id for r in fresh],
                         paths=sum(len(r.paths) for r in fresh))  # fmt: skip
            return fresh, dict(self.open)

    async def wait_done(self, rid: str, announced: Record, poll: float = 2.0, patience: float = 120.0) -> Record:
        """Wait until the collection ``rid`` is done — or abandoned (its lease gone, or
        expired by our clock with a margin): then it deletes nothing more, and everything
        it announced is taken as deleted. Past ``patience`` seconds, raise: the job is
        retried later (a daemon's path stays pending) rather than holding a worker."""
        deadline = time.monotonic() + patience
        while True:
            data = await self.bucket.get(done_key(rid))
            if data is not None:
                return Record.parse(data, done_key(rid))
            lease = await read_lease(self.bucket)
            if lease is None or lease.record != rid or time.time() > lease.expires + ABANDON_MARGIN:
                log.warning("deletions.abandoned_collection", record=rid)
                return announced
            if time.monotonic() > deadline:
                raise NixcacheError(
                    f"collection {rid} by {lease.holder} may be deleting paths this job relies on and is still "
                    "running; will check again"
                )
            log.info("deletions.waiting_for_collection", record=rid, holder=lease.holder)
            await asyncio.sleep(poll)

    async def conflicts(self, settled: set[str], paths: set[str], nar_keys: set[str]) -> tuple[set[str], set[str]]:
        """After a job's writes: which of ``paths`` (hash parts) and ``nar_keys`` it wrote or
        relied on a collection may have deleted — one that was not done (``settled``) when
        the job started. Waits for open collections that cover any of them. Returns (hits,
        the ids of every collection now settled for this job)."""
        _, open_now = await self.refresh()
        hits: set[str] = set()
        now_settled = set(settled) | set(self.done)
        for rid, record in self.done.items():
            if rid not in settled:
                hits |= record.hits(paths, nar_keys)
        for rid, announced in open_now.items():
            if announced.hits(paths, nar_keys):
                hits |= (await self.wait_done(rid, announced)).hits(paths, nar_keys)
                now_settled.add(rid)
        return hits, now_settled

    def adopt(self, old: Tracker) -> None:
        """Take over what ``old`` (the same bucket, through a client closed on reload) knew."""
        self.seen, self.done, self.open = old.seen, old.done, old.open
        self.deleted, self.doubtful, self.last_listed = old.deleted, old.doubtful, old.last_listed

    def learn(self, paths: set[str]) -> None:
        """This process deleted ``paths`` itself (its own collection)."""
        self.deleted |= paths
        self.doubtful |= paths

    def take_deleted(self) -> set[str]:
        out, self.deleted = self.deleted, set()
        return out

    def take_doubtful(self) -> set[str]:
        out, self.doubtful = self.doubtful, set()
        return out

"""Upload closures: plan (pure: what to skip, in which order) and the transfers.

Invariant: a narinfo is written only after its NAR and after every reference's narinfo,
so the bucket never holds a narinfo whose NAR or references are missing — even after a
crash, because each step only ever adds a complete object after the ones it depends on.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from nixcache import metrics
from nixcache.bucket import layout, s3
from nixcache.bucket.deletions import Baseline, Tracker
from nixcache.bucket.narindex import NarIndex
from nixcache.config import Config
from nixcache.errors import S3Error
from nixcache.formats.nar import NarStream
from nixcache.formats.narinfo import NarInfo
from nixcache.formats.signing import SecretKey
from nixcache.local import store
from nixcache.local.store import PathInfo
from nixcache.logs import get

log = get("nixcache.ops.upload")

HEAD_CONCURRENCY = 16
LIST_COST_IN_HEADS = 12
"""What one LIST costs in HEADs: the price ratio of "class A" to "class B" requests at AWS
($0.005 vs $0.0004 per 1000), Cloudflare R2 ($4.50 vs $0.36 per million) and Backblaze B2
(class C vs class B, 10x)."""


def upload_order(infos: dict[str, PathInfo], skip: set[str]) -> list[PathInfo]:
    """Paths of ``infos`` not in ``skip``, every path after its references (stable, sorted)."""
    order: list[PathInfo] = []
    state: dict[str, int] = {}  # 1 visiting, 2 done

    def visit(path: str) -> None:
        stack = [(path, iter(sorted(infos[path].references)))]
        state[path] = 1
        while stack:
            node, refs = stack[-1]
            for ref in refs:
                if ref in infos and ref not in state and ref != node:
                    state[ref] = 1
                    stack.append((ref, iter(sorted(infos[ref].references))))
                    break
            else:
                stack.pop()
                state[node] = 2
                if node not in skip:
                    order.append(infos[node])

    for path in sorted(infos):
        if path not in state:
            visit(path)
    return order


def list_budget(n_unknown: int) -> int:
    """How many LIST pages may be spent instead of ``n_unknown`` HEADs (0: use HEADs)."""
    return n_unknown // LIST_COST_IN_HEADS


def upstream_paths(infos: dict[str, PathInfo], skip_signed_by: Iterable[str]) -> set[str]:
    """Paths already signed by an upstream cache's key: they are not ours to upload."""
    names = frozenset(skip_signed_by)
    return {p for p, info in infos.items() if info.signed_by(names)}


def make_narinfo(info: PathInfo, url: str, compression: str, file_hash: str, file_size: int) -> NarInfo:
    return NarInfo(
        store_path=info.path,
        url=url,
        compression=compression,
        file_hash=file_hash,
        file_size=file_size,
        nar_hash=info.nar_hash,
        nar_size=info.nar_size,
        references=tuple(r.rsplit("/", 1)[-1] for r in info.references),
        deriver=info.deriver.rsplit("/", 1)[-1] if info.deriver else None,
        ca=info.ca,
    )


@dataclass
class PushResult:
    roots: list[str]
    closure: int = 0
    upstream: int = 0
    present: int = 0
    uploaded: int = 0
    nar_bytes: int = 0
    file_bytes: int = 0
    repaired: int = 0
    seconds: float = 0.0
    requests: Counter[str] = field(default_factory=Counter)
    nar_keys: set[str] = field(default_factory=set)
    """NARs this push wrote."""


ProgressCallback = Callable[[PathInfo, int], None]


class Uploader:
    """Pushes closures into one bucket, sharing work between concurrent pushes.

    ``known_present`` remembers narinfos seen in (or written to) the bucket, so pushing a
    closure twice costs no second round of requests. It is never trusted blindly: every
    push ends by checking the deletion records (:meth:`settle`), which evict from it what
    any collection deleted, and repairs what the push relied on.
    """

    MAX_REPAIRS = 5

    def __init__(self, cfg: Config, bucket: s3.S3, key: SecretKey) -> None:
        self.cfg = cfg
        self.s3 = bucket
        self.key = key
        self.known_present: set[str] = set()
        self.records = Tracker(bucket, cfg.state_dir / "deletion-records", cfg.gc.record_retention)
        self.index: NarIndex | None = NarIndex(cfg.state_dir / "narinfo-index.sqlite")
        """where narinfos this host writes are recorded for its collector (saves a GET each)."""
        self._unindexed: list[tuple[str, bytes]] = []
        """narinfos written and not yet in ``index``: recorded once per job, in one transaction
        (one per narinfo cost a commit, a WAL checkpoint and fsyncs each: a tenth of a push's CPU)."""
        self._inflight: dict[str, asyncio.Future[None]] = {}
        self._transfers = asyncio.Semaphore(cfg.upload.workers)
        self._cache_info_written = False
        self._cache_info: asyncio.Future[None] | None = None
        self.on_progress: ProgressCallback | None = None

    async def ensure_cache_info(self) -> None:
        """Once per bucket. Concurrent jobs share one attempt: if the bucket is unreachable,
        they all fail with it at once (not one after another, each after its own retries)."""
        if self._cache_info_written:
            return
        if self._cache_info is None:
            self._cache_info = asyncio.ensure_future(self._write_cache_info())
            self._cache_info.add_done_callback(lambda f: f.cancelled() or f.exception())  # retrieved
        attempt = self._cache_info
        try:
            await asyncio.shield(attempt)
        except BaseException:
            if self._cache_info is attempt and attempt.done():
                self._cache_info = None  # the next job tries again
            raise

    async def _write_cache_info(self) -> None:
        if not await self.s3.exists(layout.CACHE_INFO):
            text = layout.cache_info(self.cfg.store_dir, self.cfg.upload.priority)
            await self.s3.put(layout.CACHE_INFO, text.encode(), "text/x-nix-cache-info")
        self._cache_info_written = True

    async def _filter_present(self, paths: list[str]) -> set[str]:
        """Which of ``paths`` have a narinfo in the bucket, asked as cheaply as possible: one
        LIST page answers up to 1000 paths at once, so list the bucket's top level when that
        costs less than a HEAD per path; otherwise (or if the listing turns out longer than
        that budget) ask with HEADs. The answers are remembered only if no deletion record
        was learnt meanwhile (it could have been evicted before the answer arrived)."""
        epoch = self.records.epoch
        present: set[str] = set()
        budget = list_budget(len(paths))
        names = await self.s3.list_names("", budget) if budget else None
        if names is not None:
            listed = set(names)
            present = {p for p in paths if layout.narinfo_key(p) in listed}
        else:
            sem = asyncio.Semaphore(HEAD_CONCURRENCY)

            async def check(path: str) -> None:
                async with sem:
                    if await self.s3.exists(layout.narinfo_key(path)):
                        present.add(path)

            await asyncio.gather(*(check(p) for p in paths))
        if self.records.epoch == epoch:
            self.known_present |= present
        return present

    def forget(self) -> None:
        """Evict from ``known_present`` what a collection deleted or may be deleting; all of
        it if this host may have missed deletion records (offline or suspended too long) or
        learnt one it cannot read."""
        doubtful = self.records.take_doubtful()
        if self.records.stale or self.records.forget_all:
            self.known_present.clear()
            self.records.forget_all = False
        elif doubtful:
            self.known_present = {p for p in self.known_present if layout.hash_part(p) not in doubtful}

    def begin(self) -> Baseline:
        """Start a job that writes to the bucket."""
        self.forget()
        return self.records.baseline()

    async def push(self, roots: list[str], base: Baseline | None = None) -> PushResult:
        """Make sure the closure of ``roots`` is in the bucket; raise if any path failed.

        Without ``base``, the push ends by checking the deletion records and repairing what
        a collection took (:meth:`settle`); with it, the caller settles."""
        started = time.monotonic()
        result = PushResult(roots=list(roots))
        with s3.job_requests() as counter:
            try:
                own = base is None
                base = base or self.begin()
                infos = await self._push(roots, result, set())
                if own:
                    await self.settle(roots, base, result, infos)
            finally:
                result.requests = counter
                await self.flush_index()
        result.seconds = time.monotonic() - started
        return result

    async def settle(
        self, roots: list[str], base: Baseline, result: PushResult, infos: dict[str, PathInfo] | None = None
    ) -> None:
        """After a job's writes (narinfos, a gcinfo): LIST the deletion records; for each path
        of the closure of ``roots`` and each NAR it may be stored as that a retained record
        says a collection deleted, ask the bucket (HEAD, once per record and process); upload
        again what is missing, and check again (docs/gc.md, rule 9)."""
        infos = infos if infos is not None else await store.closure(roots)
        upstream = upstream_paths(infos, self.cfg.upload.skip_signed_by)
        by_hash = {layout.hash_part(p): p for p in infos if p not in upstream}
        # Every name this host may have given a NAR (the compression may have changed since).
        nar_owner = {k: p for p in by_hash.values() for k in layout.nar_candidates(infos[p].nar_hash_nix32)}
        try:
            await self._settle(roots, base, result, by_hash, nar_owner)
        finally:
            await self.flush_index()  # what repairs wrote

    async def _settle(
        self, roots: list[str], base: Baseline, result: PushResult, by_hash: dict[str, str], nar_owner: dict[str, str]
    ) -> None:
        for _ in range(self.MAX_REPAIRS):
            hits = await self.records.conflicts(base, set(by_hash), set(nar_owner))
            self.forget()
            if not hits:
                return
            items = {item for _, item in hits}
            paths = {by_hash[i] for i in items if i in by_hash} | {nar_owner[i] for i in items if i in nar_owner}
            broken = await self._broken(paths)
            await self.records.mark_verified(
                {(rid, item) for rid, item in hits if rid and by_hash.get(item, nar_owner.get(item)) not in broken}
            )
            force = broken
            if any(not rid for rid, _ in hits):
                base = self.records.baseline()  # the whole closure was just asked about
            log.warning("push.checked_after_collection", asked=len(items), missing=len(force), roots=roots[:3])
            if not force:
                return
            self.known_present -= force
            result.repaired += len(force)
            await self._push(roots, result, force)
        raise S3Error(f"the bucket kept changing under this push of {roots[0]}; it will be retried")

    async def flush_index(self) -> None:
        """Record the narinfos written so far in the index (one transaction)."""
        if self.index is None or not self._unindexed:
            return
        batch, self._unindexed = self._unindexed, []
        try:
            await asyncio.to_thread(self.index.record, batch)
        except Exception as e:  # only a GET saved later: never fail an upload for it
            log.warning("narindex.disabled", path=str(self.index.path), error=repr(e))
            self.index = None  # e.g. state_dir not writable by this user: say it once

    async def _broken(self, paths: set[str]) -> set[str]:
        """Which of ``paths`` have no narinfo, or one naming a NAR that is missing (a GET and
        a HEAD each: the narinfo says which NAR, whoever wrote it)."""
        sem = asyncio.Semaphore(HEAD_CONCURRENCY)
        out: set[str] = set()

        async def check(path: str) -> None:
            async with sem:
                text = await self.s3.get(layout.narinfo_key(path))
                url = next((ln[5:].strip() for ln in (text or b"").decode(errors="replace").splitlines()
                            if ln.startswith("URL: ")), None)  # fmt: skip
                if url is None or not await self.s3.exists(url):
                    out.add(path)

        await asyncio.gather(*(check(p) for p in paths))
        return out

    async def _push(self, roots: list[str], result: PushResult, force: set[str]) -> dict[str, PathInfo]:
        """Upload what of the closure of ``roots`` is missing (and ``force``, even if present)."""
        await self.ensure_cache_info()
        infos = await store.closure(roots)
        upstream = upstream_paths(infos, self.cfg.upload.skip_signed_by)
        unknown = [p for p in infos if p not in upstream and p not in self.known_present and p not in force]
        present = await self._filter_present(unknown)
        skip = (upstream | self.known_present | present) - force
        todo = upload_order(infos, skip)
        if not force:
            result.closure, result.upstream = len(infos), len(upstream)
            result.present = len(infos) - len(upstream) - len(todo)
        outcomes = await asyncio.gather(
            *(self._ensure(info, infos, upstream, result, force) for info in todo), return_exceptions=True
        )
        errors = [o for o in outcomes if isinstance(o, BaseException)]
        if errors:
            raise errors[0]
        return infos

    def _ensure(
        self, info: PathInfo, infos: dict[str, PathInfo], upstream: set[str], result: PushResult, force: set[str]
    ) -> asyncio.Future[None]:
        fut = self._inflight.get(info.path)
        if fut is None:
            fut = asyncio.ensure_future(self._upload(info, infos, upstream, result, force))
            self._inflight[info.path] = fut
            fut.add_done_callback(lambda _f: self._inflight.pop(info.path, None))
        return fut

    async def _upload(
        self, info: PathInfo, infos: dict[str, PathInfo], upstream: set[str], result: PushResult, force: set[str]
    ) -> None:
        if info.path in self.known_present and info.path not in force:
            return
        comp = self.cfg.upload.compression
        url = layout.nar_key(info.nar_hash_nix32, comp)
        started = time.monotonic()
        epoch = self.records.epoch
        with s3.job_requests() as counter:
            async with self._transfers:
                nar = NarStream(info, comp, self.cfg.upload.level())
                part_size = layout.part_size(self.cfg.upload.part_size_mb << 20, info.nar_size)
                await self.s3.upload_stream(
                    url, nar, part_size, "application/x-nix-nar", lambda: nar.result.file_digest
                )
            result.nar_keys.add(url)
            deps = [
                self._ensure(infos[r], infos, upstream, result, force)
                for r in info.references
                if r != info.path and r not in upstream and r not in self.known_present and r in infos
            ]
            await asyncio.gather(*deps)
            narinfo = make_narinfo(info, url, comp, nar.result.file_hash, nar.result.file_size)
            text = narinfo.signed(self.key).render().encode()
            await self.s3.put(layout.narinfo_key(info.path), text, "text/x-nix-narinfo")
        if self.index is not None:
            self._unindexed.append((layout.hash_part(info.path), text))
        if self.records.epoch == epoch:  # else a collection was learnt meanwhile: ask next time
            self.known_present.add(info.path)
        result.uploaded += 1
        result.nar_bytes += nar.result.nar_size
        result.file_bytes += nar.result.file_size
        seconds = time.monotonic() - started
        metrics.observe_upload(nar.result.nar_size, nar.result.file_size, seconds)
        log.info(
            "nar.uploaded",
            path=info.path,
            nar_bytes=nar.result.nar_size,
            compressed_bytes=nar.result.file_size,
            seconds=round(seconds, 3),
            requests=sum(counter.values()),
        )
        if self.on_progress is not None:
            self.on_progress(info, nar.result.file_size)

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

from nixcache import layout, s3, store
from nixcache.config import Config
from nixcache.logs import get
from nixcache.nar import NarStream
from nixcache.narinfo import NarInfo
from nixcache.signing import SecretKey
from nixcache.store import PathInfo

log = get("nixcache.uploader")

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
    seconds: float = 0.0
    requests: Counter[str] = field(default_factory=Counter)


ProgressCallback = Callable[[PathInfo, int], None]


class Uploader:
    """Pushes closures into one bucket, sharing work between concurrent pushes.

    ``known_present`` remembers narinfos seen in (or written to) the bucket, so pushing a
    closure twice costs no second round of requests.
    """

    def __init__(self, cfg: Config, bucket: s3.S3, key: SecretKey) -> None:
        self.cfg = cfg
        self.s3 = bucket
        self.key = key
        self.known_present: set[str] = set()
        self._inflight: dict[str, asyncio.Future[None]] = {}
        self._transfers = asyncio.Semaphore(cfg.upload.workers)
        self._cache_info_written = False
        self._cache_info_lock = asyncio.Lock()
        self.on_progress: ProgressCallback | None = None

    async def ensure_cache_info(self) -> None:
        async with self._cache_info_lock:
            if self._cache_info_written:
                return
            if not await self.s3.exists(layout.CACHE_INFO):
                text = layout.cache_info(self.cfg.store_dir, self.cfg.upload.priority)
                await self.s3.put(layout.CACHE_INFO, text.encode(), "text/x-nix-cache-info")
            self._cache_info_written = True

    async def _filter_present(self, paths: list[str]) -> None:
        """Learn which of ``paths`` have a narinfo in the bucket, as cheaply as possible:
        one LIST page answers up to 1000 paths at once, so list the bucket's top level when
        that costs less than a HEAD per path; otherwise (or if the listing turns out
        longer than that budget) ask with HEADs."""
        budget = list_budget(len(paths))
        if budget:
            names = await self.s3.list_names("", budget)
            if names is not None:
                listed = set(names)
                self.known_present.update(p for p in paths if layout.narinfo_key(p) in listed)
                return
        sem = asyncio.Semaphore(HEAD_CONCURRENCY)

        async def check(path: str) -> None:
            async with sem:
                if await self.s3.exists(layout.narinfo_key(path)):
                    self.known_present.add(path)

        await asyncio.gather(*(check(p) for p in paths))

    async def push(self, roots: list[str]) -> PushResult:
        """Make sure the closure of ``roots`` is in the bucket; raise if any path failed."""
        started = time.monotonic()
        result = PushResult(roots=list(roots))
        with s3.job_requests() as counter:
            await self.ensure_cache_info()
            infos = await store.closure(roots)
            upstream = upstream_paths(infos, self.cfg.upload.skip_signed_by)
            unknown = [p for p in infos if p not in upstream and p not in self.known_present]
            await self._filter_present(unknown)
            skip = upstream | self.known_present
            todo = upload_order(infos, skip)
            result.closure, result.upstream = len(infos), len(upstream)
            result.present = len(infos) - len(upstream) - len(todo)
            outcomes = await asyncio.gather(
                *(self._ensure(info, infos, upstream, result) for info in todo), return_exceptions=True
            )
            result.requests = counter
        result.seconds = time.monotonic() - started
        errors = [o for o in outcomes if isinstance(o, BaseException)]
        if errors:
            raise errors[0]
        return result

    def _ensure(
        self, info: PathInfo, infos: dict[str, PathInfo], upstream: set[str], result: PushResult
    ) -> asyncio.Future[None]:
        fut = self._inflight.get(info.path)
        if fut is None:
            fut = asyncio.ensure_future(self._upload(info, infos, upstream, result))
            self._inflight[info.path] = fut
            fut.add_done_callback(lambda _f: self._inflight.pop(info.path, None))
        return fut

    async def _upload(self, info: PathInfo, infos: dict[str, PathInfo], upstream: set[str], result: PushResult) -> None:
        if info.path in self.known_present:
            return
        comp = self.cfg.upload.compression
        url = layout.nar_key(info.nar_hash_nix32, comp)
        started = time.monotonic()
        with s3.job_requests() as counter:
            async with self._transfers:
                nar = NarStream(info, comp, self.cfg.upload.level())
                await self.s3.upload_stream(url, nar, self.cfg.upload.part_size_mb << 20, "application/x-nix-nar")
            deps = [
                self._ensure(infos[r], infos, upstream, result)
                for r in info.references
                if r != info.path and r not in upstream and r not in self.known_present and r in infos
            ]
            await asyncio.gather(*deps)
            narinfo = make_narinfo(info, url, comp, nar.result.file_hash, nar.result.file_size)
            text = narinfo.signed(self.key).render()
            await self.s3.put(layout.narinfo_key(info.path), text.encode(), "text/x-nix-narinfo")
        self.known_present.add(info.path)
        result.uploaded += 1
        result.nar_bytes += nar.result.nar_size
        result.file_bytes += nar.result.file_size
        log.info(
            "nar.uploaded",
            path=info.path,
            nar_bytes=nar.result.nar_size,
            compressed_bytes=nar.result.file_size,
            seconds=round(time.monotonic() - started, 3),
            requests=sum(counter.values()),
        )
        if self.on_progress is not None:
            self.on_progress(info, nar.result.file_size)

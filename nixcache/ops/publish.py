"""Tell the bucket which closures this host still uses (gcinfo), and trash the ones it dropped.

Publishing a root first pushes its closure (so every narinfo a gcinfo lists exists), then
writes ``gcroots/<host>/<name>-<hash>.gcinfo.gz`` — unless the bucket already holds the very
same bytes (compared by ETag, from one LIST at start): an unchanged root costs no request.
Dereferencing moves this host's gcinfos whose root is gone to ``gctrash/<host>/``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from nixcache.bucket import layout, s3
from nixcache.bucket.deletions import Baseline
from nixcache.config import Config
from nixcache.errors import NixcacheError
from nixcache.formats.gcinfo import Gcinfo, Member, etag_of
from nixcache.local import store
from nixcache.local.roots import Root, matches
from nixcache.local.store import PathInfo
from nixcache.logs import get
from nixcache.ops.upload import PushResult, Uploader, upstream_paths

log = get("nixcache.ops.publish")


def closure_of(root: str, infos: dict[str, PathInfo]) -> list[str]:
    """Every path ``root`` references, directly or not, itself included (pure)."""
    seen = {root}
    todo = [root]
    while todo:
        for ref in infos[todo.pop()].references:
            if ref not in seen and ref in infos:
                seen.add(ref)
                todo.append(ref)
    return sorted(seen)


def build_gcinfo(root: str, infos: dict[str, PathInfo], upstream: set[str]) -> Gcinfo:
    members = tuple(
        Member(layout.hash_part(p), infos[p].nar_hash_nix32, infos[p].nar_size)
        for p in closure_of(root, infos)
        if p not in upstream
    )
    return Gcinfo(root, members)


def is_kept(store_path: str, keep: Iterable[str]) -> bool:
    """Pinned by ``[roots] keep``: matched on the store path or the gcinfo name."""
    return matches(keep, [store_path, layout.gcinfo_name(store_path)])


class HostClaimed(NixcacheError):
    """Another machine publishes under this hostname: sharing its folder would trash its roots."""


def machine_id(cfg: Config) -> str:
    """This machine's id: ``machine_id_file`` (``/etc/machine-id``), else one generated once
    in ``state_dir``."""
    for path in (cfg.machine_id_file, cfg.state_dir / "machine-id"):
        try:
            text = path.read_text().strip()
        except OSError:
            continue
        if text:
            return text
    generated = uuid.uuid4().hex
    try:
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        (cfg.state_dir / "machine-id").write_text(generated + "\n")
    except OSError as e:
        raise NixcacheError(
            f"no {cfg.machine_id_file} and cannot write {cfg.state_dir}/machine-id: {e.strerror}"
        ) from None
    return generated


def claimant(body: bytes) -> str | None:
    """The machine id a claim names, or None if it names none (empty, not JSON…)."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    mid = data.get("machine_id") if isinstance(data, dict) else None
    return mid if isinstance(mid, str) and mid else None


def claim_body(cfg: Config) -> bytes:
    return json.dumps({"hostname": cfg.hostname, "machine_id": machine_id(cfg)}, sort_keys=True).encode() + b"\n"


@dataclass
class CycleResult:
    published: list[str] = field(default_factory=list)
    unchanged: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    moved: list[str] = field(default_factory=list)
    requests: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0


class Publisher:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.folder = layout.roots_folder(cfg.hostname)
        self.trash = layout.trash_folder(cfg.hostname)
        self.claim = self.folder + layout.CLAIM
        self.remote: dict[str, str] | None = None
        """key → ETag of this host's published gcinfos; None until listed."""

    async def list_remote(self, bucket: s3.S3, claim: bool = True) -> dict[str, str]:
        """This host's gcinfos (key → ETag), one paged LIST. With ``claim``, the folder is
        claimed for this machine first, or HostClaimed raised: the claim is in the same
        listing, so checking it at every cycle costs nothing."""
        listed = {str(obj["Key"]): str(obj.get("ETag", "")).strip('"') async for obj in bucket.list_keys(self.folder)}
        if claim:
            await self.ensure_claim(bucket, listed.get(self.claim))
        self.remote = {k: v for k, v in listed.items() if k.endswith(layout.GCINFO_SUFFIX)}
        return self.remote

    async def ensure_claim(self, bucket: s3.S3, listed_etag: str | None) -> None:
        body = claim_body(self.cfg)
        if listed_etag == etag_of(body):
            return
        if listed_etag is None:
            await bucket.put_if(self.claim, body, none_match=True)
        # Read back: where conditional writes are ignored, the last writer wins; both see who.
        got = await bucket.get_with_etag(self.claim)
        if got is None or claimant(got[0]) is None:
            # Gone (deleted by hand), or a claim naming no machine (a write cut short: seen after
            # a kill -9 mid-PUT): nobody's. Take it, conditionally: of two machines repairing it,
            # one wins and the other reads back the winner's claim.
            log.warning("host.claim_repaired", folder=self.folder, found="nothing" if got is None else "no machine id")
            await bucket.put_if(self.claim, body, none_match=got is None, match=None if got is None else got[1])
            got = await bucket.get_with_etag(self.claim)
        current = got[0] if got is not None else None
        if current == body:
            log.info("host.claimed", folder=self.folder)
            return
        other = (claimant(current) if current is not None else None) or "?"
        raise HostClaimed(
            f"s3://{bucket.bucket}/{self.folder} is claimed by another machine (machine id {str(other)[:12]}…, "
            f"this one is {machine_id(self.cfg)[:12]}…): two machines named {self.cfg.hostname!r} would trash each "
            f"other's roots. Set `hostname` to a name unique in this bucket (or, if this is the same machine "
            f"reinstalled, delete s3://{bucket.bucket}/{self.claim})"
        )

    async def gcinfos(self, roots: Iterable[str]) -> dict[str, tuple[Gcinfo, bytes]]:
        """The gcinfo each root would have now, from the local Nix database (no S3)."""
        roots = sorted(roots)
        infos = await store.closure(roots) if roots else {}
        return await asyncio.to_thread(self._build, roots, infos)  # gzip -9 of each: off the loop

    def _build(self, roots: list[str], infos: dict[str, PathInfo]) -> dict[str, tuple[Gcinfo, bytes]]:
        upstream = upstream_paths(infos, self.cfg.upload.skip_signed_by)
        out = {}
        for root in roots:
            info = build_gcinfo(root, infos, upstream)
            out[root] = (info, info.render())
        return out

    async def publish(self, uploader: Uploader, roots: dict[str, Root], learn: bool = False) -> CycleResult:
        """Publish every root whose gcinfo is missing or different (or whose closure a
        collection touched): push closures first, check the deletion records, write the
        gcinfos, check again (docs/gc.md, rules 1 and 9). With ``learn``, LIST the deletion
        records first (a new process: the daemon learns them in its dereference cycle)."""
        started = time.monotonic()
        result = CycleResult()
        bucket = uploader.s3
        with s3.job_requests() as counter:
            remote = self.remote if self.remote is not None else await self.list_remote(bucket)
            if learn:
                await uploader.records.refresh()
            base = uploader.begin()
            touched = uploader.records.take_deleted()
            try:
                wanted = await self.gcinfos(roots)
                changed = {}
                for root, (info, data) in wanted.items():
                    key = self.folder + layout.gcinfo_name(root)
                    if remote.get(key) == etag_of(data) and not any(m.hash_part in touched for m in info.members):
                        result.unchanged += 1
                    else:
                        changed[root] = (key, info, data)
                written = PushResult(sorted(changed))
                pushed = await self._push(uploader, sorted(changed), base, result, written)
                if pushed:
                    # The closures are checked against every collection before any gcinfo names
                    # them, and once more after, for a collection that ran while we wrote.
                    await uploader.settle(sorted(pushed), base, written)
                    for root in sorted(pushed):
                        key, info, data = changed[root]
                        if remote.get(key) == etag_of(data):
                            continue  # re-checked only: the bucket already has these bytes
                        metadata = {"closuresize": str(info.nar_size), "paths": str(len(info.members))}
                        try:
                            await bucket.put(key, data, "application/gzip", metadata)
                        except NixcacheError as e:
                            result.failed[root] = str(e)
                            log.warning("gcinfo.failed", root=root, error=str(e))
                            continue
                        remote[key] = etag_of(data)
                        result.published.append(root)
                        log.info(
                            "gcinfo.published", root=root, key=key, paths=len(info.members), nar_bytes=info.nar_size
                        )
                    await uploader.settle(sorted(pushed), base, written)
            except BaseException:
                uploader.records.deleted |= touched  # not re-checked yet: next round
                raise
            if result.failed:
                uploader.records.deleted |= touched
            result.requests = counter
        result.seconds = time.monotonic() - started
        return result

    async def _push(
        self, uploader: Uploader, roots: list[str], base: Baseline, result: CycleResult, written: PushResult
    ) -> set[str]:
        """One push for all roots: one presence check (a LIST when cheaper) for the union of
        their closures. If it fails, push root by root to find out which. ``written``
        collects the NARs written, for the checks that follow."""
        if not roots:
            return set()  # nothing changed: no request at all
        try:
            written.nar_keys |= (await uploader.push(roots, base)).nar_keys
            return set(roots)
        except NixcacheError:
            pushed = set()
            for root in roots:
                try:
                    written.nar_keys |= (await uploader.push([root], base)).nar_keys
                    pushed.add(root)
                except NixcacheError as e:
                    result.failed[root] = str(e)
                    log.warning("gcinfo.failed", root=root, error=str(e))
            return pushed

    def gone(self, remote: Iterable[str], live: Iterable[str]) -> list[str]:
        """Keys of this host's gcinfos whose root is no longer live nor pinned (pure)."""
        live_keys = {self.folder + layout.gcinfo_name(p) for p in live}
        out = []
        for key in sorted(remote):
            if key in live_keys:
                continue
            store_path = layout.store_path_of_gcinfo(key[len(self.folder) :], self.cfg.store_dir)
            if store_path is None or is_kept(store_path, self.cfg.roots.keep):
                continue
            out.append(key)
        return out

    async def dereference(self, bucket: s3.S3, live: Iterable[str], dry_run: bool = False) -> CycleResult:
        """Move gcinfos of roots that are gone to the trash. One LIST when nothing moves."""
        started = time.monotonic()
        result = CycleResult()
        with s3.job_requests() as counter:
            remote = await self.list_remote(bucket)
            for key in self.gone(remote, live):
                if not dry_run:
                    moved = await bucket.move(key, self.trash + key[len(self.folder) :])
                    remote.pop(key, None)
                    if not moved:  # another dereference of this host was first (`nixcache dereference`)
                        log.info("gcinfo.already_trashed", key=key)
                        continue
                    log.info("gcinfo.trashed", key=key)
                result.moved.append(key)
            result.requests = counter
        result.seconds = time.monotonic() - started
        return result

    async def move_by_hand(self, bucket: s3.S3, names: Iterable[str], to_trash: bool) -> list[str]:
        """`nixcache trash` / `untrash`: move the named gcinfos between the two folders."""
        src, dst = (self.folder, self.trash) if to_trash else (self.trash, self.folder)
        moved = []
        for name in names:
            if not await bucket.move(src + name, dst + name):
                raise NixcacheError(f"s3://{bucket.bucket}/{src}{name}: no such gcinfo")
            moved.append(src + name)
        if self.remote is not None:
            self.remote = None  # re-list before the next publish
        return moved

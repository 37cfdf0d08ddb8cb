"""The GC-roots subcommands run by hand: roots, publish, dereference, trash, untrash."""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

from nixcache.bucket import layout
from nixcache.bucket.s3 import S3
from nixcache.config import Config, load_signing_key
from nixcache.errors import NixcacheError
from nixcache.formats.gcinfo import etag_of
from nixcache.local import roots
from nixcache.ops.publish import CycleResult, Publisher
from nixcache.ops.upload import Uploader


async def local_roots(cfg: Config) -> tuple[dict[str, roots.Root], roots.Scan]:
    """The daemon's view: unreadable links resolved by Nix or by what the daemon remembers
    (read only: the daemon owns that memory)."""
    scan = await roots.discover(cfg.roots_dirs(), cfg.store_dir, roots.Memory(cfg.state_dir, write=False))
    return roots.select(scan.roots, cfg.roots.include, cfg.roots.exclude), scan


@dataclass(frozen=True)
class RootState:
    """One row of `nixcache roots`."""

    state: str
    """published (the bucket has exactly this closure), stale (it has an older one), missing,
    gone (published, no longer a local root: the next dereference trashes it), pinned (gone,
    but matches `keep`), or, for links that lead nobody knows where: unknown (dereference
    waits) or held (kept as the store path they last led to)."""
    root: str
    """The root's store path (the gcinfo's key if it names none), or the link."""
    via: tuple[str, ...]
    """How it was found: the chain of links to it, the gcinfo's key, or why the link is unknown."""


async def status(cfg: Config) -> list[RootState]:
    """Every local root, every published gcinfo of this host and every link not followed."""
    selected, scan = await local_roots(cfg)
    publisher = Publisher(cfg)
    async with S3(cfg.s3) as bucket:
        remote = await publisher.list_remote(bucket, claim=False)
    rows = []
    for root, (_, data) in (await publisher.gcinfos(selected)).items():
        etag = remote.get(publisher.folder + layout.gcinfo_name(root))
        state = "missing" if etag is None else "published" if etag == etag_of(data) else "stale"
        rows.append(RootState(state, root, tuple(selected[root].chains[0])))
    gone = set(publisher.gone(remote, selected))
    for key in sorted(remote):
        store_path = layout.store_path_of_gcinfo(key[len(publisher.folder) :], cfg.store_dir) or key
        if key in gone:
            rows.append(RootState("gone", store_path, (key,)))
        elif store_path not in selected:
            rows.append(RootState("pinned", store_path, (key,)))
    for state, lines in (("unknown", scan.unreadable), ("held", scan.held)):
        for line in lines:
            link, why = line.split(":", 1)
            rows.append(RootState(state, link, (why.strip(),)))
    return rows


async def publish(cfg: Config) -> CycleResult:
    selected, _ = await local_roots(cfg)
    async with S3(cfg.s3) as bucket:
        return await Publisher(cfg).publish(Uploader(cfg, bucket, load_signing_key(cfg)), selected, learn=True)


async def dereference(cfg: Config, dry_run: bool) -> CycleResult:
    selected, scan = await local_roots(cfg)
    if not scan.complete:
        raise NixcacheError(f"not dereferencing: {scan.unreadable[0]} (a live root could be missed)")
    async with S3(cfg.s3) as bucket:
        return await Publisher(cfg).dereference(bucket, selected, dry_run=dry_run)


def gcinfo_names(cfg: Config, args: Iterable[str]) -> list[str]:
    """A gcinfo name, a store path, or a link to one → the gcinfo's name."""
    names = []
    for arg in args:
        if arg.endswith(layout.GCINFO_SUFFIX):
            names.append(os.path.basename(arg))
            continue
        target = os.path.realpath(arg) if os.path.lexists(arg) else arg
        prefix = cfg.store_dir.rstrip("/") + "/"
        if not target.startswith(prefix):
            raise NixcacheError(f"{arg}: neither a gcinfo name nor a store path (or a link to one)")
        names.append(layout.gcinfo_name(prefix + target[len(prefix) :].split("/", 1)[0]))
    return names


async def move(cfg: Config, args: list[str], to_trash: bool) -> list[str]:
    names = gcinfo_names(cfg, args)
    async with S3(cfg.s3) as bucket:
        return await Publisher(cfg).move_by_hand(bucket, names, to_trash)

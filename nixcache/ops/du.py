"""`nixcache du`: the bucket's size per host and per root, shared vs exclusive, trash, residual.

From the gcinfos (cached by ETag) and a LIST of narinfos and NARs: no NAR is downloaded.
A root's *exclusive* bytes are what a collection would free if only that root went away
(grace period aside): computed with the collector's own rules, through reference counts.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from nixcache.bucket import layout
from nixcache.bucket.inventory import gcinfo_listing
from nixcache.bucket.s3 import S3
from nixcache.config import Config
from nixcache.formats.gcinfo import Gcinfo, Member
from nixcache.ops.collect import Collector, ProgressFn, State
from nixcache.ops.plan import plan_collection
from nixcache.progress import silent


@dataclass
class RootUsage:
    key: str
    host: str
    paths: int
    bytes: int
    exclusive: int

    @property
    def shared(self) -> int:
        return self.bytes - self.exclusive


@dataclass
class Usage:
    roots: list[RootUsage] = field(default_factory=list)
    hosts: dict[str, dict[str, int]] = field(default_factory=dict)
    trash: int = 0
    residual: int = 0
    total: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "total": self.total, "trash": self.trash, "residual": self.residual, "hosts": self.hosts,
            "roots": [{"key": r.key, "host": r.host, "paths": r.paths, "bytes": r.bytes, "exclusive": r.exclusive,
                       "shared": r.shared} for r in self.roots],
        }  # fmt: skip


def usage(state: State, trash: dict[str, Gcinfo]) -> Usage:
    """Sizes (pure), from what a collector reads of the bucket and the gcinfos in the trash."""
    live, narinfos, nars = state.live, state.narinfos, state.nars
    size = {o.key: o.size for o in (*narinfos.values(), *nars.values())}
    roots_of_path: Counter[str] = Counter()
    roots_of_nar: Counter[str] = Counter()
    for g in live.values():
        roots_of_path.update({m.hash_part for m in g.members})
        roots_of_nar.update({m.nar_hash for m in g.members if m.nar_hash})
    nars_known = all(m.nar_hash for g in live.values() for m in g.members)

    def nar_key(m: Member) -> str | None:
        return next((k for k in layout.nar_candidates(m.nar_hash) if k in nars), None) if m.nar_hash else None

    def keys_of(members: Iterable[Member], exclusive: bool = False) -> set[str]:
        """The objects of ``members``; with ``exclusive``, only those a collection of a root
        made of them (and no other live root) would delete: the collector's own rules."""
        keys = set()
        for m in members:
            if exclusive and roots_of_path[m.hash_part] != 1:
                continue
            if m.hash_part in narinfos:
                keys.add(narinfos[m.hash_part].key)
            nar = nar_key(m)
            if nar and (not exclusive or (nars_known and roots_of_nar[m.nar_hash or ""] == 1)):
                keys.add(nar)
        return keys

    u = Usage(total=sum(size.values()))
    by_host: dict[str, list[Member]] = {}
    for key, g in sorted(live.items()):
        host = key[len(layout.ROOTS_PREFIX) :].split("/", 1)[0]
        total = sum(size[k] for k in keys_of(g.members))
        exclusive = sum(size[k] for k in keys_of(g.members, exclusive=True))
        u.roots.append(RootUsage(key, host, len(g.members), total, exclusive))
        by_host.setdefault(host, []).extend(g.members)
    for host, members in sorted(by_host.items()):
        roots = [r for r in u.roots if r.host == host]
        u.hosts[host] = {
            "roots": len(roots),
            "bytes": sum(size[k] for k in keys_of(members)),
            "exclusive": sum(r.exclusive for r in roots),
        }
    u.trash = plan_collection(trash, live, narinfos, state.edges, nars, math.inf, 0.0).bytes  # grace aside
    accounted = keys_of(m for g in (*live.values(), *trash.values()) for m in g.members)
    u.residual = u.total - sum(size[k] for k in accounted)
    return u


async def measure(cfg: Config, host: str | None, progress: ProgressFn = silent) -> Usage:
    """`nixcache du`: the whole bucket, or only ``host``'s roots (the totals stay the bucket's)."""
    async with S3(cfg.s3) as bucket:
        collector = Collector(cfg, bucket, progress)
        trash = await collector.read_gcinfos(await gcinfo_listing(bucket, layout.TRASH_PREFIX))
        u = usage(await collector.read_state(), trash)
    if host is not None:
        u.roots = [r for r in u.roots if r.host == host]
        u.hosts = {h: v for h, v in u.hosts.items() if h == host}
    return u

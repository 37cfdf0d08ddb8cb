"""What a collection deletes: pure planning over the gcinfos and every narinfo in the bucket.

Candidates are the paths of trash gcinfos that no live gcinfo lists (and, for a residual
collection, old narinfos no live gcinfo lists). A candidate survives when it is young, or
when any surviving narinfo references it — whoever wrote that narinfo, rooted or not. A NAR
goes only if no surviving narinfo names it (by its ``URL``, whatever the name) and no live
gcinfo member has its NAR hash. The safety argument is docs/gc.md, rule by rule.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from nixcache.bucket import layout
from nixcache.bucket.inventory import UNREADABLE, Edges, Obj
from nixcache.errors import NixcacheError
from nixcache.formats.gcinfo import Gcinfo, Member


class UnsafeToCollect(NixcacheError):
    """Something the plan depends on is unknown: nothing is deleted (when in doubt, keep)."""


MOVE_WINDOW = 600.0
"""A trash gcinfo whose twin is still in gcroots/ and younger than this is being moved."""


@dataclass
class Plan:
    narinfo_layers: list[list[str]] = field(default_factory=list)
    """narinfo keys to delete, referrers before what they reference: a layer is deleted
    only after every earlier one, so no surviving narinfo ever names a deleted one."""
    nars: list[str] = field(default_factory=list)
    trash: list[str] = field(default_factory=list)
    residual: set[str] = field(default_factory=set)
    """keys deleted as residual (no gcinfo ever listed them as dead)."""
    dead_paths: int = 0
    kept_young: int = 0
    kept_referenced: int = 0
    kept_shared_nar: int = 0
    bytes: int = 0

    @property
    def narinfos(self) -> list[str]:
        return [k for layer in self.narinfo_layers for k in layer]

    def objects(self) -> list[str]:
        """Deletion order: narinfos (referrers first), then NARs, then the trash gcinfos."""
        return [*self.narinfos, *self.nars, *self.trash]

    def paths(self) -> set[str]:
        """Hash parts of the narinfos this plan deletes."""
        return {k.removesuffix(".narinfo") for k in self.narinfos}


def dead_members(trash: Mapping[str, Gcinfo], live: Mapping[str, Gcinfo]) -> dict[str, Member]:
    """closure(trash) - closure(live), by narinfo hash (pure)."""
    live_hashes = {m.hash_part for g in live.values() for m in g.members}
    dead: dict[str, Member] = {}
    for g in trash.values():
        for m in g.members:
            if m.hash_part not in live_hashes and (m.hash_part not in dead or m.nar_hash):
                dead[m.hash_part] = m
    return dead


def candidates_of(trash: Mapping[str, Gcinfo]) -> tuple[set[str], set[str]]:
    """Every path and NAR hash a collection of this trash could delete (pure): what its
    deletion record announces before the collector reads anything else."""
    members = [m for g in trash.values() for m in g.members]
    return {m.hash_part for m in members}, {m.nar_hash for m in members if m.nar_hash}


def layers(doomed: set[str], edges: Mapping[str, Edges]) -> list[list[str]]:
    """``doomed`` hash parts in layers: each path after every doomed path referencing it."""
    referrers = {h: 0 for h in doomed}
    for h in doomed:
        for r in set(edges.get(h, UNREADABLE).refs):
            if r in referrers and r != h:
                referrers[r] += 1
    out: list[list[str]] = []
    current = sorted(h for h, n in referrers.items() if n == 0)
    placed: set[str] = set()
    while current:
        out.append(current)
        placed.update(current)
        nxt = []
        for h in current:
            for r in set(edges.get(h, UNREADABLE).refs):
                if r in referrers and r != h:
                    referrers[r] -= 1
                    if referrers[r] == 0:
                        nxt.append(r)
        current = sorted(nxt)
    rest = sorted(doomed - placed)  # a reference cycle (Nix makes none): one layer, together
    return [*out, rest] if rest else out


def plan_collection(
    trash: Mapping[str, Gcinfo],
    live: Mapping[str, Gcinfo],
    narinfos: Mapping[str, Obj],
    edges: Mapping[str, Edges],
    nars: Mapping[str, Obj],
    now: float,
    grace: float,
    residual_age: float | None = None,
    trash_mtimes: Mapping[str, float] | None = None,
) -> Plan:
    """What one collection deletes (pure).

    ``narinfos``: every narinfo in the bucket, by hash part; ``edges``: what each says (a
    narinfo missing from it is treated as unreadable); ``nars``: every object under ``nar/``,
    by key. With ``residual_age``, old narinfos no live gcinfo lists are candidates too, and
    old NARs no narinfo names. ``trash_mtimes``: when each trash gcinfo was written (rule 8).
    Raises UnsafeToCollect when a narinfo that stays cannot be read.
    """
    plan = Plan()
    live_members = {m.hash_part for g in live.values() for m in g.members}
    live_nar_hashes = {m.nar_hash for g in live.values() for m in g.members if m.nar_hash}
    dead = dead_members(trash, live)
    plan.dead_paths = len(dead)
    candidates: dict[str, Member | None] = dict(dead)
    if residual_age is not None:
        for h, obj in narinfos.items():
            if h not in live_members and h not in candidates and now - obj.mtime >= residual_age:
                candidates[h] = None  # None: residual, in no gcinfo

    def young(obj: Obj | None) -> bool:
        return obj is not None and now - obj.mtime < grace

    def nar_keys(h: str, m: Member | None) -> list[str]:
        keys = list(layout.nar_candidates(m.nar_hash)) if m is not None and m.nar_hash else []
        url = edges.get(h, UNREADABLE).url if h in narinfos else None
        return [url, *keys] if url and url not in keys else keys

    doomed: set[str] = set()
    for h, m in candidates.items():
        if young(narinfos.get(h)) or any(young(nars.get(k)) for k in nar_keys(h, m)):
            plan.kept_young += 1
        else:
            doomed.add(h)
    kept_young = set(candidates) - doomed

    # A candidate referenced by a narinfo that stays, stays too — and so do its references.
    todo = [h for h in narinfos if h not in doomed]
    unreadable: list[str] = []
    while todo:
        h = todo.pop()
        e = edges.get(h, UNREADABLE)
        if e.url is None:
            unreadable.append(narinfos[h].key)
        for r in e.refs:
            if r in doomed:
                doomed.discard(r)
                plan.kept_referenced += 1
                if r in narinfos:
                    todo.append(r)
    plan.narinfo_layers = [[narinfos[h].key for h in layer if h in narinfos] for layer in layers(doomed, edges)]
    plan.narinfo_layers = [layer for layer in plan.narinfo_layers if layer]
    plan.residual = {narinfos[h].key for h in doomed if candidates[h] is None and h in narinfos}
    plan.bytes = sum(narinfos[h].size for h in doomed if h in narinfos)

    # NARs: named by a narinfo that stays, or by a live member's NAR hash → kept.
    named = {e.url for h, e in ((h, edges.get(h, UNREADABLE)) for h in narinfos if h not in doomed) if e.url}

    def kept_nar(key: str) -> bool:  # named by a narinfo that stays, or a live member's NAR hash
        return key in named or layout.hash_of_nar_key(key) in live_nar_hashes

    planned: set[str] = set()
    for h in sorted(doomed):
        for key in nar_keys(h, candidates[h]):
            nar = nars.get(key)
            if nar is None or key in planned:
                continue
            if kept_nar(key):
                plan.kept_shared_nar += 1
                continue
            planned.add(key)
            plan.nars.append(key)
            plan.bytes += nar.size
            if candidates[h] is None:
                plan.residual.add(key)
    if residual_age is not None:
        for key, nar in sorted(nars.items()):
            if not kept_nar(key) and key not in planned and now - nar.mtime >= residual_age:
                planned.add(key)
                plan.nars.append(key)
                plan.residual.add(key)
                plan.bytes += nar.size
    if unreadable and (doomed or plan.nars):
        # It could reference any path and name any NAR: when in doubt, keep everything.
        raise UnsafeToCollect(
            f"{min(unreadable)}: unreadable narinfo (what it references and which NAR it names are unknown); "
            "nothing deleted. Fix or delete it by hand (`nixcache verify` lists it)"
        )
    # A trash gcinfo goes once none of its members is kept for being young (a later
    # collection decides on those). One whose twin is still in gcroots/ is being moved right
    # now (dereference copies, then deletes): its members looked live only because of that
    # twin, so it stays for next time.
    # A trash copy older than a move takes, with a live twin, is a root that came back: it goes.
    for key, g in sorted(trash.items()):
        twin = layout.ROOTS_PREFIX + key[len(layout.TRASH_PREFIX) :]
        moving = twin in live and now - (trash_mtimes or {}).get(key, now) < MOVE_WINDOW
        if not any(m.hash_part in kept_young for m in g.members) and not moving:
            plan.trash.append(key)
    return plan

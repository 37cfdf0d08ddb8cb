"""`nixcache verify`: check the bucket's consistency — what a Nix client and the collector rely on.

Every narinfo parses, names a NAR that exists with its FileSize, has references that are in the
bucket (or upstream, as far as the local store can tell), and carries a valid signature by the
given key; every live gcinfo parses and its members exist.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from nixcache.bucket import layout, s3
from nixcache.bucket.inventory import Obj, gcinfo_listing, listing
from nixcache.config import Config, load_signing_key
from nixcache.errors import NixcacheError
from nixcache.formats.gcinfo import GcinfoError, parse
from nixcache.formats.narinfo import NarInfo, NarInfoError
from nixcache.formats.signing import PublicKey
from nixcache.local import store


@dataclass
class Report:
    narinfos: int = 0
    gcinfos: int = 0
    problems: list[str] = field(default_factory=list)
    key: str | None = None
    """The name of the key signatures were checked with; None: not checked."""


def check_narinfo(
    key: str, text: str, nars: dict[str, Obj], narinfo_hashes: set[str], public: PublicKey | None
) -> tuple[list[str], list[str]]:
    """(problems, references not in the bucket) of one narinfo (pure)."""
    try:
        info = NarInfo.parse(text)
    except NarInfoError as e:
        return [f"{key}: does not parse ({e})"], []
    problems = []
    if layout.narinfo_key(info.store_path) != key:
        problems.append(f"{key}: StorePath {info.store_path} does not match the key")
    nar = nars.get(info.url)
    if nar is None:
        problems.append(f"{key}: NAR {info.url} is missing")
    elif info.file_size and nar.size != info.file_size:
        problems.append(f"{key}: NAR {info.url} has {nar.size} bytes, FileSize says {info.file_size}")
    missing = [ref for ref in info.references if ref.split("-", 1)[0] not in narinfo_hashes]
    if public is not None and not public.verify(info.fingerprint(), info.sigs):
        problems.append(f"{key}: no valid signature by {public.name}")
    return problems, missing


UpstreamCheck = Callable[[list[str]], Awaitable[set[str]]]


async def verify(bucket: s3.S3, public: PublicKey | None, upstream_of: UpstreamCheck) -> Report:
    """Check the whole bucket. ``upstream_of`` says which of some missing references (base
    names) are upstream paths, which a cache rightly does not hold."""
    report = Report(key=public.name if public else None)
    top, nars, roots = await asyncio.gather(
        listing(bucket, "", "/"), listing(bucket, layout.NAR_PREFIX), gcinfo_listing(bucket, layout.ROOTS_PREFIX)
    )
    narinfo_keys = sorted(k for k in top if layout.hash_of_narinfo_key(k))
    hashes = {k.removesuffix(".narinfo") for k in narinfo_keys}
    sem = asyncio.Semaphore(16)

    async def one(key: str) -> tuple[str, list[str], list[str]]:
        async with sem:
            data = await bucket.get(key)
        if data is None:
            return key, [], []  # deleted meanwhile
        problems, missing = check_narinfo(key, data.decode(errors="replace"), nars, hashes, public)
        return key, problems, missing

    checked = await asyncio.gather(*(one(k) for k in narinfo_keys))
    missing_refs = sorted({ref for _, _, missing in checked for ref in missing})
    upstream = await upstream_of(missing_refs) if missing_refs else set()
    for key, problems, missing in checked:
        report.problems += problems
        report.problems += [f"{key}: reference {ref} is not in the bucket" for ref in missing if ref not in upstream]
    report.narinfos = len(narinfo_keys)
    for key in sorted(roots):
        report.gcinfos += 1
        data = await bucket.get(key)
        try:
            gcinfo = parse(data or b"", key)
        except GcinfoError as e:
            report.problems.append(str(e))
            continue
        missing = [m.hash_part for m in gcinfo.members if m.hash_part not in hashes]
        if missing:
            report.problems.append(f"{key}: {len(missing)} member(s) missing, e.g. {missing[0]}.narinfo")
    return report


async def run(cfg: Config, key: str | None) -> Report:
    """`nixcache verify`: with ``key``, else the public half of the configured signing key."""
    public: PublicKey | None = None
    if key:
        public = PublicKey.parse(key)
    else:
        try:
            public = load_signing_key(cfg).public
        except NixcacheError:
            public = None

    async def upstream_of(refs: list[str]) -> set[str]:
        try:
            infos = await store.closure([f"{cfg.store_dir}/{r}" for r in refs], recursive=False)
        except NixcacheError:
            return set()  # not in the local store either: reported as missing
        names = frozenset(cfg.upload.skip_signed_by)
        return {p.rsplit("/", 1)[1] for p, info in infos.items() if info.signed_by(names)}

    async with s3.S3(cfg.s3) as bucket:
        return await verify(bucket, public, upstream_of)

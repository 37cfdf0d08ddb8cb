"""Listings of the bucket: the objects a LIST returns and what one narinfo says for the collector."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from nixcache.bucket import layout, s3


@dataclass(frozen=True, slots=True)
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
        # Interned: a NAR's key is also the URL of the narinfo naming it (one string for both).
        key = sys.intern(str(entry["Key"]))
        return cls(key, int(entry.get("Size", 0)), mtime, str(entry.get("ETag", "")).strip('"'))


@dataclass(frozen=True, slots=True)
class Edges:
    """What the collector needs of one narinfo: the NAR it names and the paths it references
    (hash parts, itself excluded). ``url`` None: the narinfo could not be read or parsed."""

    url: str | None
    refs: tuple[str, ...] = ()


UNREADABLE = Edges(None)


async def listing(bucket: s3.S3, prefix: str, delimiter: str | None = None) -> dict[str, Obj]:
    """Every object under ``prefix``, by key."""
    out: dict[str, Obj] = {}
    async for entry in bucket.list_keys(prefix, delimiter):
        obj = Obj.from_listing(entry)
        out[obj.key] = obj
    return out


async def gcinfo_listing(bucket: s3.S3, prefix: str) -> dict[str, Obj]:
    """The gcinfos under ``prefix`` (``gcroots/`` or ``gctrash/``, every host), by key."""
    return {k: o for k, o in (await listing(bucket, prefix)).items() if k.endswith(layout.GCINFO_SUFFIX)}

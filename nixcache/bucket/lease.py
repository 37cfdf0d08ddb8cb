"""One collector at a time: the lease object, and the probe that says whether it can work.

The lease is ``gc.lease``, created with ``If-None-Match: *`` and holding ``{holder,
expires, record}``. A stale lease (past its expiry: its host died) is taken over with
``If-Match`` on its ETag, so of two hosts taking it over only one succeeds. The holder
renews it (``If-Match``) before each delete batch and stops when that fails or when its own
clock says the lease ran out (it was suspended): hosts waiting on its deletion record then
know it will delete nothing more.

All of this rests on the provider honouring conditional PUTs. Some answer 200 to a header
they do not know (Backblaze B2 documents none for PutObject): :func:`conditional_writes`
probes that once per bucket with PUTs that must fail.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from nixcache.bucket import layout, s3
from nixcache.errors import NixcacheError
from nixcache.logs import get

log = get("nixcache.bucket.lease")


class LeaseLost(NixcacheError):
    """The collector no longer holds the lease: it must delete nothing more."""


@dataclass
class Lease:
    etag: str
    holder: str
    expires: float
    ttl: float
    record: str = ""

    def body(self) -> bytes:
        return json.dumps({"holder": self.holder, "expires": self.expires, "record": self.record}).encode()


@dataclass(frozen=True)
class LeaseInfo:
    holder: str
    expires: float
    record: str


def parse_lease(data: bytes) -> LeaseInfo:
    try:
        info = json.loads(data)
        return LeaseInfo(str(info["holder"]), float(info["expires"]), str(info.get("record", "")))
    except (ValueError, KeyError, TypeError):
        return LeaseInfo("unreadable lease", 0.0, "")


async def read_lease(bucket: s3.S3) -> LeaseInfo | None:
    data = await bucket.get(layout.GC_LEASE)
    return parse_lease(data) if data is not None else None


async def acquire(bucket: s3.S3, holder: str, ttl: float, record: str = "") -> Lease | str:
    """The lease, or the description of whoever holds it."""
    lease = Lease("", holder, time.time() + ttl, ttl, record)
    for _ in range(2):
        etag = await bucket.put_if(layout.GC_LEASE, lease.body(), none_match=True)
        if etag is not None:
            lease.etag = etag
            return lease
        current = await bucket.get_with_etag(layout.GC_LEASE)
        if current is None:
            continue  # released meanwhile: try again
        data, current_etag = current
        other = parse_lease(data)
        if other.expires > time.time():
            when = datetime.fromtimestamp(other.expires).isoformat(timespec="seconds")
            return f"{other.holder} (until {when})"
        etag = await bucket.put_if(layout.GC_LEASE, lease.body(), match=current_etag)
        if etag is not None:
            log.warning("gc.lease_taken_over", stale_holder=other.holder)
            lease.etag = etag
            return lease
    return "another collector (lease contended)"


async def hold(bucket: s3.S3, lease: Lease) -> None:
    """Before each delete batch: raise LeaseLost if the lease ran out by our own clock (we
    were suspended: others may have given up on us) or was taken; renew it past half-life."""
    now = time.time()
    if now >= lease.expires:
        raise LeaseLost(f"the collection outlived its lease ({lease.holder}, ttl {lease.ttl:.0f}s); stopped")
    if lease.expires - now > lease.ttl / 2:
        return
    renewed = Lease(lease.etag, lease.holder, now + lease.ttl, lease.ttl, lease.record)
    etag = await bucket.put_if(layout.GC_LEASE, renewed.body(), match=lease.etag)
    if etag is None:
        raise LeaseLost(f"the lease was taken over by another collector while {lease.holder} collected; stopped")
    lease.etag, lease.expires = etag, renewed.expires


async def release(bucket: s3.S3, lease: Lease) -> None:
    await bucket.delete_if(layout.GC_LEASE, lease.etag)


PROBE = "gc/probe"


async def conditional_writes(bucket: s3.S3, cache: Path | None) -> bool:
    """Does the provider honour ``If-None-Match`` and ``If-Match`` on PutObject, and
    ``If-Match`` on DeleteObject? Asked once per bucket (three PUTs and a DELETE; the answer
    is kept in ``cache``): a conditional request that must fail either fails (honoured) or
    succeeds (ignored)."""
    where = f"{bucket.cfg.endpoint or 'aws'} {bucket.bucket}"
    known = await asyncio.to_thread(_read_json, cache) if cache is not None else {}
    if isinstance(known.get(where), bool):
        return bool(known[where])
    await bucket.put(PROBE, b"nixcache conditional-write probe\n")
    wrong_etag = '"0123456789abcdef0123456789abcdef"'
    try:
        honoured = (
            await bucket.put_if(PROBE, b"must not be written\n", none_match=True) is None
            and await bucket.put_if(PROBE, b"must not be written\n", match=wrong_etag) is None
            # the lease is released with a conditional DELETE: a successor's must survive it
            and not await bucket.delete_if(PROBE, wrong_etag)
        )
    except NixcacheError as e:
        if "NotImplemented" not in str(e) and "(HTTP 501)" not in str(e):
            # a 5xx, a timeout: no answer, nothing remembered; asked again next time
            raise NixcacheError(f"could not tell whether the provider honours conditional writes: {e}") from None
        honoured = False  # the provider says it does not know these headers
    log.info("s3.conditional_writes", bucket=bucket.bucket, honoured=honoured)
    if cache is not None:
        known[where] = honoured
        await asyncio.to_thread(_write_json, cache, known)
    return honoured


def _read_json(path: Path) -> dict[str, object]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_json(path: Path, data: dict[str, object]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data))
    except OSError:
        pass  # asked again next time

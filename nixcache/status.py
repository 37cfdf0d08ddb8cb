"""What the daemon answers on its control socket and `nixcache status` shows: one definition.

The daemon builds a :class:`Status` (daemon/control.py); `nixcache status` parses it back
(cli/status.py) and prints it, or prints the JSON as is with ``--json``.

Stdlib named tuples, not pydantic: `nixcache status` must answer in well under 100 ms, and
importing pydantic alone takes ~155 ms (dataclasses, through inspect, ~15 ms). The schema is
still written once, here, and :meth:`Status.from_json` refuses a reply that does not match it
(a daemon of another version).
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple

from nixcache.errors import NixcacheError


class Outage(NamedTuple):
    """Uploads are paused: the last error, and when the next attempt is due."""

    error: str
    retry_in: float


class Cycle(NamedTuple):
    """The last run of a periodic job (dereference, collection) and when the next is due."""

    last: float
    next: float
    summary: dict[str, Any]


class Status(NamedTuple):
    version: str
    pid: int
    uptime_seconds: float
    config_file: str | None
    bucket: str
    queue_depth: int
    in_flight: int
    pending: int
    uploaded: int
    failing: int
    failures: dict[str, str]
    """The most recent failures (at most 20), by store path."""
    outage: Outage | None
    roots: int
    dereference: Cycle | None
    collection: Cycle | None
    requests: dict[str, int]
    """S3 requests since start, by operation."""

    def as_dict(self) -> dict[str, Any]:
        """The reply as JSON values (nested records as objects, not lists)."""
        data = self._asdict()
        for name in ("outage", "dereference", "collection"):
            if data[name] is not None:
                data[name] = data[name]._asdict()
        return data

    def to_json(self) -> str:
        return json.dumps(self.as_dict())

    @classmethod
    def from_json(cls, text: str) -> Status:
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or set(data) != set(cls._fields):
                raise TypeError("unexpected fields")
            nested = {
                "outage": Outage(**data["outage"]) if data["outage"] else None,
                "dereference": Cycle(**data["dereference"]) if data["dereference"] else None,
                "collection": Cycle(**data["collection"]) if data["collection"] else None,
            }
            return cls(**{**data, **nested})
        except (ValueError, TypeError) as e:
            raise NixcacheError(f"the daemon's status reply is not what this nixcache expects ({e}): "
                                "restart it after an upgrade") from None  # fmt: skip

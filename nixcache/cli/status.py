"""`nixcache status`: ask the running daemon over its control socket (no S3 request).

Stdlib only: it must answer in well under 100 ms, and importing pydantic, asyncio and
structlog alone would take twice that. The socket sits beside the FIFO (``fifo`` in the
config file, read as plain TOML)."""

from __future__ import annotations

import json
import os
import socket
import time
from typing import TYPE_CHECKING

from nixcache import configfile, defaults
from nixcache.errors import NixcacheError

if TYPE_CHECKING:
    from typing import Any


def control_socket(config: str | os.PathLike[str] | None) -> str:
    """Where the daemon listens: beside ``fifo``, taken as the loader's pathlib.Path takes it
    (empty and ``.`` components dropped: ``run/hook.fifo/`` is ``run/hook.fifo``)."""
    data, path = configfile.read(config)
    fifo = data.get("fifo", defaults.FIFO)
    if not isinstance(fifo, str):
        raise NixcacheError(f"{path}: fifo: must be a path (a string)")
    parts = [part for part in fifo.split("/") if part not in ("", ".")]
    directory = "/".join(parts[:-1])
    return ("/" if fifo.startswith("/") else "") + (f"{directory}/" if directory else "") + "control.sock"


def query(path: str, command: str = "status") -> str:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(10)
            sock.connect(path)
            sock.sendall(command.encode() + b"\n")
            chunks = []
            while data := sock.recv(65536):
                chunks.append(data)
    except (FileNotFoundError, ConnectionRefusedError):
        raise NixcacheError(f"the daemon is not running (no control socket at {path})") from None
    except OSError as e:
        raise NixcacheError(f"cannot ask the daemon at {path}: {e.strerror or e}") from None
    return b"".join(chunks).decode()


def _when(t: float | None) -> str:
    if t is None:
        return "-"
    delta = t - time.time()
    return f"in {delta:.0f}s" if delta >= 0 else f"{-delta:.0f}s ago"


def render(status: dict[str, Any]) -> str:
    lines = [
        f"nixcache {status['version']} (pid {status['pid']}), up {status['uptime_seconds']:.0f}s, "
        f"config {status['config_file']}, bucket {status['bucket']}",
        f"uploads: {status['uploaded']} done, {status['in_flight']} in flight, {status['queue_depth']} queued, "
        f"{status['pending']} pending in the journal, {status.get('failing', len(status['failures']))} failing",
    ]
    if status.get("outage"):
        outage = status["outage"]
        lines.append(f"  paused: {outage['error']} (next attempt in {outage['retry_in']:.0f}s)")
    failures = status["failures"]
    lines += [f"  failing: {path}: {error}" for path, error in failures.items()]
    if status.get("failing", 0) > len(failures):
        lines.append(f"  … and {status['failing'] - len(failures)} more (the {len(failures)} most recent are shown)")
    lines.append(f"roots: {status['roots']} local roots published")
    for job in ("dereference", "collection"):
        cycle = status.get(job)
        if cycle:
            lines.append(f"{job}: last {_when(cycle['last'])}, next {_when(cycle['next'])}: {cycle['summary']}")
        else:
            lines.append(f"{job}: not run yet")
    requests = ", ".join(f"{k} {v}" for k, v in status["requests"].items()) or "none"
    lines.append(f"S3 requests since start: {requests}")
    return "\n".join(lines)


def status(config: str | os.PathLike[str] | None, as_json: bool) -> str:
    data = json.loads(query(control_socket(config)))
    return json.dumps(data, indent=2) if as_json else render(data)

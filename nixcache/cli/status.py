"""`nixcache status`: ask the running daemon over its control socket (no S3 request).

Stdlib only: it must answer in well under 100 ms, and importing pydantic, asyncio and
structlog alone would take twice that. The socket sits beside the FIFO (``fifo`` in the
config file, read as plain TOML); the reply is a :class:`nixcache.status.Status`."""

from __future__ import annotations

import argparse
import json
import os
import socket
import time

from nixcache import configfile, defaults
from nixcache.errors import NixcacheError
from nixcache.status import Status


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


def _when(t: float) -> str:
    delta = t - time.time()
    return f"in {delta:.0f}s" if delta >= 0 else f"{-delta:.0f}s ago"


def render(status: Status) -> str:
    lines = [
        f"nixcache {status.version} (pid {status.pid}), up {status.uptime_seconds:.0f}s, "
        f"config {status.config_file}, bucket {status.bucket}",
        f"uploads: {status.uploaded} done, {status.in_flight} in flight, {status.queue_depth} queued, "
        f"{status.pending} pending in the journal, {status.failing} failing",
    ]
    if status.outage:
        lines.append(f"  paused: {status.outage.error} (next attempt in {status.outage.retry_in:.0f}s)")
    failures = status.failures
    lines += [f"  failing: {path}: {error}" for path, error in failures.items()]
    if status.failing > len(failures):
        lines.append(f"  … and {status.failing - len(failures)} more (the {len(failures)} most recent are shown)")
    lines.append(f"roots: {status.roots} local roots published")
    for job, cycle in (("dereference", status.dereference), ("collection", status.collection)):
        if cycle:
            lines.append(f"{job}: last {_when(cycle.last)}, next {_when(cycle.next)}: {cycle.summary}")
        else:
            lines.append(f"{job}: not run yet")
    requests = ", ".join(f"{k} {v}" for k, v in status.requests.items()) or "none"
    lines.append(f"S3 requests since start: {requests}")
    return "\n".join(lines)


def show(config: str | os.PathLike[str] | None, as_json: bool) -> str:
    """The daemon's answer, checked against the one schema: as JSON, or for a person."""
    status = Status.from_json(query(control_socket(config)))
    return json.dumps(status.as_dict(), indent=2) if as_json else render(status)


def status(args: argparse.Namespace) -> int:
    print(show(args.config, args.json))
    return 0

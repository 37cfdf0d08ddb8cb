"""The post-build hook: hand the built paths to the daemon, never delay or fail the build.

Stdlib only (it runs after every build). Nix sets ``OUT_PATHS`` (empty in Nix 2.8) and
``DRV_PATH``. Paths go to the daemon's FIFO without blocking; if nobody reads it (daemon
down), the FIFO is missing or full, they go to a spool file the daemon imports later.
"""

from __future__ import annotations

import errno
import os
import sys
import time

if not __package__:  # run as a file (`python -S …/nixcache/local/hook.py`, see `script()`): skip site
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
from nixcache import defaults

FIFO_ENV = "NIXCACHE_FIFO"
SPOOL_ENV = "NIXCACHE_SPOOL"


def outputs_of_drv(drv_path: str) -> list[str]:
    """Output paths of an input-addressed derivation, read from the .drv file itself
    (``Derive([("out","/nix/store/…","",""),…``) — no process spawned."""
    try:
        with open(drv_path, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return []
    if not head.startswith(b"Derive(["):
        return []
    end = head.find(b"],[")
    if end < 0:
        return []
    outputs = []
    for entry in head[len(b"Derive([") : end].split(b'("')[1:]:  # name","path","hashAlgo","hash"),
        fields = entry.split(b'","')
        if len(fields) >= 2 and fields[1].startswith(b"/"):
            outputs.append(fields[1].decode())
    return outputs


def built_paths(env: dict[str, str]) -> list[str]:
    paths = env.get("OUT_PATHS", "").split()
    drv = env.get("DRV_PATH", "").strip()
    if not paths and drv:
        # The daemon resolves a .drv itself when the file gave us nothing (e.g. CA outputs).
        paths = outputs_of_drv(drv) or [drv]
    return paths


def locations(env: dict[str, str]) -> tuple[str, str]:
    """(fifo, spool dir): from the environment the hook script sets (no TOML parser to
    import: that is most of this hook's start-up), else the config file's two keys."""
    if env.get(FIFO_ENV, "").startswith("/") and env.get(SPOOL_ENV, "").startswith("/"):
        return env[FIFO_ENV], env[SPOOL_ENV]
    import tomllib

    path = env.get(defaults.CONFIG_ENV) or defaults.CONFIG_FILE
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError):
        data = {}
    fifo, state_dir = data.get("fifo"), data.get("state_dir")
    if not (isinstance(fifo, str) and fifo.startswith("/")):
        fifo = defaults.FIFO
    if not (isinstance(state_dir, str) and state_dir.startswith("/")):
        state_dir = defaults.STATE_DIR
    return fifo, defaults.spool_dir(state_dir)


def send_to_fifo(fifo: str, lines: list[bytes]) -> list[bytes]:
    """Write what fits to the FIFO without blocking; return the lines not written."""
    try:
        fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:  # ENXIO: no reader (daemon down); ENOENT: no FIFO
        return lines
    try:
        for i, line in enumerate(lines):
            try:
                # One line per write: ≤ PIPE_BUF bytes, so concurrent hooks never interleave.
                if os.write(fd, line) != len(line):
                    return lines[i + 1 :]
            except OSError as e:
                if e.errno in (errno.EAGAIN, errno.EPIPE):
                    return lines[i:]
                raise
        return []
    finally:
        os.close(fd)


def spool(spool_dir: str, lines: list[bytes]) -> None:
    os.makedirs(spool_dir, exist_ok=True)
    name = f"{time.time_ns()}-{os.getpid()}.paths"
    tmp = os.path.join(spool_dir, "." + name)
    with open(tmp, "wb") as f:
        # nix-daemon runs the hook as root: the unprivileged service must read it, whatever
        # the daemon's umask (store paths are no secret).
        os.fchmod(f.fileno(), 0o644)
        f.writelines(lines)
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, os.path.join(spool_dir, name))


def script(fifo: str, spool_dir: str) -> str:
    """A post-build-hook script that starts this module fast: ``python -S`` skips the
    site-packages start-up (.pth files), and the two locations come in the environment."""
    return (
        f"#!/bin/sh\n{FIFO_ENV}={fifo} {SPOOL_ENV}={spool_dir} "
        f"exec {sys.executable} -S -E -s {os.path.abspath(__file__)}\n"
    )


def main() -> int:
    env = dict(os.environ)
    try:
        paths = built_paths(env)
        if not paths:
            return 0
        fifo, spool_dir = locations(env)
        lines = [p.encode() + b"\n" for p in paths if len(p) < 4000]
        rest = send_to_fifo(fifo, lines)
        if rest:
            spool(spool_dir, rest)
    except Exception as e:  # never fail the build
        print(f"nixcache hook: {e}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The local Nix store: path validation and queries (through the Nix CLI)."""

from __future__ import annotations

import asyncio
import base64
import json
import re
from dataclasses import dataclass

from nixcache.errors import StoreError
from nixcache.formats import nix32

NIX_COMMAND = ["--extra-experimental-features", "nix-command"]
_BASENAME = re.compile(r"^[0-9a-df-np-sv-z]{32}-[A-Za-z0-9+\-._?=]{1,211}$")
MAX_PATH_LEN = 4096
NIX_TIMEOUT = 600.0
"""A Nix query that takes longer is given up (a hung nix-daemon must not hang the service)."""


def parse_store_path(text: str, store_dir: str) -> str:
    """Return ``text`` as a top-level store path of ``store_dir``, or raise StoreError."""
    if len(text) > MAX_PATH_LEN:
        raise StoreError(f"line of {len(text)} characters is not a store path")
    prefix = store_dir.rstrip("/") + "/"
    if not text.startswith(prefix):
        raise StoreError(f"{text[:200]!r} is not under {store_dir}")
    base = text[len(prefix) :]
    if not _BASENAME.match(base):
        raise StoreError(f"{text[:200]!r} is not a store path name")
    return text


def sri_to_nix32(sri: str) -> str:
    """``sha256-<base64>`` (or an already ``sha256:<nix32>``) → ``sha256:<nix32>``."""
    if sri.startswith("sha256:"):
        return sri
    algo, sep, b64 = sri.partition("-")
    if algo != "sha256" or not sep:
        raise StoreError(f"unsupported hash {sri!r}")
    return "sha256:" + nix32.encode(base64.b64decode(b64))


@dataclass(frozen=True)
class PathInfo:
    """What the local Nix database knows about a valid path. References are full paths."""

    path: str
    nar_hash: str  # sha256:<nix32>
    nar_size: int
    references: tuple[str, ...]
    deriver: str | None
    sigs: tuple[str, ...]
    ca: str | None

    @property
    def nar_hash_nix32(self) -> str:
        return self.nar_hash.split(":", 1)[1]

    def signed_by(self, key_names: frozenset[str]) -> bool:
        return any(s.split(":", 1)[0] in key_names for s in self.sigs)


def _path_info(entry: dict[str, object]) -> PathInfo:
    refs = entry.get("references") or []
    sigs = entry.get("signatures") or []
    deriver = entry.get("deriver")
    ca = entry.get("ca")
    assert isinstance(refs, list) and isinstance(sigs, list)
    return PathInfo(
        path=str(entry["path"]),
        nar_hash=sri_to_nix32(str(entry["narHash"])),
        nar_size=int(str(entry["narSize"])),
        references=tuple(sorted(str(r) for r in refs)),
        deriver=str(deriver) if deriver else None,
        sigs=tuple(str(s) for s in sigs),
        ca=str(ca) if ca else None,
    )


async def _run(*args: str) -> bytes:
    return (await _run_both(*args))[0]


async def _run_both(*args: str) -> tuple[bytes, bytes]:
    try:
        proc = await asyncio.create_subprocess_exec(
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
    except OSError as e:  # no `nix` on PATH: not the path's fault
        raise StoreError(f"cannot run {args[0]}: {e.strerror}") from None
    try:
        out, err = await asyncio.wait_for(proc.communicate(), NIX_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise StoreError(f"{args[0]} did not answer within {NIX_TIMEOUT:.0f} s") from None
    if proc.returncode != 0:
        lines = [ln for ln in err.decode(errors="replace").splitlines() if "error" in ln]
        raise StoreError((lines[-1] if lines else err.decode(errors="replace").strip()) or f"{args[0]} failed")
    return out, err


@dataclass(frozen=True)
class NixRoots:
    """Nix's own root listing (``nix-store --gc --print-roots``), as its collector sees it."""

    links: dict[str, str]
    """link → store path. Through nix-daemon the links of the GC roots directories are real
    names; runtime roots of other users' processes are censored."""
    unreadable: frozenset[str]
    """Potential roots Nix itself could not read (it skips them, with a message)."""


_CANNOT_READ = re.compile(r"cannot read potential root '(.*)'")


def parse_roots(out: str, err: str) -> NixRoots:
    links = {}
    for line in out.splitlines():
        link, sep, target = line.rpartition(" -> ")
        if sep and link:
            links[link] = target
    return NixRoots(links, frozenset(m.group(1) for m in _CANNOT_READ.finditer(err)))


async def gc_roots() -> NixRoots:
    """Ask Nix (nix-daemon, when ``NIX_REMOTE=daemon``) for every GC root it knows."""
    out, err = await _run_both("nix-store", "--gc", "--print-roots")
    return parse_roots(out.decode(errors="replace"), err.decode(errors="replace"))


async def closure(paths: list[str], recursive: bool = True) -> dict[str, PathInfo]:
    """Path infos of the closure of ``paths`` (all must be valid), keyed by path."""
    if not paths:
        return {}
    flags = ["--recursive"] if recursive else []
    out = await _run("nix", *NIX_COMMAND, "path-info", "--json", *flags, "--", *paths)
    return await asyncio.to_thread(_parse_infos, out)  # a system closure: thousands of entries


def _parse_infos(out: bytes) -> dict[str, PathInfo]:
    try:
        entries = json.loads(out)
    except json.JSONDecodeError as e:
        raise StoreError(f"nix path-info printed invalid JSON: {e}") from None
    infos: dict[str, PathInfo] = {}
    for entry in entries:
        if not entry.get("valid", True):
            raise StoreError(f"path '{entry.get('path')}' is not valid")
        info = _path_info(entry)
        infos[info.path] = info
    return infos


async def invalid_paths(paths: list[str]) -> list[str]:
    """Those of ``paths`` that are not valid in the store. Raises StoreError when Nix cannot be
    asked (nix-daemon restarting): then nothing is known to be invalid."""
    if not paths:
        return []
    out = await _run("nix-store", "--check-validity", "--print-invalid", "--", *paths)
    return out.decode().split()


async def derivation_outputs(drv_path: str) -> list[str]:
    """The output paths of a derivation (what the post-build hook built)."""
    out = await _run("nix-store", "--query", "--outputs", "--", drv_path)
    return out.decode().split()


def dump_command(path: str) -> list[str]:
    """The command that writes the NAR serialisation of ``path`` to stdout."""
    return ["nix-store", "--dump", "--", path]

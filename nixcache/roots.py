"""Local GC roots: find them the way Nix's collector does, select them, watch for changes.

A root is a symlink under ``gcroots_dir`` (or ``profiles_dir``) that leads, possibly through
other symlinks (``auto/<x>`` → ``/home/u/result`` → store), to a store path. Symlinks to
directories are followed (``profiles`` → ``/nix/var/nix/profiles`` and per-user profile dirs),
once each, so link loops end. Anything else is reported as a problem and skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import fnmatch
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from asyncinotify import Inotify, Mask, Watch

from nixcache.layout import gcinfo_name

MAX_LINK_DEPTH = 40
WATCH_MASK = (
    Mask.CREATE | Mask.DELETE | Mask.MOVED_FROM | Mask.MOVED_TO | Mask.DELETE_SELF | Mask.MOVE_SELF | Mask.ATTRIB
)


@dataclass(frozen=True)
class Root:
    store_path: str
    chains: tuple[tuple[str, ...], ...]
    """Every way it was found: the links followed, from the gcroots entry to the last link."""


@dataclass
class Scan:
    roots: dict[str, Root] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    """Directories that could not be listed: roots may be missing, so do not dereference."""
    dirs: set[str] = field(default_factory=set)
    """Every directory visited (to watch)."""


def _top_level(path: str, store_dir: str) -> str | None:
    prefix = store_dir.rstrip("/") + "/"
    if not path.startswith(prefix):
        return None
    name = path[len(prefix) :].split("/", 1)[0]
    return prefix + name if name else None


def scan(dirs: Iterable[Path], store_dir: str) -> Scan:
    """Find every root under ``dirs``. Pure file-system reads; never raises for junk."""
    result = Scan()
    chains: dict[str, list[tuple[str, ...]]] = {}
    visited: set[str] = set()

    def visit_dir(directory: str) -> None:
        real = os.path.realpath(directory)
        if real in visited:
            return
        visited.add(real)
        result.dirs.add(directory)
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError as e:
            result.unreadable.append(f"{directory}: {e.strerror}")
            return
        for entry in entries:
            try:
                if entry.is_symlink():
                    follow(entry.path)
                elif entry.is_dir(follow_symlinks=False):
                    visit_dir(entry.path)
                else:
                    result.problems.append(f"{entry.path}: not a symlink")
            except OSError as e:
                result.problems.append(f"{entry.path}: {e.strerror}")

    def follow(link: str) -> None:
        chain = [link]
        current = link
        for _ in range(MAX_LINK_DEPTH):
            target = os.path.join(os.path.dirname(current), os.readlink(current))
            target = os.path.normpath(target)
            store_path = _top_level(target, store_dir)
            if store_path is not None:
                if os.path.lexists(store_path):
                    chains.setdefault(store_path, []).append(tuple(chain))
                else:
                    result.problems.append(f"{link}: points to {store_path}, which is not in the store")
                return
            if not os.path.lexists(target):
                result.problems.append(f"{link}: dangling (→ {target})")
                return
            if os.path.islink(target):
                chain.append(target)
                current = target
                continue
            if os.path.isdir(target):
                visit_dir(target)
                return
            result.problems.append(f"{link}: points outside the store ({target})")
            return
        result.problems.append(f"{link}: link loop (more than {MAX_LINK_DEPTH} links)")

    for d in dirs:
        if os.path.isdir(d):
            visit_dir(str(d))
    result.roots = {p: Root(p, tuple(c)) for p, c in sorted(chains.items())}
    return result


def _matches(patterns: Iterable[str], names: Iterable[str]) -> bool:
    names = list(names)
    return any(fnmatch.fnmatchcase(n, p) for p in patterns for n in names)


def select(roots: dict[str, Root], include: Iterable[str], exclude: Iterable[str]) -> dict[str, Root]:
    """Roots to publish: one found through a chain of links that (with its store path)
    matches an ``include`` glob and no ``exclude`` glob."""
    include, exclude = list(include), list(exclude)
    chosen = {}
    for path, root in roots.items():
        for chain in root.chains:
            names = [*chain, path]
            if _matches(include, names) and not _matches(exclude, names):
                chosen[path] = root
                break
    return chosen


def is_kept(store_path: str, keep: Iterable[str]) -> bool:
    """Pinned by ``[roots] keep``: matched on the store path or the gcinfo name."""
    return _matches(keep, [store_path, gcinfo_name(store_path)])


class Watcher:
    """inotify on every directory a scan visited; ``changed`` is set on any event."""

    def __init__(self) -> None:
        self.inotify = Inotify()
        self.watches: dict[str, Watch] = {}
        self.changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def update(self, dirs: set[str]) -> None:
        """Watch exactly ``dirs`` (new ones added; vanished ones are dropped by the kernel)."""
        for d in dirs - self.watches.keys():
            try:
                self.watches[d] = self.inotify.add_watch(d, WATCH_MASK)
            except OSError:
                continue
        for d in set(self.watches) - dirs:
            watch = self.watches.pop(d)
            with contextlib.suppress(OSError, ValueError):  # already gone with its directory
                self.inotify.rm_watch(watch)

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="roots-watch")

    async def _run(self) -> None:
        async for _event in self.inotify:
            self.changed.set()

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self.inotify.close()

"""Local GC roots: find them the way Nix's collector does, select them, watch for changes.

A root is a symlink under ``gcroots_dir`` (or ``profiles_dir``) that leads, possibly through
other symlinks (``auto/<x>`` → ``/home/u/result`` → store), to a store path. Symlinks to
directories are followed (``profiles`` → ``/nix/var/nix/profiles`` and per-user profile dirs),
once each, so link loops end. Junk (a regular file, a link out of the store) is a problem, skipped.

Run unprivileged (the NixOS module's ``DynamicUser``), the scan cannot follow a link into a
0700 home directory. Such a link is *unresolved*, not gone: ``discover`` asks Nix (through
nix-daemon, which runs as root) for its root listing and takes the store path from there.
One that Nix cannot tell either (its target unreadable, a loop, an I/O error) is *unknown*:
its last known store path (``Memory``) stays a root; without one, nothing may be dereferenced.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fnmatch
import json
import os
import stat
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from asyncinotify import Inotify, Mask, Watch

from nixcache.errors import StoreError
from nixcache.local import store
from nixcache.local.journal import write_atomic
from nixcache.logs import get

log = get("nixcache.local.roots")

MAX_LINK_DEPTH = 40
WATCH_MASK = (
    Mask.CREATE | Mask.DELETE | Mask.MOVED_FROM | Mask.MOVED_TO | Mask.DELETE_SELF | Mask.MOVE_SELF | Mask.ATTRIB
)


@dataclass(frozen=True)
class Root:
    store_path: str
    chains: tuple[tuple[str, ...], ...]
    """Every way it was found: the links followed, from the gcroots entry to the last link."""


@dataclass(frozen=True)
class Unresolved:
    """A link whose chain this process could not follow to its end."""

    chain: tuple[str, ...]
    """The links followed, from the gcroots entry to the last one read."""
    target: str
    """What could not be read (the last link's target, or that link itself)."""
    errno: int
    """ENOENT: dangling as far as this process sees (a hidden home looks the same); else
    unreadable (EACCES), a loop (ELOOP), an I/O error…"""

    def describe(self) -> str:
        why = "dangling" if self.errno == errno.ENOENT else os.strerror(self.errno)
        return f"{self.chain[0]}: {why} (→ {self.target})"


@dataclass
class Scan:
    roots: dict[str, Root] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    unreadable: list[str] = field(default_factory=list)
    """Directories that could not be listed, and links nobody could resolve that had no last
    known store path: roots may be missing, so do not dereference."""
    dirs: set[str] = field(default_factory=set)
    """Every directory visited (to watch)."""
    unresolved: list[Unresolved] = field(default_factory=list)
    """Links this process could not follow (``resolve`` settles them)."""
    held: list[str] = field(default_factory=list)
    """Unknown links kept as roots by their last known store path (``resolve``)."""

    @property
    def complete(self) -> bool:
        """Every root is known: dereferencing cannot miss a live one."""
        return not self.unreadable and not self.unresolved


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
                elif os.path.lexists(path := os.path.join(store_dir, entry.name)) and entry.is_file():
                    # Nix's collector also takes a regular file named after a store path as
                    # a root of that path (the old `nix-store --add-root --indirect` form).
                    chains.setdefault(path, []).append((entry.path,))
                else:
                    result.problems.append(f"{entry.path}: not a symlink")
            except OSError as e:
                result.problems.append(f"{entry.path}: {e.strerror}")

    def follow(link: str) -> None:
        chain = [link]
        current = link
        for _ in range(MAX_LINK_DEPTH):
            try:
                target = os.path.normpath(os.path.join(os.path.dirname(current), os.readlink(current)))
            except OSError as e:
                result.unresolved.append(Unresolved(tuple(chain), current, e.errno or errno.EIO))
                return
            store_path = _top_level(target, store_dir)
            if store_path is not None:
                if os.path.lexists(store_path):
                    chains.setdefault(store_path, []).append(tuple(chain))
                else:
                    result.problems.append(f"{link}: points to {store_path}, which is not in the store")
                return
            try:
                mode = os.lstat(target).st_mode
            except OSError as e:  # ENOENT, or EACCES in a home this process may not enter
                result.unresolved.append(Unresolved(tuple(chain), target, e.errno or errno.EIO))
                return
            if stat.S_ISLNK(mode):
                chain.append(target)
                current = target
                continue
            if stat.S_ISDIR(mode):
                visit_dir(target)
                return
            result.problems.append(f"{link}: points outside the store ({target})")
            return
        result.unresolved.append(Unresolved(tuple(chain), current, errno.ELOOP))

    for d in dirs:
        if os.path.isdir(d):
            visit_dir(str(d))
    result.roots = {p: Root(p, tuple(c)) for p, c in sorted(chains.items())}
    return result


def resolve(result: Scan, listing: store.NixRoots | None, known: Mapping[str, str]) -> Scan:
    """Settle ``result.unresolved`` with Nix's own root listing (None: Nix could not be asked)
    and the last known store path of each gcroots entry. Fail safe: what is not shown gone
    stays a root (``held``) or makes the scan incomplete (``unreadable``)."""
    for u in result.unresolved:
        names = [*u.chain, u.target]
        chain = tuple(dict.fromkeys(names))
        found = next((listing.links[n] for n in names if n in listing.links), None) if listing else None
        if found is not None:
            _add(result.roots, found, chain)
            continue
        if listing is not None and u.errno == errno.ENOENT and not listing.unreadable.intersection(names):
            result.problems.append(u.describe())  # dangling for Nix (root) too: gone
            continue
        remembered = known.get(u.chain[0])
        if remembered is not None and os.path.lexists(remembered):
            _add(result.roots, remembered, chain)
            result.held.append(f"{u.describe()}: kept as {remembered}, its last known target")
            if listing is None:  # it may lead elsewhere now, to a root Nix would list
                result.unreadable.append(f"{u.describe()}: Nix could not be asked, the link may have changed")
            continue
        why = "Nix could not be asked" if listing is None else "Nix does not list it"
        result.unreadable.append(f"{u.describe()}: {why}, and no store path is known for it")
    result.unresolved = []
    return result


def _add(found: dict[str, Root], store_path: str, chain: tuple[str, ...]) -> None:
    old = found.get(store_path)
    found[store_path] = Root(store_path, (*old.chains, chain) if old else (chain,))


class Memory:
    """The store path each gcroots entry last led to (``<state_dir>/roots-known.json``), so
    a link that becomes unreadable keeps protecting what it rooted, across restarts too."""

    def __init__(self, state_dir: Path, write: bool = True) -> None:
        self.path = state_dir / "roots-known.json"
        self.write = write
        try:
            data = json.loads(self.path.read_bytes())
            self.known: dict[str, str] = {str(k): str(v) for k, v in data.items()}
        except (OSError, ValueError, AttributeError):
            self.known = {}

    def update(self, result: Scan) -> None:
        """Remember the entries of this scan (only those: removed links are forgotten)."""
        known = {chain[0]: root.store_path for root in result.roots.values() for chain in root.chains}
        if known == self.known:
            return
        self.known = known
        if self.write:
            try:
                write_atomic(self.path, json.dumps(known, sort_keys=True).encode())
            except OSError as e:
                log.warning("roots.memory_not_saved", path=str(self.path), error=e.strerror)


async def discover(dirs: Iterable[Path], store_dir: str, memory: Memory) -> Scan:
    """Scan, settle what could not be followed (asking Nix only then), remember."""
    result = await asyncio.to_thread(scan, list(dirs), store_dir)
    listing = None
    if result.unresolved:
        try:
            listing = await store.gc_roots()
        except StoreError as e:
            log.warning("roots.nix_unavailable", error=str(e), unresolved=len(result.unresolved))
    resolve(result, listing, memory.known)
    await asyncio.to_thread(memory.update, result)
    return result


def matches(patterns: Iterable[str], names: Iterable[str]) -> bool:
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
            if matches(include, names) and not matches(exclude, names):
                chosen[path] = root
                break
    return chosen


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

"""The gcinfo format: the closure of one GC root, gzip text. Pure.

    # nixcache-gcinfo 1 root=/nix/store/<hash>-<name>
    <hash>.narinfo <narHash nix32> <narSize>
    ...

One line per closure member (upstream-signed paths excluded), sorted. The first field is the
original design's; the NAR hash lets the collector name the NAR to delete (``nar/<narHash>.*``)
and check that no live path shares it, without downloading any narinfo; the size feeds `du`.
Readers ignore ``#`` lines and blank lines, and must reject anything else they do not parse.
"""

from __future__ import annotations

import gzip
import hashlib
import re
import sys
import zlib
from dataclasses import dataclass

from nixcache.errors import NixcacheError

VERSION = 1
_LINE = re.compile(r"^([0-9a-df-np-sv-z]{32})\.narinfo(?: ([0-9a-df-np-sv-z]{52}) ([0-9]+))?$")


class GcinfoError(NixcacheError, ValueError):
    """A gcinfo that does not parse: garbage collection must stop, not guess."""


@dataclass(frozen=True, order=True, slots=True)
class Member:
    hash_part: str
    nar_hash: str | None = None  # nix32, without "sha256:"
    nar_size: int | None = None

    def line(self) -> str:
        if self.nar_hash is None:
            return f"{self.hash_part}.narinfo"
        return f"{self.hash_part}.narinfo {self.nar_hash} {self.nar_size}"


@dataclass(frozen=True)
class Gcinfo:
    root: str
    members: tuple[Member, ...]

    @property
    def nar_size(self) -> int:
        return sum(m.nar_size or 0 for m in self.members)

    def render(self) -> bytes:
        """Deterministic gzip (mtime 0): the same closure always gives the same bytes, so an
        unchanged root is recognised by the object's ETag (MD5) and never rewritten."""
        text = f"# nixcache-gcinfo {VERSION} root={self.root}\n" + "".join(
            m.line() + "\n" for m in sorted(self.members)
        )
        return gzip.compress(text.encode(), compresslevel=9, mtime=0)


def parse(data: bytes, what: str = "gcinfo", shared: dict[str, Member] | None = None) -> Gcinfo:
    """Parse a gcinfo (ours, or the original tool's hash-only lines); GcinfoError if corrupt.
    ``shared``: lines already parsed (in other gcinfos) → their Member, reused: closures
    overlap, and one object per path serves every gcinfo listing it."""
    try:
        text = gzip.decompress(data).decode("utf-8")
    except (OSError, EOFError, UnicodeDecodeError, zlib.error) as e:
        raise GcinfoError(f"{what}: not a complete gzip text file ({e})") from None
    root = ""
    members = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.startswith("#"):
            if "root=" in line:
                root = line.split("root=", 1)[1].strip()
            continue
        if not line.strip():
            continue
        known = shared.get(line) if shared is not None else None
        if known is not None:
            members.append(known)
            continue
        m = _LINE.match(line.strip())
        if not m:
            raise GcinfoError(f"{what}: line {n} is not '<hash>.narinfo [<narHash> <narSize>]': {line[:80]!r}")
        # Interned: the same path appears in many gcinfos; one string object serves them all.
        member = Member(sys.intern(m[1]), sys.intern(m[2]) if m[2] else None, int(m[3]) if m[3] else None)
        if shared is not None:
            shared[line] = member
        members.append(member)
    return Gcinfo(root, tuple(members))


def etag_of(data: bytes) -> str:
    """The ETag S3 gives an object uploaded with one PUT: the hex MD5 of its bytes."""
    return hashlib.md5(data, usedforsecurity=False).hexdigest()

"""A local index of every narinfo in the bucket: the NAR it names and what it references.

narinfos are immutable once written (a rewrite changes the ETag), so each one is downloaded
once, ever: the collector LISTs the bucket (which it does anyway) and GETs only the narinfos
whose key and ETag the index does not hold yet. The index is an SQLite file in ``state_dir``;
deleting it is safe (it is rebuilt, at one GET per narinfo). Narinfos this host uploads are
recorded as they are written (their ETag is the MD5 of their text), so they cost no GET.
"""

from __future__ import annotations

import asyncio
import bz2
import contextlib
import gzip
import hashlib
import lzma
import sqlite3
import sys
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from nixcache.bucket import s3
from nixcache.bucket.inventory import UNREADABLE, Edges, Obj
from nixcache.errors import NixcacheError
from nixcache.formats.narinfo import NarInfo, NarInfoError
from nixcache.logs import get

log = get("nixcache.bucket.narindex")

GET_CONCURRENCY = 32
STORE_BATCH = 2000
SCHEMA = "CREATE TABLE IF NOT EXISTS narinfo (hash TEXT PRIMARY KEY, etag TEXT NOT NULL, url TEXT, refs TEXT)"


def decoded(data: bytes) -> bytes:
    """A narinfo as Nix's S3 store may write it (``narinfo-compression``: stored compressed,
    with a Content-Encoding that HTTP clients undo) → its text."""
    for magic, decompress in ((b"\xfd7zXZ\x00", lzma.decompress), (b"\x1f\x8b", gzip.decompress),
                              (b"BZh", bz2.decompress)):  # fmt: skip
        if data.startswith(magic):
            try:
                return decompress(data)
            except (OSError, EOFError, ValueError, lzma.LZMAError):
                return data
    return data


def edges_of(hash_part: str, text: bytes) -> Edges:
    """What a narinfo's text says (pure); UNREADABLE if it does not parse."""
    try:
        info = NarInfo.parse(decoded(text).decode("utf-8"))
    except (NarInfoError, UnicodeDecodeError):
        return UNREADABLE
    refs = tuple(sorted({r.split("-", 1)[0] for r in info.references} - {hash_part}))
    return Edges(info.url, refs)


def etag_of_text(text: bytes) -> str:
    return hashlib.md5(text, usedforsecurity=False).hexdigest()


class NarIndex:
    """The SQLite file. One connection per use; safe to share between processes (WAL)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.downloads = 0
        self.hits = 0

    @contextlib.contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            db = sqlite3.connect(self.path, timeout=30)
        except sqlite3.Error as e:
            raise NixcacheError(f"{self.path}: cannot open the narinfo index ({e})") from None
        try:
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            db.execute(SCHEMA)
            with db:
                yield db
        except sqlite3.Error as e:  # e.g. read-only, or corrupt: safe to delete, it is rebuilt
            raise NixcacheError(f"{self.path}: narinfo index: {e} (deleting it is safe: it is rebuilt)") from None
        finally:
            db.close()

    def record(self, written: list[tuple[str, bytes]]) -> None:
        """Remember narinfos this host has just written, (hash part, text) each, in one
        transaction (no GET needed for them later)."""
        rows = [(h, etag_of_text(text), e.url, " ".join(e.refs)) for h, text in written for e in [edges_of(h, text)]]
        with self._db() as db:
            db.executemany("INSERT OR REPLACE INTO narinfo VALUES (?, ?, ?, ?)", rows)

    def urls(self, hashes: set[str]) -> set[str]:
        """The NAR URLs the index already knows for these paths (no request)."""
        with self._db() as db:
            rows = db.execute("SELECT hash, url FROM narinfo").fetchall()
        return {url for h, url in rows if url and h in hashes}

    def _match(self, narinfos: Mapping[str, Obj]) -> tuple[dict[str, Edges], list[str]]:
        """(the edges the index holds for listed narinfos at their ETag, the indexed hashes no
        longer listed), streaming the table: nothing else of it is held in memory."""
        out: dict[str, Edges] = {}
        gone: list[str] = []
        with self._db() as db:
            for h, etag, url, refs in db.execute("SELECT hash, etag, url, refs FROM narinfo"):
                obj = narinfos.get(h)
                if obj is None:
                    gone.append(h)
                elif etag == obj.etag or not obj.etag:
                    refs_of = tuple(sys.intern(r) for r in refs.split())
                    out[h] = Edges(sys.intern(url), refs_of) if url else UNREADABLE
        return out, gone

    def _store(self, fresh: list[tuple[str, str, Edges]], gone: list[str]) -> None:
        with self._db() as db:
            db.executemany(
                "INSERT OR REPLACE INTO narinfo VALUES (?, ?, ?, ?)",
                [(h, etag, e.url, " ".join(e.refs)) for h, etag, e in fresh],
            )
            db.executemany("DELETE FROM narinfo WHERE hash = ?", [(h,) for h in gone])

    async def sync(
        self, bucket: s3.S3, narinfos: Mapping[str, Obj], progress: Callable[..., None] | None = None
    ) -> dict[str, Edges]:
        """Edges of every listed narinfo (by hash part): from the index, or one GET each for
        those it does not know at their current ETag (GET_CONCURRENCY at a time, stored as
        they come, in batches). A narinfo that vanished between the LIST and the GET is left
        out (it is no longer in the bucket)."""
        out, gone = await asyncio.to_thread(self._match, narinfos)
        self.hits += len(out)
        missing = [h for h in narinfos if h not in out]
        todo = iter(missing)
        fresh: list[tuple[str, str, Edges]] = []
        done = 0

        async def worker() -> None:
            nonlocal done, fresh
            for h in todo:  # shared: each hash is taken by one worker
                got = await bucket.get_with_etag(narinfos[h].key)
                done += 1
                if progress is not None:
                    progress("reading new narinfos", done, len(missing))
                if got is None:
                    continue
                data, etag = got
                e = out[h] = edges_of(h, data)
                if e.url is not None:  # never remember what does not parse: read it again next time
                    fresh.append((h, etag.strip('"'), e))
                if len(fresh) >= STORE_BATCH:
                    batch, fresh = fresh, []
                    await asyncio.to_thread(self._store, batch, [])

        await asyncio.gather(*(worker() for _ in range(min(GET_CONCURRENCY, len(missing)))))
        self.downloads += len(missing)
        await asyncio.to_thread(self._store, fresh, gone)
        if missing:
            log.info("narindex.synced", downloaded=len(missing), known=len(out) - len(missing), listed=len(narinfos))
        return out

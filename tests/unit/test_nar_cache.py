"""local/nar_cache.py: a Hypothesis model of the NAR cache under any interleaving of copies
(complete, cut, corrupt, abandoned, several at once), reads (some held open across other
steps), wrong sizes, deletions by hand and restarts: what is on disk never exceeds the budget
(copies in progress included), only bytes matching their name are ever kept, what is kept reads
back exactly, a file being read is never dropped, and the least recently used go first. Then
the copy's thread hand-offs: a slow disk drops the copy, never waits, and leaves nothing."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from pathlib import Path
from typing import BinaryIO

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from nixcache.formats import nix32
from nixcache.local import nar_cache
from nixcache.local.nar_cache import COPYING, LARGEST, NarCache, Writer, file_name

BUDGET = 8 * 64
CONTENTS = [
    bytes((seed * 7 + i) % 256 for i in range(size)) for seed, size in enumerate([0, 5, 64, 64, 64, 64, 64, 64, 60, 65])
]
"""More than fit (the room for kept NARs is 3/4 of BUDGET, 384 bytes): finished copies make room."""


def file_hash(data: bytes) -> str:
    return "sha256:" + nix32.encode(hashlib.sha256(data).digest())


def name_of(data: bytes) -> str:
    name = file_name(file_hash(data))
    assert name is not None
    return name


class NarCacheModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="nar-cache-model-"))
        self.cache = NarCache(self.dir, BUDGET)
        self.kept: OrderedDict[str, bytes] = OrderedDict()  # name → bytes, least recently used first
        self.gone: set[str] = set()  # deleted by hand, still in the cache's index
        self.copies: list[tuple[Writer, bytes]] = []
        self.held: list[tuple[object, BinaryIO, bytes]] = []  # reads in progress

    def teardown(self) -> None:
        for context, _, _ in self.held:
            context.__exit__(None, None, None)  # type: ignore[attr-defined]
        shutil.rmtree(self.dir, ignore_errors=True)

    def _stored(self) -> int:
        return sum(len(c) for c in self.kept.values())

    def _reserved(self) -> int:
        return sum(len(c) for _, c in self.copies)

    @rule(content=st.sampled_from(CONTENTS))
    def start_copy(self, content: bytes) -> None:
        writer = self.cache.writer(file_hash(content), len(content))
        name = name_of(content)
        expected = (
            0 < len(content) <= BUDGET // LARGEST
            and name not in self.kept
            and name not in self.gone
            and all(c != content for _, c in self.copies)
            and self._reserved() + len(content) <= BUDGET // COPYING
        )
        assert (writer is not None) == expected
        if writer is not None:
            self.copies.append((writer, content))

    @precondition(lambda self: self.copies)
    @rule(data=st.data(), how=st.sampled_from(["whole"] * 4 + ["cut", "corrupt", "longer", "abandoned"]))
    def end_copy(self, data: st.DataObject, how: str) -> None:
        writer, content = self.copies.pop(data.draw(st.integers(0, len(self.copies) - 1)))
        sent = {
            "whole": content,
            "cut": content[:-1],
            "corrupt": bytes([content[0] ^ 1]) + content[1:],
            "longer": content + b"!",
            "abandoned": content[: len(content) // 2],
        }[how]

        async def go() -> bool:
            for start in range(0, len(sent), 7):
                await writer.add(sent[start : start + 7])
            if how == "abandoned":
                writer.abort()
                return False
            kept = await writer.finish()
            writer.abort()  # what the substituter's finally does: a no-op once finished
            return kept

        kept = asyncio.run(go())
        room = BUDGET - BUDGET // COPYING
        if how == "whole":  # the model makes room as the cache must: least recently used, unread
            reading = {name for _, _, c in self.held for name in [name_of(c)]}
            for name in [n for n in self.kept if n not in reading]:
                if self._stored() + len(content) <= room:
                    break
                del self.kept[name]
            self.gone &= set(self.kept)
        assert kept == (how == "whole" and self._stored() + len(content) <= room)
        if kept:
            self.kept[name_of(content)] = content

    @rule(content=st.sampled_from(CONTENTS), wrong_size=st.booleans(), hold=st.booleans())
    def read(self, content: bytes, wrong_size: bool, hold: bool) -> None:
        name = name_of(content)
        context = self.cache.reading(file_hash(content), len(content) + (1 if wrong_size else 0))
        f = context.__enter__()
        if name in self.kept and name not in self.gone and not wrong_size:
            assert f is not None and f.read() == content
            self.kept.move_to_end(name)
            if hold:
                self.held.append((context, f, content))
                return
        else:
            assert f is None
            held = any(c == content for _, _, c in self.held)
            if name in self.kept and (name in self.gone or not held):
                del self.kept[name]  # missing, or not the size named and nobody reads it: dropped
                self.gone.discard(name)
        context.__exit__(None, None, None)

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def end_read(self, data: st.DataObject) -> None:
        context, f, content = self.held.pop(data.draw(st.integers(0, len(self.held) - 1)))
        f.seek(0)
        assert f.read() == content, "a file being read changed or went"
        context.__exit__(None, None, None)  # type: ignore[attr-defined]

    @rule(content=st.sampled_from(CONTENTS))
    def delete_by_hand(self, content: bytes) -> None:
        path = self.dir / name_of(content)
        if path.exists():
            path.unlink()
            self.gone.add(name_of(content))

    @precondition(lambda self: not self.copies and not self.held)
    @rule(budget=st.sampled_from([BUDGET, BUDGET // 2]))
    def restart(self, budget: int) -> None:
        (self.dir / "stray").write_bytes(b"x")  # not a NAR name: removed
        (self.dir / f".{'0' * 52}.1.2").write_bytes(b"half")  # a crash mid-copy: removed
        self.cache = NarCache(self.dir, budget)
        on_disk = {n: c for n, c in self.kept.items() if n not in self.gone}
        assert set(self.cache._sizes) <= set(on_disk)
        assert all(len(on_disk[n]) <= budget // LARGEST for n in self.cache._sizes)
        self.kept = OrderedDict((n, on_disk[n]) for n in self.cache._sizes)
        self.gone = set()
        if budget != BUDGET:  # and back, for the next steps
            self.cache = NarCache(self.dir, BUDGET)
            self.kept = OrderedDict((n, self.kept[n]) for n in self.cache._sizes)

    @invariant()
    def within_budget_and_exact(self) -> None:
        budget = self.cache.budget
        assert self.cache.used <= budget
        assert self.cache._stored <= budget - budget // COPYING
        assert self.cache.used == self._stored() + self._reserved()
        names = {name for name in os.listdir(self.dir) if not name.startswith(".")}
        assert names == set(self.kept) - self.gone
        for name in names:
            assert (self.dir / name).read_bytes() == self.kept[name]
            assert name == name_of(self.kept[name])
        leftovers = [name for name in os.listdir(self.dir) if name.startswith(".")]
        assert not leftovers, f"temporary files left behind: {leftovers}"


NarCacheModel.TestCase.settings = settings(max_examples=200, stateful_step_count=50, deadline=None)
test_nar_cache_model = NarCacheModel.TestCase


def test_a_slow_disk_drops_the_copy_never_the_client_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first batch's write does not end: the client's chunks keep coming until SLACK is
    queued, then wait LAG once, and the copy is dropped; the temporary file and the reservation
    go only when the thread is done with them (abort while it writes)."""
    monkeypatch.setattr(nar_cache, "BATCH", 1024)
    monkeypatch.setattr(nar_cache, "SLACK", 4096)
    monkeypatch.setattr(nar_cache, "LAG", 0.3)
    content = os.urandom(64 * 1024)
    cache = NarCache(tmp_path, 1 << 20)
    written, released = threading.Event(), threading.Event()
    real_write = Writer._write

    def slow_write(self: Writer, batch: bytes) -> None:
        real_write(self, batch)
        written.set()
        released.wait(5)

    monkeypatch.setattr(Writer, "_write", slow_write)

    async def go() -> None:
        writer = cache.writer(file_hash(content), len(content))
        assert writer is not None
        started = time.monotonic()
        for start in range(0, len(content), 512):
            await writer.add(content[start : start + 512])
        assert 0.3 <= time.monotonic() - started < 1.0, "the client waited for the disk more than LAG, once"
        assert writer._ended, "the copy was not dropped"
        assert await asyncio.to_thread(written.wait, 5)
        assert cache.used == len(content), "reservation released while the thread still writes"
        assert [name.startswith(".") for name in os.listdir(tmp_path)] == [True]
        released.set()
        for _ in range(100):
            await asyncio.sleep(0.02)
            if cache.used == 0:
                break
        assert cache.used == 0 and os.listdir(tmp_path) == []
        assert not await writer.finish()

    asyncio.run(go())


def test_a_copy_is_durable_before_it_has_its_name(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    synced: list[str] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    content = b"nar bytes" * 100
    cache = NarCache(tmp_path, 1 << 20)

    async def go() -> bool:
        writer = cache.writer(file_hash(content), len(content))
        assert writer is not None
        await writer.add(content)
        return await writer.finish()

    assert asyncio.run(go())
    name = name_of(content)
    assert synced[0].startswith(str(tmp_path / f".{name}.")) and synced[1] == str(tmp_path)
    assert (tmp_path / name).read_bytes() == content


def test_a_file_being_read_is_never_dropped_to_make_room(tmp_path: Path) -> None:
    """Dropping it would not free its disk (it is open) while the budget counted it freed."""
    budget = 8 * 64
    contents = [bytes([n]) * 64 for n in range(12)]
    cache = NarCache(tmp_path, budget)

    async def copy(content: bytes) -> bool:
        writer = cache.writer(file_hash(content), len(content))
        assert writer is not None
        await writer.add(content)
        return await writer.finish()

    for content in contents[:6]:  # the room for kept NARs: 3/4 of 512 bytes
        assert asyncio.run(copy(content))
    with cache.reading(file_hash(contents[0]), 64) as f:  # read: the most recently used now
        assert f is not None
        for content in contents[6:]:  # each makes room: 1…5 go, then 0 would, but it is read
            assert asyncio.run(copy(content))
        assert (tmp_path / name_of(contents[0])).exists(), "dropped while read"
        kept = sorted(p.name for p in tmp_path.iterdir())
        assert kept == sorted(name_of(c) for c in [contents[0], *contents[7:]])
    assert cache.used <= budget - budget // 4

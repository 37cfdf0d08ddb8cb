"""local/nar_cache.py: a Hypothesis model of the NAR cache under any interleaving of copies
(complete, cut, corrupt, abandoned, several at once), reads, deletions by hand and restarts:
the budget is never exceeded (copies in progress included), only bytes matching their
FileHash are ever kept, what is kept reads back exactly, and the least recently used go first."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import tempfile
from collections import OrderedDict
from pathlib import Path

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from nixcache.formats import nix32
from nixcache.local.nar_cache import LARGEST, NarCache, Writer

NAMES = [f"nar/{c * 52}.nar.zst" for c in "0123"]


def file_hash(data: bytes) -> str:
    return "sha256:" + nix32.encode(hashlib.sha256(data).digest())


class NarCacheModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.dir = Path(tempfile.mkdtemp(prefix="nar-cache-model-"))
        self.budget = 8 * 64
        self.cache = NarCache(self.dir, self.budget)
        self.kept: OrderedDict[str, bytes | None] = OrderedDict()  # None: deleted by hand
        self.copies: list[tuple[Writer, str, bytes]] = []
        self._size_gone: dict[str, int] = {}

    def teardown(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)

    def _reserved(self) -> int:
        return sum(len(content) for _, _, content in self.copies)

    def _stored(self) -> int:
        return sum(len(c) if c is not None else self._size_gone[k] for k, c in self.kept.items())

    @rule(key=st.sampled_from(NAMES), size=st.integers(0, 80), seed=st.integers(0, 255))
    def start_copy(self, key: str, size: int, seed: int) -> None:
        content = bytes((seed + i) % 256 for i in range(size))
        writer = self.cache.writer(key, size, file_hash(content))
        expected = 0 < size <= self.budget // LARGEST
        if expected:  # the model makes room as the cache must: least recently used first
            while self.kept and self._stored() + self._reserved() + size > self.budget:
                self.kept.popitem(last=False)
            expected = self._stored() + self._reserved() + size <= self.budget
        assert (writer is not None) == expected
        if writer is not None:
            self.copies.append((writer, key, content))

    @precondition(lambda self: self.copies)
    @rule(data=st.data(), how=st.sampled_from(["whole", "cut", "corrupt", "longer", "abandoned"]))
    def end_copy(self, data: st.DataObject, how: str) -> None:
        i = data.draw(st.integers(0, len(self.copies) - 1))
        writer, key, content = self.copies.pop(i)
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
        assert kept == (how == "whole")
        if kept:
            self.kept.pop(key, None)
            self.kept[key] = content
            self._size_gone.pop(key, None)

    @rule(key=st.sampled_from(NAMES))
    def read(self, key: str) -> None:
        opened = self.cache.open(key)
        if key in self.kept and self.kept[key] is not None:
            assert opened is not None
            f, size = opened
            with f:
                assert f.read() == self.kept[key] and size == len(self.kept[key] or b"")
            self.kept.move_to_end(key)
        else:
            assert opened is None
            self.kept.pop(key, None)

    @rule(key=st.sampled_from(NAMES))
    def delete_by_hand(self, key: str) -> None:
        path = self.dir / key.rpartition("/")[2]
        if path.exists():
            path.unlink()
            content = self.kept[key]
            assert content is not None
            self._size_gone[key] = len(content)
            self.kept[key] = None

    @precondition(lambda self: not self.copies)
    @rule()
    def restart(self) -> None:
        self.cache = NarCache(self.dir, self.budget)
        on_disk = {k: c for k, c in self.kept.items() if c is not None}
        self.kept = OrderedDict((f"nar/{name}", on_disk[f"nar/{name}"]) for name in self.cache._sizes)
        assert set(self.kept) == set(on_disk)

    @invariant()
    def within_budget_and_exact(self) -> None:
        assert self.cache.used <= self.budget
        assert self.cache.used == self._stored() + self._reserved()
        names = {name for name in os.listdir(self.dir) if not name.startswith(".")}
        assert names == {k.rpartition("/")[2] for k, c in self.kept.items() if c is not None}
        for key, content in self.kept.items():
            if content is not None:
                assert (self.dir / key.rpartition("/")[2]).read_bytes() == content
        leftovers = [name for name in os.listdir(self.dir) if name.startswith(".")]
        assert len(leftovers) <= len(self.copies), f"temporary files left behind: {leftovers}"


NarCacheModel.TestCase.settings = settings(max_examples=150, stateful_step_count=30, deadline=None)
test_nar_cache_model = NarCacheModel.TestCase


def test_a_crash_leaves_nothing_half_written_and_the_order_survives(tmp_path: Path) -> None:
    cache = NarCache(tmp_path, 1 << 20)

    async def copy(key: str, content: bytes) -> None:
        writer = cache.writer(key, len(content), file_hash(content))
        assert writer is not None
        await writer.add(content)
        assert await writer.finish()

    asyncio.run(copy(NAMES[0], b"a" * 100))
    asyncio.run(copy(NAMES[1], b"b" * 100))
    os.utime(tmp_path / NAMES[0].rpartition("/")[2], (1, 1))  # the oldest
    os.utime(tmp_path / NAMES[1].rpartition("/")[2], (2, 2))
    (tmp_path / f".{NAMES[2].rpartition('/')[2]}.123.456").write_bytes(b"half")  # a crash mid-copy
    opened = NarCache(tmp_path, 1 << 20).open(NAMES[0])  # a read makes it the most recent
    assert opened is not None
    opened[0].close()
    again = NarCache(tmp_path, 150)  # a smaller budget at start drops the least recently used
    assert list(again._sizes) == [NAMES[0].rpartition("/")[2]]
    assert sorted(os.listdir(tmp_path)) == [NAMES[0].rpartition("/")[2]]

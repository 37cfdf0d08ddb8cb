"""The NAR serialisation against Nix's own (`nix-store --dump`), and NarStream's check: the
compressed stream decompresses to exactly that NAR, and a path whose contents differ from
what the Nix database says (longer, shorter, same size) never yields its last chunk."""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nixcache.errors import NarHashMismatch, StoreError
from nixcache.formats import nar, nix32

pytestmark = pytest.mark.skipif(shutil.which("nix-store") is None, reason="needs nix-store")

SIZES = st.sampled_from([0, 1, 7, 8, 9, 4096, nar.BATCH_SIZE - 200, nar.BATCH_SIZE, nar.BATCH_SIZE + 13, 3 << 20])
NAMES = st.text(st.characters(codec="utf-8", exclude_characters="/\0"), min_size=1, max_size=12).filter(
    lambda n: n not in (".", "..")
)
# A node: ("file", size, executable) | ("link", target) | ("dir", {name: node})
NODES = st.recursive(
    st.tuples(st.just("file"), SIZES, st.booleans()) | st.tuples(st.just("link"), NAMES),
    lambda children: st.tuples(st.just("dir"), st.dictionaries(NAMES, children, max_size=5)),
    max_leaves=12,
)


def make(path: Path, node: tuple[object, ...], seed: int) -> None:
    kind = node[0]
    if kind == "file":
        size, executable = node[1], node[2]
        assert isinstance(size, int)
        path.write_bytes(hashlib.shake_256(str(seed).encode()).digest(size) if size else b"")
        path.chmod(0o755 if executable else 0o644)
    elif kind == "link":
        path.symlink_to(str(node[1]))
    else:
        path.mkdir()
        children = node[1]
        assert isinstance(children, dict)
        for i, (name, child) in enumerate(sorted(children.items())):
            make(path / name, child, seed * 31 + i)


def dump(path: Path) -> bytes:
    return subprocess.run(["nix-store", "--dump", str(path)], check=True, capture_output=True).stdout


@dataclass(frozen=True)
class Info:
    path: str
    nar_hash: str
    nar_size: int


def info_of(path: Path, data: bytes) -> Info:
    return Info(str(path), "sha256:" + nix32.encode(hashlib.sha256(data).digest()), len(data))


async def drain(stream: nar.NarStream) -> bytes:
    return b"".join([chunk async for chunk in stream])


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(node=NODES)
def test_the_serialisation_is_nixs_byte_for_byte(
    tmp_path_factory: pytest.TempPathFactory, node: tuple[object, ...]
) -> None:
    root = tmp_path_factory.mktemp("nar") / "root"
    make(root, node, 1)
    expected = dump(root)
    assert nar.nar_bytes(str(root)) == expected
    # Through the stream, one-shot or batch by batch: the file decompresses to that NAR and
    # the hashes and sizes are the stream's own.
    for compression in ("zstd", "none") if len(expected) > 1 << 16 else ("zstd", "xz", "none"):
        stream = nar.NarStream(info_of(root, expected), compression, 3)
        data = asyncio.run(drain(stream))
        if compression == "zstd":
            plain = zstandard.ZstdDecompressor().decompressobj().decompress(data)
        elif compression == "xz":
            import lzma

            plain = lzma.decompress(data)
        else:
            plain = data
        assert plain == expected
        assert stream.result.nar_size == len(expected)
        assert stream.result.file_size == len(data)
        assert stream.result.file_hash == "sha256:" + nix32.encode(hashlib.sha256(data).digest())


@pytest.mark.parametrize("size", [100, nar.BATCH_SIZE - 300, 5 << 20])
@pytest.mark.parametrize("change", ["longer", "shorter", "same size"])
def test_contents_other_than_the_databases_never_complete_the_stream(tmp_path: Path, size: int, change: str) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "f").write_bytes(os.urandom(size))
    info = info_of(root, dump(root))
    if change == "longer":
        (root / "g").write_bytes(b"x" * 10)
    elif change == "shorter":
        (root / "f").write_bytes(os.urandom(size - 16))
    else:
        with open(root / "f", "r+b") as f:
            f.seek(size // 2)
            f.write(b"\xff\xfe")
    actual = dump(root)
    stream = nar.NarStream(info, "zstd", 3)
    received: list[bytes] = []

    async def consume() -> None:
        async for chunk in stream:
            received.append(chunk)

    with pytest.raises(NarHashMismatch) as caught:
        asyncio.run(consume())
    # What the store holds is reported (hash and size of the actual NAR, read to its end)…
    assert info_of(root, actual).nar_hash in str(caught.value) and f"({len(actual)} bytes)" in str(caught.value)
    # …and the last chunk never came, so no upload consuming the stream completes.
    decompressor = zstandard.ZstdDecompressor().decompressobj()
    try:
        decompressor.decompress(b"".join(received))
        complete = decompressor.eof
    except zstandard.ZstdError:
        complete = False
    assert not complete


def test_a_cancelled_stream_ends_cancelled_and_leaves_no_file_open(tmp_path: Path) -> None:
    """From an adversarial review: the reader was closed on the event loop while its worker
    thread still read (descriptors leaked, or another stream's closed under it)."""
    for i in range(3000):
        (tmp_path / f"f{i:05d}").write_bytes(os.urandom(1500))
    info = info_of(tmp_path, nar.nar_bytes(str(tmp_path)))
    outcomes: list[str] = []

    async def main() -> None:
        for i in range(30):
            stream = nar.NarStream(info, "zstd", 3)
            task = asyncio.create_task(drain(stream))
            await asyncio.sleep(0.001 * (i % 10))
            task.cancel()
            try:
                await task
            except BaseException as e:
                outcomes.append(type(e).__name__)

    asyncio.run(main())
    fds = Path("/proc/self/fd")
    open_here = [t for fd in fds.iterdir() if (t := os.readlink(fd) if fd.exists() else "").startswith(str(tmp_path))]
    assert set(outcomes) <= {"CancelledError"} and open_here == []


def test_an_entry_replaced_after_its_lstat_is_an_error_not_a_hang(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    (root / "f").write_bytes(b"contents")
    real_lstat = os.lstat

    def lstat_then_swap(path: bytes) -> os.stat_result:
        st = real_lstat(path)
        if path.endswith(b"/f"):
            os.unlink(path)
            os.mkfifo(path)  # opened blocking, this would wait for a writer forever
        return st

    monkeypatch.setattr(nar.os, "lstat", lstat_then_swap)
    with pytest.raises(StoreError, match="changed while it was read"):
        nar.nar_bytes(str(root))

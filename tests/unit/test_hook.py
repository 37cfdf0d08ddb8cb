"""The post-build hook: output resolution, FIFO without blocking, spool fallback."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from nixcache import hook

DRV = (
    'Derive([("dev","/nix/store/00000000000000000000000000000000-x-dev","",""),'
    '("out","/nix/store/11111111111111111111111111111111-x","","")],'
    '[("/nix/store/22222222222222222222222222222222-dep.drv",["out"])],[],"x86_64-linux","/bin/sh",[],[])'
)


def test_outputs_come_from_out_paths_else_the_drv_file(tmp_path: Path) -> None:
    drv = tmp_path / "x.drv"
    drv.write_text(DRV)
    assert hook.built_paths({"OUT_PATHS": "/nix/store/a /nix/store/b", "DRV_PATH": str(drv)}) == [
        "/nix/store/a",
        "/nix/store/b",
    ]
    assert hook.built_paths({"OUT_PATHS": "", "DRV_PATH": str(drv)}) == [
        "/nix/store/00000000000000000000000000000000-x-dev",
        "/nix/store/11111111111111111111111111111111-x",
    ]
    # Unreadable or unexpected .drv: the daemon gets the .drv and resolves it itself.
    assert hook.built_paths({"DRV_PATH": str(tmp_path / "gone.drv")}) == [str(tmp_path / "gone.drv")]
    assert hook.built_paths({}) == []


def test_no_reader_means_spool(tmp_path: Path) -> None:
    fifo = tmp_path / "f"
    os.mkfifo(fifo)
    lines = [b"/nix/store/a\n"]
    assert hook.send_to_fifo(str(fifo), lines) == lines
    assert hook.send_to_fifo(str(tmp_path / "missing"), lines) == lines
    hook.spool(str(tmp_path / "spool"), lines)
    (spooled,) = (tmp_path / "spool").iterdir()
    assert spooled.read_bytes() == b"/nix/store/a\n" and not spooled.name.startswith(".")


def test_full_fifo_spools_the_rest_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "f"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    try:
        lines = [f"/nix/store/{i:032d}-{'x' * 200}\n".encode() for i in range(2000)]  # > 64 KiB pipe
        started = time.monotonic()
        rest = hook.send_to_fifo(str(fifo), lines)
        assert time.monotonic() - started < 1
        assert 0 < len(rest) < len(lines)
        written = os.read(reader, 1 << 20)
        assert written + b"".join(rest) == b"".join(lines)
    finally:
        os.close(reader)


@pytest.mark.parametrize("config_text", [None, "not toml ["])
def test_hook_never_fails(tmp_path: Path, config_text: str | None) -> None:
    env = {"PATH": os.environ["PATH"], "OUT_PATHS": "/nix/store/" + "0" * 32 + "-x", "DRV_PATH": ""}
    config = tmp_path / "c.toml"
    if config_text is not None:
        config.write_text(config_text)
    env["NIXCACHE_CONFIG"] = str(config)
    # With no state dir writable at the default location the hook still exits 0.
    r = subprocess.run(["python", "-m", "nixcache.hook"], env=env, capture_output=True, timeout=5)
    assert r.returncode == 0


def test_hook_spools_to_configured_state_dir(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\nfifo = "{tmp_path / "none.fifo"}"\n')
    env = {**os.environ, "NIXCACHE_CONFIG": str(config), "OUT_PATHS": "/nix/store/p1 /nix/store/p2"}
    assert subprocess.run(["python", "-m", "nixcache.hook"], env=env, timeout=5).returncode == 0
    (spooled,) = (tmp_path / "state" / "spool").iterdir()
    assert spooled.read_text().split() == ["/nix/store/p1", "/nix/store/p2"]

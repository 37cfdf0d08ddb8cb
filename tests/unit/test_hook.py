"""The post-build hook: output resolution, FIFO without blocking, spool fallback."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from nixcache.local import hook

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


def test_broken_config_falls_back_to_defaults(tmp_path: Path) -> None:
    for text in ("not toml [", "fifo = 5\nstate_dir = 'relative/dir'\n"):
        (tmp_path / "c.toml").write_text(text)
        assert hook.locations({"NIXCACHE_CONFIG": str(tmp_path / "c.toml")}) == (
            "/run/nixcache/hook.fifo",
            "/var/lib/nixcache/spool",
        )


def test_hook_never_fails_even_when_it_cannot_spool(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('state_dir = "/proc/nixcache-cannot-exist"\nfifo = "/proc/nixcache-cannot-exist/f"\n')
    env = {"PATH": os.environ["PATH"], "NIXCACHE_CONFIG": str(config), "OUT_PATHS": "/nix/store/x", "DRV_PATH": ""}
    r = subprocess.run([sys.executable, "-m", "nixcache.local.hook"], env=env, capture_output=True, timeout=5)
    assert r.returncode == 0
    assert b"nixcache hook:" in r.stderr


def test_fast_script_runs_the_hook(tmp_path: Path) -> None:
    script = tmp_path / "hook.sh"
    script.write_text(hook.script(str(tmp_path / "none.fifo"), str(tmp_path / "state" / "spool")))
    script.chmod(0o755)
    r = subprocess.run([str(script)], env={"OUT_PATHS": "/nix/store/p1"}, timeout=5)
    assert r.returncode == 0
    (spooled,) = (tmp_path / "state" / "spool").iterdir()
    assert spooled.read_text() == "/nix/store/p1\n"


def test_hook_spools_to_configured_state_dir(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(f'state_dir = "{tmp_path / "state"}"\nfifo = "{tmp_path / "none.fifo"}"\n')
    env = {**os.environ, "NIXCACHE_CONFIG": str(config), "OUT_PATHS": "/nix/store/p1 /nix/store/p2"}
    assert subprocess.run([sys.executable, "-m", "nixcache.local.hook"], env=env, timeout=5).returncode == 0
    (spooled,) = (tmp_path / "state" / "spool").iterdir()
    assert spooled.read_text().split() == ["/nix/store/p1", "/nix/store/p2"]

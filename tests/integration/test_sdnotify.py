"""systemd notify protocol: READY only once the FIFO and the roots watcher are up; watchdog pings."""

from __future__ import annotations

import os
import socket
import stat
import time
from pathlib import Path

from nixcache.bucket.layout import gcinfo_name
from tests.harness import Bucket, Daemon, base_settings, nix_build, wait_until, write_config


def test_ready_after_fifo_and_watchers_then_watchdog_pings(
    tmp_path: Path, bucket: Bucket, signing_key: tuple[Path, str]
) -> None:
    settings = base_settings(tmp_path, bucket, signing_key[0])
    settings["roots"]["rescan_interval"] = 3600  # a new root can only be noticed through inotify
    config = write_config(tmp_path / "config.toml", settings)
    fifo = tmp_path / "run" / "hook.fifo"
    address = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.settimeout(30)
    messages: list[tuple[float, str]] = []
    try:
        daemon = Daemon(config, tmp_path / "daemon.log").start(
            wait_ready=False, env={"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "1000000"}
        )
        data = sock.recv(4096).decode()
        # The first message is READY=1, and by then the FIFO exists and the roots are watched.
        assert data.splitlines()[0] == "READY=1", data
        assert stat.S_ISFIFO(os.stat(fifo).st_mode)
        assert any(line.startswith("STATUS=") for line in data.splitlines())
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline:
            try:
                sock.settimeout(max(0.01, deadline - time.monotonic()))
                messages.append((time.monotonic(), sock.recv(4096).decode()))
            except TimeoutError:
                break
        pings = [t for t, m in messages if "WATCHDOG=1" in m]
        assert len(pings) >= 3, messages  # every 0.5 s for WatchdogSec=1 s

        top = nix_build(tmp_path)[-1]
        (tmp_path / "gcroots" / "new-root").symlink_to(top)
        wait_until(lambda: bucket.get(f"gcroots/testhost/{gcinfo_name(top)}"), 10, "published via inotify")
        assert daemon.stop() == 0
    finally:
        sock.close()


def test_without_notify_socket_nothing_is_sent(tmp_path: Path) -> None:
    from nixcache.daemon import sdnotify

    os.environ.pop("NOTIFY_SOCKET", None)
    assert sdnotify.notify("READY=1") is False
    assert sdnotify.watchdog_period() is None

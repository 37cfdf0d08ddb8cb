"""The command line's shape: every command has exactly one handler, printing stays in cli/,
and `nixcache status` renders the daemon's reply through the shared schema, fast."""

from __future__ import annotations

import argparse
import ast
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nixcache import cli
from nixcache.cli import status as statuscmd
from nixcache.status import Cycle, Outage, Status

PACKAGE = Path(cli.__file__).resolve().parents[1]


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_command_has_one_handler_and_every_handler_a_command() -> None:
    assert sorted(subcommands(cli._parser())) == sorted(cli.COMMANDS)
    for command in cli.COMMANDS:
        run, _ = cli.handler(command)
        assert callable(run), command


def test_an_unknown_command_is_refused_not_sent_anywhere(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit:
        cli.main(["publsh", "--config", "/nonexistent"])
    assert exit.value.code == 2
    assert "invalid choice: 'publsh'" in capsys.readouterr().err
    with pytest.raises(KeyError):
        cli.handler("publsh")


def test_only_the_command_line_prints() -> None:
    """Operations return values; what reaches the terminal is written in cli/ (the post-build
    hook prints its one error line itself: it runs without the command line)."""
    printing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.parent.name == "cli" or path == PACKAGE / "local" / "hook.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                printing.append(f"{path.relative_to(PACKAGE)}:{node.lineno}")
    assert printing == []


def test_status_starts_without_the_heavy_libraries() -> None:
    code = "import sys, nixcache.cli as c; c.main(['status', '--config', '/nonexistent']); print(*sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    loaded = set(out.stdout.split())
    assert "nixcache.cli.status" in loaded, out.stderr
    assert not {m.split(".")[0] for m in loaded} & {"pydantic", "asyncio", "structlog", "botocore", "aiobotocore"}
    assert "config file /nonexistent does not exist" in out.stderr


def reply(**changes: object) -> Status:
    now = time.time()
    fields = {
        "version": "0.1.0", "pid": 42, "uptime_seconds": 3600.4, "config_file": "/etc/nixcache/config.toml",
        "bucket": "my-cache", "queue_depth": 1, "in_flight": 2, "pending": 3, "uploaded": 17, "failing": 22,
        "failures": {f"/nix/store/{i}-x": "boom" for i in range(20)}, "outage": Outage("SlowDown", 29.6),
        "roots": 5, "dereference": Cycle(now - 60, now + 1740, {"moved": 0}), "collection": None,
        "requests": {"GetObject": 4, "PutObject": 9},
    }  # fmt: skip
    return Status(**{**fields, **changes})  # type: ignore[arg-type]


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[Path, list[bytes]]]:
    """A control socket answering what the test puts in the list, where the config says."""
    (tmp_path / "run").mkdir()
    config = tmp_path / "config.toml"
    config.write_text(f'fifo = "{tmp_path}/run/hook.fifo"\n')
    answers: list[bytes] = []
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(tmp_path / "run" / "control.sock"))
    server.listen()

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with conn:
                assert conn.recv(100) == b"status\n"
                conn.sendall(answers.pop(0))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield config, answers
    server.close()


def test_status_renders_the_reply_from_the_schema(
    daemon: tuple[Path, list[bytes]], capsys: pytest.CaptureFixture[str]
) -> None:
    config, answers = daemon
    status = reply()
    answers.append(status.to_json().encode() + b"\n")
    assert cli.main(["status", "--config", str(config)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "nixcache 0.1.0 (pid 42), up 3600s, config /etc/nixcache/config.toml, bucket my-cache"
    assert lines[1] == "uploads: 17 done, 2 in flight, 1 queued, 3 pending in the journal, 22 failing"
    assert lines[2] == "  paused: SlowDown (next attempt in 30s)"
    assert lines[3] == "  failing: /nix/store/0-x: boom" and len(lines) == 3 + 20 + 5
    assert lines[23] == "  … and 2 more (the 20 most recent are shown)"
    assert lines[24] == "roots: 5 local roots published"
    assert lines[25] == "dereference: last 60s ago, next in 1740s: {'moved': 0}"
    assert lines[26] == "collection: not run yet"
    assert lines[27] == "S3 requests since start: GetObject 4, PutObject 9"

    answers.append(status.to_json().encode())
    assert cli.main(["status", "--json", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert out == json.dumps(json.loads(status.to_json()), indent=2) + "\n"
    assert json.loads(out) == status.as_dict()


def test_status_of_a_quiet_daemon(daemon: tuple[Path, list[bytes]], capsys: pytest.CaptureFixture[str]) -> None:
    config, answers = daemon
    quiet = reply(failing=0, failures={}, outage=None, dereference=None, requests={})
    answers.append(quiet.to_json().encode())
    assert cli.main(["--log-level", "debug", "status", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "paused" not in out and "failing:" not in out
    assert out.endswith("dereference: not run yet\ncollection: not run yet\nS3 requests since start: none\n")


def test_status_refuses_a_reply_of_another_version(
    daemon: tuple[Path, list[bytes]], capsys: pytest.CaptureFixture[str]
) -> None:
    config, answers = daemon
    old = {k: v for k, v in json.loads(reply().to_json()).items() if k != "failing"}
    answers.append(json.dumps(old).encode())
    assert cli.main(["status", "--config", str(config)]) == 1
    assert "restart it after an upgrade" in capsys.readouterr().err


def test_status_without_a_daemon(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.toml"
    config.write_text(f'fifo = "{tmp_path}/hook.fifo"\n')
    assert cli.main(["status", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert err == f"nixcache: the daemon is not running (no control socket at {tmp_path}/control.sock)\n"
    assert statuscmd.control_socket(str(config)) == os.path.join(tmp_path, "control.sock")

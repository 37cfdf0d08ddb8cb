"""The command line against real components: a command with nothing to report says so, and
`serve --embedded` writes a config the loader reads back — real SeaweedFS, real Nix."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from nixcache.config import load_config
from nixcache.daemon import embedded
from tests.harness import Bucket, base_settings, nix_build, run_cli, wait_until, write_config

Key = tuple[Path, str]


def test_every_command_on_an_empty_bucket_says_there_was_nothing(
    tmp_path: Path, bucket: Bucket, signing_key: tuple[Path, str]
) -> None:
    config = write_config(tmp_path / "config.toml", base_settings(tmp_path, bucket, signing_key[0]))

    roots = run_cli(config, "roots")
    assert roots.returncode == 0, roots.stderr
    assert roots.stdout == f"no GC roots found under {tmp_path / 'gcroots'}, and none published by testhost\n"

    said = {
        ("publish",): "published 0, unchanged 0, failed 0; S3 requests: ",
        ("dereference", "--dry-run"): "0 gcinfo(s) would move; S3 requests: ",
        ("dereference",): "0 gcinfo(s) moved; S3 requests: ",
        ("gc", "--dry-run"): "would delete 0 objects, 0.00 MB (0 bytes): 0 dead paths, ",
        ("gc",): "deleted 0 objects, 0.00 MB (0 bytes): 0 dead paths, ",
        ("du",): "      0.00 MB  total in the bucket",
        ("verify",): "0 narinfos, 0 live gcinfos, signatures by nixcache-test-1: 0 problem(s)",
    }
    for args, line in said.items():
        r = run_cli(config, *args)
        assert r.returncode == 0, f"{args}: {r.stdout}{r.stderr}"
        assert line in r.stdout, f"{args}: {r.stdout}"
    assert run_cli(config, "roots").stdout.startswith("no GC roots found under ")


def test_embedded_config_is_written_as_toml_and_read_back(tmp_path: Path) -> None:
    """The generated config is TOML written by a TOML writer: a state dir whose name would
    have broken a hand-formatted string (a quote, a backslash) comes back as it was."""
    state = tmp_path / 'try "it" \\out'
    cfg, config_file, weed = embedded.prepare(state)
    s3 = {"bucket": embedded.BUCKET, "endpoint": weed.endpoint, "credentials_file": str(state / "credentials")}
    try:
        assert tomllib.loads(config_file.read_text()) == {
            "state_dir": str(state),
            "fifo": str(state / "hook.fifo"),
            "gcroots_dir": str(state / "gcroots"),
            "profiles_dir": "",
            "s3": s3,
            "signing": {"secret_key_file": str(state / "signing.key")},
        }
        assert cfg == load_config(config_file)[0]
        assert cfg.state_dir == state and cfg.gcroots_dir == state / "gcroots" and cfg.profiles_dir == ""
    finally:
        weed.stop()


def test_serve_embedded_prints_how_to_use_it_and_stops_on_sigterm(tmp_path: Path) -> None:
    state = tmp_path / "embedded"
    log = tmp_path / "serve.log"
    with log.open("wb") as err:
        serve = subprocess.Popen(
            [sys.executable, "-m", "nixcache.cli", "serve", "--embedded", str(state)],
            stdout=subprocess.DEVNULL, stderr=err, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    try:
        wait_until(lambda: "service.ready" in log.read_text() or serve.poll() is not None, 60, "the daemon ready")
        text = log.read_text()
        assert serve.poll() is None, text
        public = (state / "signing.pub").read_text().strip()
        assert f"  trusted key:       {public}\n" in text
        assert f"  config:            {state / 'config.toml'}\n" in text
        assert "nixcache: embedded SeaweedFS at http://127.0.0.1:" in text
    finally:
        serve.send_signal(signal.SIGTERM)
        code = serve.wait(timeout=60)
    assert code == 0, log.read_text()[-3000:]
    s3_port = json.loads((state / "seaweedfs-ports.json").read_text())["s3"]
    with socket.socket() as s, pytest.raises(ConnectionRefusedError):  # `serve` stopped SeaweedFS too
        s.connect(("127.0.0.1", s3_port))


def test_push_reports_the_missing_signing_key_before_opening_the_bucket(
    tmp_path: Path, bucket: Bucket, signing_key: Key
) -> None:
    """`nixcache push` loads the signing key before it opens the S3 client: with two mistakes
    in the config (the key file missing, an AWS profile that does not exist) the user is told
    about the key, as before the `cli/` package (exit 1)."""
    settings = base_settings(tmp_path, bucket, tmp_path / "no-such.key")
    settings["s3"]["profile"] = "no-such-profile"
    config = write_config(tmp_path / "config.toml", settings)
    path = nix_build(tmp_path)[-1]
    pushed = run_cli(config, "push", path)
    assert pushed.returncode == 1, pushed.stdout + pushed.stderr
    assert pushed.stdout == ""
    assert pushed.stderr.startswith(f"nixcache: signing key file {tmp_path / 'no-such.key'} does not exist"), (
        pushed.stderr
    )

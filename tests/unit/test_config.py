"""Config loading: clear messages for every kind of mistake."""

from __future__ import annotations

from pathlib import Path

import pytest

from nixcache.config import load_config, load_signing_key
from nixcache.errors import ConfigError, SigningError

MINIMAL = '[s3]\nbucket = "my-cache"\n[signing]\nsecret_key_file = "/nonexistent/key"\n'


def test_minimal_config_gets_defaults(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text(MINIMAL)
    cfg, path = load_config(p)
    assert path == p
    assert cfg.upload.compression == "zstd" and cfg.upload.level() == 3
    assert cfg.upload.skip_signed_by == ("cache.nixos.org-1",)
    assert cfg.s3.addressing_style == "path"
    assert str(cfg.gcroots_dir) == "/nix/var/nix/gcroots"


def test_env_variable_names_the_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = tmp_path / "env.toml"
    p.write_text(MINIMAL.replace("my-cache", "from-env"))
    monkeypatch.setenv("NIXCACHE_CONFIG", str(p))
    assert load_config(None)[0].s3.bucket == "from-env"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not [toml", "not valid TOML"),
        ('[signing]\nsecret_key_file = "/k"\n', "s3: Field required"),
        (MINIMAL + '[upload]\ncompression = "gzip"\n', "upload.compression"),
        (MINIMAL + "[upload]\nworkers = 0\n", "upload.workers"),
        (MINIMAL + "typo_key = 1\n", "typo_key"),
    ],
)
def test_invalid_configs_name_the_problem(tmp_path: Path, text: str, message: str) -> None:
    p = tmp_path / "c.toml"
    p.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(p)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "absent.toml")


def test_missing_key_file_says_how_to_make_one(tmp_path: Path) -> None:
    p = tmp_path / "c.toml"
    p.write_text(MINIMAL)
    with pytest.raises(SigningError, match="generate-binary-cache-key"):
        load_signing_key(load_config(p)[0])


def test_status_finds_the_socket_the_daemon_listens_on_or_says_why_not(tmp_path: Path) -> None:
    """`nixcache status` reads `fifo` without the validating loader: same socket as the daemon's
    `cfg.fifo.parent / "control.sock"`, or one clear error."""
    from nixcache.cli.status import control_socket
    from nixcache.config import load_config
    from nixcache.errors import NixcacheError

    config = tmp_path / "c.toml"
    base = '[s3]\nbucket = "bkt"\n[signing]\nsecret_key_file = "/k"\n'
    for fifo in ("/run/x/hook.fifo", "/run/x/hook.fifo/", "/run//x/./hook.fifo", "run/hook.fifo", "hook.fifo"):
        config.write_text(f'fifo = "{fifo}"\n' + base)
        assert control_socket(config) == str(load_config(config)[0].fifo.parent / "control.sock"), fifo
    config.write_text(base)
    assert control_socket(config) == str(load_config(config)[0].fifo.parent / "control.sock")
    config.write_text("fifo = 5\n" + base)
    with pytest.raises(NixcacheError, match="fifo: must be a path"):
        control_socket(config)

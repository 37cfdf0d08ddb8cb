"""The NixOS module and the flake: parse, evaluate (without nixpkgs), and check the result
against nixcache itself — its config loader and its CLI."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest

from nixcache.cli import _parser
from nixcache.config import parse_config

ROOT = Path(__file__).resolve().parents[2]
PUBLIC = "my-cache-1:XPnWsxF43W5WV9nl6TFA1EhYkehVMIZOs20wu4f8A5c="
BASE = (
    'enable = true; bucket = "my-cache"; endpoint = "https://s3.example.org"; '
    f'signingKeyFile = "/etc/nixcache/signing.key"; publicKey = "{PUBLIC}";'
)


def evaluate(user: str, seed: bool = False) -> dict[str, Any]:
    r = subprocess.run(
        ["nix-instantiate", "--eval", "--strict", "--json", "--read-write-mode", str(ROOT / "tests/nix/eval.nix"),
         "--arg", "user", user, "--arg", "seed", "true" if seed else "false"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def rendered_settings(result: dict[str, Any]) -> dict[str, Any]:
    """The settings the module rendered (the test's pkgs.formats.toml keeps them as JSON)."""
    config_path = result["service"]["serviceConfig"]["ExecStart"].split("--config ")[1]
    return json.loads(Path(config_path).read_text())  # type: ignore[no-any-return]


@pytest.mark.parametrize("path", ["flake.nix", "module.nix", "nix/package.nix", "nix/seed-compat.nix"])
def test_nix_files_parse(path: str) -> None:
    r = subprocess.run(["nix-instantiate", "--parse", str(ROOT / path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_rendered_config_is_accepted_by_nixcache(tmp_path: Path) -> None:
    result = evaluate(
        "{ services.nixcache = { " + BASE + ' credentialsFile = "/etc/nixcache/credentials"; '
        'gracePeriod = "12h"; residualAge = "7d"; roots.keep = [ "*firefox*" ]; '
        'settings = { upload = { part_size_mb = 32; }; roots = { debounce = "5s"; }; }; }; }'
    )
    assert result["assertions"] == []
    settings = rendered_settings(result)
    # Render it as TOML the way pkgs.formats.toml would, and load it with nixcache's loader.
    from tests.harness import write_config

    config_file = write_config(tmp_path / "config.toml", settings)
    from nixcache.config import load_config

    cfg, _ = load_config(config_file)
    assert cfg.s3.bucket == "my-cache" and cfg.s3.endpoint == "https://s3.example.org"
    assert cfg.hostname == "testhost"
    assert str(cfg.signing.secret_key_file) == "/run/credentials/nixcache.service/signing-key"
    assert str(cfg.s3.credentials_file) == "/run/credentials/nixcache.service/s3-credentials"
    assert cfg.gc.grace_period == 12 * 3600 and cfg.gc.residual_age == 7 * 86400
    assert cfg.upload.part_size_mb == 32 and cfg.roots.debounce == 5 and cfg.roots.keep == ("*firefox*",)
    # Secrets reach the service as credentials, never as store paths.
    service = result["service"]["serviceConfig"]
    assert service["LoadCredential"] == [
        "signing-key:/etc/nixcache/signing.key",
        "s3-credentials:/etc/nixcache/credentials",
    ]


def test_unit_runs_real_commands_and_is_hardened() -> None:
    unit = evaluate("{ services.nixcache = { " + BASE + " }; }")["service"]["serviceConfig"]
    start = unit["ExecStart"].split()
    assert start[0].endswith("/bin/nixcache") and start[1:3] == ["serve", "--config"]
    args = _parser().parse_args(start[1:])  # the CLI accepts exactly this command line
    assert args.command == "serve" and args.config == start[3]
    assert unit["ExecReload"].endswith("kill -HUP $MAINPID")
    assert unit["Type"] == "notify" and unit["WatchdogSec"] > 0 and unit["Restart"] == "on-failure"
    assert unit["StateDirectory"] == "nixcache" and unit["RuntimeDirectory"] == "nixcache"
    for key in ("ProtectSystem", "PrivateTmp", "NoNewPrivileges", "DynamicUser"):
        assert unit[key], key
    assert unit["ProtectHome"] == "read-only", "out-links in homes are GC roots: they must stay readable"


def test_post_build_hook_and_substituter() -> None:
    result = evaluate("{ services.nixcache = { " + BASE + " }; }")
    nix = result["nixSettings"]
    hook = Path(nix["post-build-hook"]).read_text()
    assert "NIXCACHE_FIFO=/run/nixcache/hook.fifo NIXCACHE_SPOOL=/var/lib/nixcache/spool" in hook
    assert "/libexec/nixcache/post-build-hook" in hook
    assert nix["substituters"] == ["https://s3.example.org/my-cache"]
    assert nix["trusted-public-keys"] == [PUBLIC]
    off = evaluate("{ services.nixcache = { " + BASE + " useAsSubstituter = false; }; }")["nixSettings"]
    assert "substituters" not in off


def test_assertions_fire_with_clear_messages() -> None:
    result = evaluate('{ services.nixcache = { enable = true; signingKeyFile = "/k"; publicKey = "k-1:x"; }; }')
    assert result["assertions"] == ["services.nixcache.bucket must be set."]
    nokey = evaluate('{ services.nixcache = { enable = true; bucket = "b"; }; }')["assertions"]
    assert any("signingKeyFile" in m for m in nokey) and any("publicKey" in m for m in nokey)


def test_seed_option_names_map_to_the_same_config() -> None:
    # The seed README's example, option for option.
    seed = evaluate(
        "{ my-own-cache-with-blackjack-and-hooks = {"
        ' enable = true; s3-bucket = "nixstore"; s3-cred = "/etc/aws/credentials"; s3-profile = "nixstore";'
        ' s3-end = "q0n0.0r.idrivee2-24.com"; sig-prv = "/etc/nix/nixstore-key";'
        ' sig-pub = "nixstore:XPnWsxF43W5WV9nl6TFA1EhYkehVMIZOs20wu4f8A5c="; }; }',
        seed=True,
    )
    ours = evaluate(
        '{ services.nixcache = { enable = true; bucket = "nixstore"; credentialsFile = "/etc/aws/credentials"; '
        'profile = "nixstore"; endpoint = "https://q0n0.0r.idrivee2-24.com"; signingKeyFile = "/etc/nix/nixstore-key"; '
        'publicKey = "nixstore:XPnWsxF43W5WV9nl6TFA1EhYkehVMIZOs20wu4f8A5c="; }; }'
    )
    assert seed["assertions"] == [] and rendered_settings(seed) == rendered_settings(ours)
    assert seed["nixSettings"] == ours["nixSettings"]


def test_a_typo_in_an_option_is_an_error() -> None:
    r = subprocess.run(
        ["nix-instantiate", "--eval", "--strict", "--json", "--read-write-mode", str(ROOT / "tests/nix/eval.nix"),
         "--arg", "user", "{ services.nixcache = { enable = true; bucket = 5; }; }"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert r.returncode != 0 and "is not of type" in r.stderr


def test_parse_config_rejects_what_the_module_must_not_produce() -> None:
    with pytest.raises(Exception, match="grace_period"):
        parse_config({"s3": {"bucket": "abc"}, "signing": {"secret_key_file": "/k"}, "gc": {"grace_period": "soon"}})

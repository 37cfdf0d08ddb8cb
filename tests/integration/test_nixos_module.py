"""The NixOS module and the flake: parse, evaluate with nixpkgs' real module system, and check the
result against nixcache itself — its config loader and its CLI.

`tests/nix/eval-module.nix` runs `lib.evalModules` from a real nixpkgs `lib` over module.nix, the
NixOS options it touches (declared with NixOS's own types, tests/nix/nixos.nix) and a small `pkgs`
(tests/nix/pkgs.nix). The lib is found as on a user's machine: $NIXPKGS_LIB, else `<nixpkgs/lib>`
on the Nix search path, else `../shared/nixpkgs-lib/lib` next to the checkout (CI). Without one the
module tests fail, saying how to provide it."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from nixcache.cli import _parser
from nixcache.config import parse_config

ROOT = Path(__file__).resolve().parents[2]
EVAL = ROOT / "tests/nix/eval-module.nix"
PUBLIC = "my-cache-1:XPnWsxF43W5WV9nl6TFA1EhYkehVMIZOs20wu4f8A5c="
BASE = (
    'enable = true; bucket = "my-cache"; endpoint = "https://s3.example.org"; '
    f'signingKeyFile = "/etc/nixcache/signing.key"; publicKey = "{PUBLIC}";'
)
HOW_TO_PROVIDE = (
    "set NIXPKGS_LIB to a nixpkgs `lib` directory (NIXPKGS_LIB=/path/to/nixpkgs/lib), or put nixpkgs on "
    "NIX_PATH (NIX_PATH=nixpkgs=/path/to/nixpkgs) so that `nix-instantiate --find-file nixpkgs/lib` finds it"
)


class NixpkgsLibNotFound(Exception):
    pass


def is_nixpkgs_lib(path: Path) -> bool:
    return all((path / name).is_file() for name in ("default.nix", "modules.nix", "types.nix"))


def find_nixpkgs_lib(env: Mapping[str, str], repo_root: Path = ROOT) -> Path:
    """$NIXPKGS_LIB (which must then be a lib: a wrong explicit setting is an error), else
    `<nixpkgs/lib>` on the Nix search path, else ../shared/nixpkgs-lib/lib beside the checkout."""
    explicit = env.get("NIXPKGS_LIB", "")
    if explicit:
        if is_nixpkgs_lib(Path(explicit)):
            return Path(explicit).resolve()
        raise NixpkgsLibNotFound(
            f"NIXPKGS_LIB={explicit} is not a nixpkgs lib directory (it needs default.nix, modules.nix and "
            f"types.nix): {HOW_TO_PROVIDE}"
        )
    r = subprocess.run(
        ["nix-instantiate", "--find-file", "nixpkgs/lib"], env=dict(env), capture_output=True, text=True, timeout=120
    )
    on_search_path = Path(r.stdout.strip())
    if r.returncode == 0 and is_nixpkgs_lib(on_search_path):
        return on_search_path
    sibling = repo_root.parent / "shared" / "nixpkgs-lib" / "lib"
    if is_nixpkgs_lib(sibling):
        return sibling
    nix_path = f"{on_search_path}, which is no lib" if r.returncode == 0 else "not on the Nix search path"
    raise NixpkgsLibNotFound(
        f"no nixpkgs lib to evaluate the NixOS module with: NIXPKGS_LIB is unset, <nixpkgs/lib> is {nix_path}, "
        f"and {sibling} is not there; {HOW_TO_PROVIDE}"
    )


def nixpkgs_lib() -> Path:
    """The lib for this run; none is a test failure (never a skip)."""
    try:
        return find_nixpkgs_lib(os.environ)
    except NixpkgsLibNotFound as e:
        message = str(e)
    pytest.fail(message, pytrace=False)


def run_eval(user: str, seed: bool = False) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["nix-instantiate", "--eval", "--strict", "--json", "--read-write-mode", str(EVAL),
         "--argstr", "nixpkgsLib", str(nixpkgs_lib()),
         "--arg", "user", user, "--arg", "seed", "true" if seed else "false"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip


def evaluate(user: str, seed: bool = False) -> dict[str, Any]:
    r = run_eval(user, seed)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)  # type: ignore[no-any-return]


def evaluation_error(user: str) -> str:
    r = run_eval(user)
    assert r.returncode != 0, f"evaluated although it should not: {r.stdout[:500]}"
    return " ".join(r.stderr.split())  # the message, its line breaks folded


def rendered_settings(result: dict[str, Any]) -> dict[str, Any]:
    """The settings the module rendered (the test's pkgs.formats.toml keeps the JSON that nixpkgs'
    generator would turn into TOML)."""
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
    assert result["assertions"] == [] and result["warnings"] == []
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
    assert "LoadCredential=s3-credentials:/etc/nixcache/credentials\n" in result["unit"]["text"]


def test_unit_runs_real_commands_and_is_hardened() -> None:
    result = evaluate("{ services.nixcache = { " + BASE + " }; }")
    unit = result["service"]["serviceConfig"]
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
    # nix.package is on the unit's PATH (NixOS adds its bin/ ahead of coreutils & co.).
    service = result["service"]
    assert service["path"][0].endswith("-nix-2.28.3")
    assert service["environment"]["PATH"].startswith(service["path"][0] + "/bin:")
    # Unprivileged: store queries and the roots listing go through nix-daemon (which sees homes).
    assert service["environment"]["NIX_REMOTE"] == "daemon"
    assert service["wantedBy"] == ["multi-user.target"]
    assert service["unitConfig"]["After"] == "network-online.target nix-daemon.service"
    # The unit file NixOS renders from it.
    assert result["unit"]["name"] == "nixcache.service" and result["unit"]["wantedBy"] == ["multi-user.target"]
    text = result["unit"]["text"]
    for line in (
        "[Service]",
        'Environment="HOME=/var/lib/nixcache"',
        f"ExecStart={unit['ExecStart']}",
        "ProtectHome=read-only",
        "DynamicUser=true",
        "CapabilityBoundingSet=",
        "LoadCredential=signing-key:/etc/nixcache/signing.key",
        "RestrictAddressFamilies=AF_INET6",
        "WantedBy=multi-user.target",
    ):
        assert line in text.splitlines(), line


def test_post_build_hook_and_substituter() -> None:
    result = evaluate("{ services.nixcache = { " + BASE + " }; }")
    nix = result["nixSettings"]
    hook = Path(nix["post-build-hook"]).read_text()
    assert hook.startswith("#!/nix/store/")
    assert "NIXCACHE_FIFO=/run/nixcache/hook.fifo NIXCACHE_SPOOL=/var/lib/nixcache/spool" in hook
    assert "/libexec/nixcache/post-build-hook" in hook
    # Added to NixOS's own substituter and key, not in their place.
    assert nix["substituters"] == ["https://s3.example.org/my-cache", "https://cache.nixos.org/"]
    assert PUBLIC in nix["trusted-public-keys"] and len(nix["trusted-public-keys"]) == 2
    off = evaluate("{ services.nixcache = { " + BASE + " useAsSubstituter = false; }; }")["nixSettings"]
    assert off["substituters"] == ["https://cache.nixos.org/"] and PUBLIC not in off["trusted-public-keys"]
    assert "post-build-hook" in off


def test_a_private_bucket_is_substituted_through_the_service(tmp_path: Path) -> None:
    result = evaluate("{ services.nixcache = { " + BASE + " substituter = { enable = true; port = 38000; }; }; }")
    nix = result["nixSettings"]
    assert nix["substituters"] == ["http://127.0.0.1:38000", "https://cache.nixos.org/"]
    assert PUBLIC in nix["trusted-public-keys"]
    settings = rendered_settings(result)
    assert settings["substituter"] == {"listen": "127.0.0.1:38000"}
    from nixcache.config import load_config
    from tests.harness import write_config

    cfg, _ = load_config(write_config(tmp_path / "config.toml", settings))
    assert cfg.substituter.listen == "127.0.0.1:38000" and cfg.substituter.netrc_file is None
    assert "substituter" not in rendered_settings(evaluate("{ services.nixcache = { " + BASE + " }; }"))


def test_disabled_module_changes_nothing() -> None:
    result = evaluate("{ }")
    assert result["assertions"] == [] and result["service"] is None and result["unit"] is None
    assert "post-build-hook" not in result["nixSettings"]
    assert result["nixSettings"]["substituters"] == ["https://cache.nixos.org/"]


def test_assertions_fire_with_clear_messages() -> None:
    result = evaluate('{ services.nixcache = { enable = true; signingKeyFile = "/k"; publicKey = "k-1:x"; }; }')
    assert result["assertions"] == ["services.nixcache.bucket must be set."]
    assert "service" not in result, "as NixOS does, a failed assertion stops the system from being built"
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
    assert seed["nixSettings"] == ours["nixSettings"] and seed["service"] == ours["service"]
    assert seed["nixcache"]["endpoint"] == "https://q0n0.0r.idrivee2-24.com"  # the scheme added


def test_a_wrongly_typed_value_is_an_error() -> None:
    error = evaluation_error("{ services.nixcache = { enable = true; bucket = 5; }; }")
    assert "A definition for option `services.nixcache.bucket' is not of type `null or string'." in error


@pytest.mark.parametrize("value", ['"four"', "0", "65"])
def test_workers_must_be_an_integer_nixcache_accepts(value: str) -> None:
    error = evaluation_error("{ services.nixcache = { " + BASE + f" workers = {value}; }}; }}")
    expected = "integer between 1 and 64 (both inclusive)"  # nixcache's own limits (config.py)
    assert f"A definition for option `services.nixcache.workers' is not of type `{expected}'." in error
    assert f"In `the test's configuration (--arg user)': {value}" in error


def test_an_unknown_option_is_an_error() -> None:
    error = evaluation_error("{ services.nixcache = { " + BASE + " bukcet = 5; }; }")
    assert "The option `services.nixcache.bukcet' does not exist." in error


@pytest.mark.parametrize(
    ("user", "message"),
    [
        # The NixOS options the module sets are as strict as NixOS's: the stand-ins do not let through
        # what NixOS would refuse.
        (
            'systemd.services.nixcache.wantedBy = [ "multi-user" ];',
            "is not of type `string matching the pattern [a-zA-Z0-9@%:_.\\-]+[.](service|socket|",
        ),
        ('systemd.services.nixcache.serviceConfig.Type = "notfiy";', "Systemd Service field `Type' cannot have"),
        (  # overriding the module's hardening takes lib.mkForce, as on NixOS
            'systemd.services.nixcache.serviceConfig.ProtectHome = "yes";',
            "The option `systemd.services.nixcache.serviceConfig.ProtectHome' has conflicting definition values",
        ),
        ("systemd.services.nixcache.environment.X = [ ];", "services.nixcache.environment.X' is not of type"),
        ('nix.settings.substituters = "https://a";', "`nix.settings.substituters' is not of type `list of string'"),
        ("nix.settings.post-build-hook = { };", "`nix.settings.post-build-hook' is not of type"),
        ('networking.hostName = "two words";', "`networking.hostName' is not of type `string matching the pattern"),
    ],
)
def test_nixos_options_are_checked_like_nixos(user: str, message: str) -> None:
    error = evaluation_error("{ services.nixcache = { " + BASE + " }; " + user + " }")
    assert message in error


def test_parse_config_rejects_what_the_module_must_not_produce() -> None:
    with pytest.raises(Exception, match="grace_period"):
        parse_config({"s3": {"bucket": "abc"}, "signing": {"secret_key_file": "/k"}, "gc": {"grace_period": "soon"}})


def lookup_env(**extra: str) -> dict[str, str]:
    """An environment with no nixpkgs on the Nix search path (nix.conf's nix-path overridden too)."""
    env = {"PATH": os.environ["PATH"], "HOME": os.environ.get("HOME", "/"), "NIX_PATH": "", "NIX_CONFIG": "nix-path ="}
    return env | extra


def test_lib_lookup_order(tmp_path: Path) -> None:
    real = nixpkgs_lib()
    checkout = tmp_path / "ci" / "checkout"
    checkout.mkdir(parents=True)
    (tmp_path / "ci" / "shared" / "nixpkgs-lib").mkdir(parents=True)
    (tmp_path / "ci" / "shared" / "nixpkgs-lib" / "lib").symlink_to(real)
    (tmp_path / "channel" / "nixpkgs").mkdir(parents=True)
    (tmp_path / "channel" / "nixpkgs" / "lib").symlink_to(real)
    on_nix_path = {"NIX_PATH": f"nixpkgs={tmp_path / 'channel' / 'nixpkgs'}", "NIX_CONFIG": ""}
    explicit = tmp_path / "explicit"
    explicit.symlink_to(real)

    assert find_nixpkgs_lib(lookup_env(NIXPKGS_LIB=str(explicit), **on_nix_path), checkout) == real.resolve()
    assert find_nixpkgs_lib(lookup_env(**on_nix_path), checkout) == tmp_path / "channel" / "nixpkgs" / "lib"
    assert find_nixpkgs_lib(lookup_env(), checkout) == tmp_path / "ci" / "shared" / "nixpkgs-lib" / "lib"


def test_lib_lookup_fails_loudly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bogus = tmp_path / "not-a-lib"
    bogus.mkdir()
    (tmp_path / "checkout").mkdir()
    with pytest.raises(NixpkgsLibNotFound) as e:
        find_nixpkgs_lib(lookup_env(NIXPKGS_LIB=str(bogus)), ROOT)  # even with a lib beside the checkout
    assert f"NIXPKGS_LIB={bogus} is not a nixpkgs lib directory" in str(e.value) and HOW_TO_PROVIDE in str(e.value)
    with pytest.raises(NixpkgsLibNotFound, match="NIXPKGS_LIB is unset") as e:
        find_nixpkgs_lib(lookup_env(), tmp_path / "checkout")
    assert HOW_TO_PROVIDE in str(e.value) and str(tmp_path / "shared" / "nixpkgs-lib" / "lib") in str(e.value)
    # The module tests then fail (pytest.fail), they are not skipped.
    monkeypatch.setenv("NIXPKGS_LIB", str(bogus))
    with pytest.raises(pytest.fail.Exception, match="set NIXPKGS_LIB"):
        evaluate("{ }")

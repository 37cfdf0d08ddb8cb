"""What users already have keeps working after an upgrade: hook scripts written by an older
`nixcache hook-script`, and the Nix package the NixOS module builds.

Real Nix (a build with the old script as its post-build hook); the package is checked against
pyproject.toml and against what imports."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
import uuid
from pathlib import Path

import nixcache

ROOT = Path(__file__).resolve().parents[2]


def test_a_hook_script_written_before_the_packages_still_works_and_never_fails_the_build(
    tmp_path: Path,
) -> None:
    """`nixcache hook-script OUT` (README: "Try it") writes a script that runs the hook *as a
    file*: `python -S -E -s <site-packages>/nixcache/hook.py` (`hook.script()` before issue 12,
    `os.path.abspath(__file__)`). Issue 12 moved the file to nixcache/local/hook.py and left
    nothing at the old path, so after an upgrade every script written before it exits 2
    ("can't open file") — and Nix fails every build whose post-build hook fails. The hook's
    contract is "never delay or fail the build". (The Nix package regenerates its libexec
    script; a pip or editable install does not regenerate the user's script.)"""
    old_hook = Path(nixcache.__file__).parent / "hook.py"  # where script() pointed before the packages
    spool_dir = tmp_path / "spool"
    script = tmp_path / "post-build-hook"
    script.write_text(  # byte for byte what `nixcache hook-script` wrote then
        f"#!/bin/sh\nNIXCACHE_FIFO={tmp_path / 'no.fifo'} NIXCACHE_SPOOL={spool_dir} "
        f"exec {sys.executable} -S -E -s {old_hook}\n"
    )
    script.chmod(0o755)
    expr = tmp_path / "one.nix"
    expr.write_text(
        f'derivation {{ name = "review12-hook-{uuid.uuid4().hex[:12]}"; system = builtins.currentSystem;'
        ' builder = "/bin/sh"; args = [ "-c" "echo hi > $out" ]; }'
    )
    built = subprocess.run(
        ["nix-build", str(expr), "--no-out-link", "--option", "substituters", "",
         "--option", "post-build-hook", str(script)],
        capture_output=True, text=True,
    )  # fmt: skip
    assert built.returncode == 0, f"the build failed because of the hook script:\n{built.stderr[-800:]}"
    spooled = "".join(p.read_text() for p in spool_dir.glob("*.paths"))
    assert built.stdout.strip() in spooled, "the built path was not handed to the daemon"


def _package_nix() -> str:
    return (ROOT / "nix" / "package.nix").read_text()


def test_the_nix_packages_import_check_names_modules_that_exist() -> None:
    """nix/package.nix still has `pythonImportsCheck = [ "nixcache" "nixcache.service" ]`;
    nixcache/service.py is now nixcache/daemon/service.py. nixpkgs' pythonImportsCheckHook
    runs `python -c 'import nixcache.service'` after the install: the package no longer builds,
    so neither does a NixOS system using the module."""
    found = re.search(r"pythonImportsCheck\s*=\s*\[([^\]]*)\]", _package_nix())
    assert found is not None
    modules = re.findall(r'"([^"]+)"', found.group(1))
    missing = []
    for module in modules:
        done = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, cwd=ROOT)
        if done.returncode != 0:
            missing.append(f"{module}: {done.stderr.strip().splitlines()[-1]}")
    assert not missing, f"pythonImportsCheck of nix/package.nix fails: {missing}"


def test_the_nix_package_has_every_runtime_dependency_pyproject_declares() -> None:
    """pyproject.toml gained `prometheus-client` (imported by nixcache.metrics, hence by the
    daemon and the S3 client) and `tomli-w`; nix/package.nix's `dependencies` did not. Built
    with Nix, `nixcache serve` would stop at `import prometheus_client` (and nixpkgs'
    pythonRuntimeDepsCheckHook already rejects the wheel for the two undeclared requirements)."""
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    wanted = {re.split(r"[<>=!~ \[;]", d, maxsplit=1)[0].lower().replace("_", "-") for d in declared}
    found = re.search(r"dependencies\s*=\s*with python3\.pkgs;\s*\[([^\]]*)\]", _package_nix())
    assert found is not None
    packaged = {name.lower().replace("_", "-") for name in found.group(1).split()}
    assert wanted <= packaged, f"missing from nix/package.nix: {sorted(wanted - packaged)}"


def test_the_nixcache_hook_console_script_of_an_earlier_install_still_runs_the_hook(tmp_path: Path) -> None:
    """`nixcache-hook` (README: "the post-build hook") is a console script; before issue 12
    pyproject.toml declared it as `nixcache.hook:main`, so pip wrote a script that does
    `from nixcache.hook import main`. The README's way in is `pip install -e`: an editable
    install keeps that script through a `git pull` (the code changes, bin/ does not). If
    nixcache/hook.py had no `main`, the script would die with ImportError (exit 1) and Nix
    would fail every build whose post-build hook it is: the hook must never fail a build."""
    script = tmp_path / "nixcache-hook"
    script.write_text(  # byte for byte what pip writes for `nixcache-hook = "nixcache.hook:main"`
        f"#!{sys.executable}\n# -*- coding: utf-8 -*-\nimport re\nimport sys\nfrom nixcache.hook import main\n"
        "if __name__ == '__main__':\n"
        "    sys.argv[0] = re.sub(r'(-script\\.pyw|\\.exe)?$', '', sys.argv[0])\n"
        "    sys.exit(main())\n"
    )
    script.chmod(0o755)
    spool_dir = tmp_path / "spool"
    expr = tmp_path / "one.nix"
    expr.write_text(
        f'derivation {{ name = "review12b-{uuid.uuid4().hex[:12]}"; system = builtins.currentSystem;'
        ' builder = "/bin/sh"; args = [ "-c" "echo hi > $out" ]; }'
    )
    env = {**os.environ, "NIXCACHE_FIFO": str(tmp_path / "no.fifo"), "NIXCACHE_SPOOL": str(spool_dir)}
    built = subprocess.run(
        ["nix-build", str(expr), "--no-out-link", "--option", "substituters", "",
         "--option", "post-build-hook", str(script)],
        capture_output=True, text=True, env=env,
    )  # fmt: skip
    assert built.returncode == 0, f"the build failed because of the hook:\n{built.stderr[-800:]}"
    spooled = "".join(p.read_text() for p in spool_dir.glob("*.paths"))
    assert built.stdout.strip() in spooled, "the built path was not handed to the daemon"

"""The tree's layering, checked from the source: lower layers never import upper ones.

formats ← local, bucket ← ops ← daemon, cli (docs/architecture.md). The top-level modules
(errors, defaults, configfile, logs, progress, metrics, status) are the floor everything
stands on; config.py sits above formats (it loads signing keys). local and bucket are peers
and never import each other; the daemon never imports the command line. Imports under
``TYPE_CHECKING`` count too: a type from an upper layer is a dependency on it.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "nixcache"
FLOOR = {"errors", "defaults", "configfile", "logs", "progress", "metrics", "status", "memory", "__init__"}
ENTRY_POINTS = {"hook"}
"""Top-level modules that are entry points, at the command line's rank (nixcache/hook.py: where
hook scripts written before the packages still point)."""
RANK = {"floor": 0, "formats": 1, "config": 2, "local": 3, "bucket": 3, "ops": 4, "daemon": 5, "cli": 6}
MAX_LINES = 400


def layer(module: str) -> str:
    """``nixcache.bucket.s3`` → ``bucket``; ``nixcache.errors`` → ``floor``."""
    parts = module.split(".")
    if len(parts) == 1:
        return "floor"
    if parts[1] in RANK:
        return parts[1]
    if parts[1] in ENTRY_POINTS:
        return "cli"
    assert parts[1] in FLOOR, f"{module}: a top-level module outside the floor; put it in a package or the floor list"
    return "floor"


def imports(path: Path) -> set[str]:
    """Every nixcache module ``path`` imports (``from nixcache.x import y`` counts y if it is a module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("nixcache"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nixcache") and not node.level:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if (PACKAGE.parent / (sub.replace(".", "/") + ".py")).exists() else node.module)
    return found


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)


def allowed(importer: str, imported: str) -> bool:
    a, b = layer(importer), layer(imported)
    if {a, b} == {"local", "bucket"}:
        return False
    if a == "daemon" and b == "cli":
        return False
    if a == "cli" and b == "daemon":
        return True  # `nixcache serve` starts the daemon
    return RANK[b] <= RANK[a]


def test_no_import_runs_up_the_layers() -> None:
    violations = [
        f"{module_name(path)} imports {target} ({layer(module_name(path))} → {layer(target)})"
        for path in sorted(PACKAGE.rglob("*.py"))
        for target in sorted(imports(path))
        if not allowed(module_name(path), target)
    ]
    assert violations == []


def test_the_checker_sees_a_violation() -> None:
    assert not allowed("nixcache.formats.narinfo", "nixcache.bucket.s3")
    assert not allowed("nixcache.local.roots", "nixcache.bucket.layout")
    assert not allowed("nixcache.ops.upload", "nixcache.daemon.service")
    assert not allowed("nixcache.daemon.service", "nixcache.cli.status")
    assert not allowed("nixcache.errors", "nixcache.config")
    assert allowed("nixcache.ops.upload", "nixcache.bucket.s3") and allowed("nixcache.cli", "nixcache.daemon.service")
    assert "nixcache.bucket.s3" in imports(PACKAGE / "ops" / "upload.py")


def test_no_module_is_longer_than_one_sitting() -> None:
    long = {module_name(p): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}

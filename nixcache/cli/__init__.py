"""Command line: the parser and `main`, which hands each command to its one handler.

One module per command family (serve, push, roots, gc, inspect, status) parses nothing
more, calls one operation and prints: all the printing of nixcache is in this package.
Handlers are imported only when their command runs: `nixcache status` and `nixcache hook`
must not pay for pydantic, asyncio, structlog or botocore.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Callable

from nixcache import defaults

CONFIG_HELP = f"config file (default ${defaults.CONFIG_ENV}, else {defaults.CONFIG_FILE})"
STATUS_HELP = "ask the running daemon how it is doing (no S3 request)"

Handler = Callable[[argparse.Namespace], int]

COMMANDS: dict[str, tuple[str, str, bool]] = {
    # command: (module in nixcache.cli, its handler, light: no logging set up, no heavy import)
    "serve": ("serve", "serve", False),
    "hook": ("serve", "hook", True),
    "hook-script": ("serve", "hook_script", True),
    "push": ("push", "push", False),
    "roots": ("roots", "roots", False),
    "publish": ("roots", "publish", False),
    "dereference": ("roots", "dereference", False),
    "trash": ("roots", "trash", False),
    "untrash": ("roots", "untrash", False),
    "gc": ("gc", "gc", False),
    "residual": ("gc", "residual", False),
    "du": ("inspect", "du", False),
    "verify": ("inspect", "verify", False),
    "status": ("status", "status", True),
}
"""Every command and who runs it: a command missing here is an error, never a default."""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nixcache", description="A Nix binary cache in any S3 bucket.")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = p.add_subparsers(dest="command", required=True)

    def command(name: str, text: str, config_help: str | None = CONFIG_HELP) -> argparse.ArgumentParser:
        cmd = sub.add_parser(name, help=text)
        if config_help:
            cmd.add_argument("--config", help=config_help)
        return cmd

    serve = command("serve", "run the daemon: FIFO reader and upload workers")
    serve.add_argument(
        "--embedded",
        metavar="STATE_DIR",
        nargs="?",
        const=os.path.expanduser("~/.local/state/nixcache-embedded"),
        help="try it out: start a local SeaweedFS on loopback with a generated key (no config file)",
    )

    command("hook", "the post-build hook (reads OUT_PATHS/DRV_PATH; never fails the build)", config_help=None)
    hook_script = command(
        "hook-script",
        "write a fast post-build-hook script (for nix.conf)",
        CONFIG_HELP + "; its `fifo` and `state_dir` go into the script",
    )
    hook_script.add_argument("output", help="where to write the script (made executable)")

    push = command("push", "push the closures of store paths now, in the foreground")
    push.add_argument("paths", nargs="+", metavar="STORE_PATH")

    command("roots", "list local GC roots and their published state")
    command("publish", "publish the gcinfo of every local root now")
    deref = command("dereference", "move gcinfos of roots gone from this host to the trash")
    deref.add_argument("--dry-run", action="store_true", help="only print what would move")
    for name, what in (("trash", "to the trash"), ("untrash", "back from the trash")):
        command(name, f"move gcinfos {what} by hand").add_argument(
            "roots", nargs="+", metavar="ROOT_OR_GCINFO", help="store path, link to one, or gcinfo name"
        )
    gc = command("gc", "collect the trash now: delete what no live root of any host uses")
    gc.add_argument("--dry-run", action="store_true", help="only print what would be deleted, with bytes")
    residual = command("residual", "delete objects no live root accounts for, older than an age")
    residual.add_argument("--older-than", default="7d", help="age, e.g. 7d, 12h (default 7d)")
    residual.add_argument("--dry-run", action="store_true", help="only print what would be deleted, with bytes")
    du = command("du", "bucket size per host and root: shared, exclusive, trash, residual")
    du.add_argument("--host", help="only this host's roots")
    du.add_argument("--json", action="store_true", help="machine-readable output")
    _status_arguments(sub.add_parser("status", help=STATUS_HELP))
    verify = command("verify", "check the bucket: narinfos, NARs, references, signatures, gcinfos")
    verify.add_argument("--key", help="public key to check signatures with (default: the configured key's)")
    return p


def _status_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`status`'s arguments, for the full parser and for its own small one (see `main`)."""
    p.add_argument("--config", help=CONFIG_HELP)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def handler(command: str) -> tuple[Handler, bool]:
    """The function that runs ``command``, and whether it is light (see COMMANDS)."""
    module, function, light = COMMANDS[command]
    run: Handler = getattr(importlib.import_module(f"{__name__}.{module}"), function)
    return run, light


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["status"]:  # its own small parser: building all 15 costs ~10 ms
        own = argparse.ArgumentParser(prog="nixcache status", description=STATUS_HELP)
        args = _status_arguments(own).parse_args(argv[1:])
        args.command = "status"
    else:
        args = _parser().parse_args(argv)
    run, light = handler(args.command)

    from nixcache.errors import NixcacheError

    try:
        if not light:
            from nixcache import logs, memory

            memory.tune_malloc()
            logs.configure(args.log_level)
        return run(args)
    except NixcacheError as e:
        print(f"nixcache: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # e.g. state_dir or the FIFO's directory not writable
        where = f": {e.filename}" if e.filename else ""
        print(f"nixcache: {e.strerror or e}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

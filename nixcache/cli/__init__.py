"""Command line: parse arguments, load config, call one function, print. No logic here."""

from __future__ import annotations

import argparse
import os
import sys

from nixcache import defaults

CONFIG_HELP = f"config file (default ${defaults.CONFIG_ENV}, else {defaults.CONFIG_FILE})"
STATUS_HELP = "ask the running daemon how it is doing (no S3 request)"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="nixcache", description="A Nix binary cache in any S3 bucket.")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = p.add_subparsers(dest="command", required=True)
    config_help = CONFIG_HELP

    serve = sub.add_parser("serve", help="run the daemon: FIFO reader and upload workers")
    serve.add_argument("--config", help=config_help)
    serve.add_argument(
        "--embedded",
        metavar="STATE_DIR",
        nargs="?",
        const=os.path.expanduser("~/.local/state/nixcache-embedded"),
        help="try it out: start a local SeaweedFS on loopback with a generated key (no config file)",
    )

    sub.add_parser("hook", help="the post-build hook (reads OUT_PATHS/DRV_PATH; never fails the build)")
    hook_script = sub.add_parser("hook-script", help="write a fast post-build-hook script (for nix.conf)")
    hook_script.add_argument("--config", help=config_help + "; its `fifo` and `state_dir` go into the script")
    hook_script.add_argument("output", help="where to write the script (made executable)")

    push = sub.add_parser("push", help="push the closures of store paths now, in the foreground")
    push.add_argument("--config", help=config_help)
    push.add_argument("paths", nargs="+", metavar="STORE_PATH")

    sub.add_parser("roots", help="list local GC roots and their published state").add_argument(
        "--config", help=config_help
    )
    sub.add_parser("publish", help="publish the gcinfo of every local root now").add_argument(
        "--config", help=config_help
    )
    deref = sub.add_parser("dereference", help="move gcinfos of roots gone from this host to the trash")
    deref.add_argument("--config", help=config_help)
    deref.add_argument("--dry-run", action="store_true", help="only print what would move")
    for name, what in (("trash", "to the trash"), ("untrash", "back from the trash")):
        cmd = sub.add_parser(name, help=f"move gcinfos {what} by hand")
        cmd.add_argument("--config", help=config_help)
        cmd.add_argument("roots", nargs="+", metavar="ROOT_OR_GCINFO", help="store path, link to one, or gcinfo name")
    gc = sub.add_parser("gc", help="collect the trash now: delete what no live root of any host uses")
    gc.add_argument("--config", help=config_help)
    gc.add_argument("--dry-run", action="store_true", help="only print what would be deleted, with bytes")
    residual = sub.add_parser("residual", help="delete objects no live root accounts for, older than an age")
    residual.add_argument("--config", help=config_help)
    residual.add_argument("--older-than", default="7d", help="age, e.g. 7d, 12h (default 7d)")
    residual.add_argument("--dry-run", action="store_true", help="only print what would be deleted, with bytes")
    du = sub.add_parser("du", help="bucket size per host and root: shared, exclusive, trash, residual")
    du.add_argument("--config", help=config_help)
    du.add_argument("--host", help="only this host's roots")
    du.add_argument("--json", action="store_true", help="machine-readable output")
    _status_arguments(sub.add_parser("status", help=STATUS_HELP))
    verify = sub.add_parser("verify", help="check the bucket: narinfos, NARs, references, signatures, gcinfos")
    verify.add_argument("--config", help=config_help)
    verify.add_argument("--key", help="public key to check signatures with (default: the configured key's)")
    return p


def _status_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """`status`'s arguments, for the full parser and for its own small one (see `main`)."""
    p.add_argument("--config", help=CONFIG_HELP)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["status"]:  # its own small parser: building all 15 costs ~10 ms
        own = argparse.ArgumentParser(prog="nixcache status", description=STATUS_HELP)
        status_args = _status_arguments(own).parse_args(argv[1:])
        return _status(status_args.config, status_args.json)
    args = _parser().parse_args(argv)
    if args.command == "hook":  # stays light: no heavy imports on the build's path
        from nixcache.local import hook

        return hook.main()
    if args.command == "hook-script":
        return _hook_script(args.config, args.output)
    if args.command == "status":  # stays light: answers in well under 100 ms
        return _status(args.config, args.json)

    from nixcache import logs
    from nixcache.errors import NixcacheError

    logs.configure(args.log_level)
    try:
        if args.command == "serve":
            return _serve(args.config, args.embedded)
        if args.command == "push":
            return _push(args.config, args.paths)
        if args.command in ("gc", "residual"):
            return _gc_command(args)
        if args.command == "verify":
            return _verify(args.config, args.key)
        if args.command == "du":
            return _du(args)
        return _roots_command(args)
    except NixcacheError as e:
        print(f"nixcache: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # e.g. state_dir or the FIFO's directory not writable
        where = f": {e.filename}" if e.filename else ""
        print(f"nixcache: {e.strerror or e}{where}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    raise AssertionError(args.command)


def _status(config: str | None, as_json: bool) -> int:
    from nixcache.cli import status as statuscmd
    from nixcache.errors import NixcacheError

    try:
        print(statuscmd.status(config, as_json))
    except NixcacheError as e:
        print(f"nixcache: {e}", file=sys.stderr)
        return 1
    return 0


def _serve(config: str | None, embedded: str | None) -> int:
    import asyncio
    from pathlib import Path

    from nixcache.config import load_config
    from nixcache.daemon.service import Service

    if embedded is None:
        cfg, path = load_config(config)
        return asyncio.run(Service(cfg, path).run())

    from nixcache.daemon import embedded as emb

    cfg, config_file, weed = emb.prepare(Path(embedded))
    try:
        asyncio.run(emb.create_bucket(cfg))
        pub = (Path(embedded) / "signing.pub").read_text().strip()
        print(
            f"nixcache: embedded SeaweedFS at {weed.endpoint}, bucket {cfg.s3.bucket}\n"
            f"  substituter:       {weed.endpoint}/{cfg.s3.bucket}\n"
            f"  trusted key:       {pub}\n"
            f"  config:            {config_file}\n"
            f"  post-build hook:   nixcache hook-script --config {config_file} /tmp/nixcache-hook\n"
            f"                     nix-build ... --option post-build-hook /tmp/nixcache-hook",
            file=sys.stderr,
        )
        from nixcache.daemon.service import Service

        return asyncio.run(Service(cfg, config_file).run())
    finally:
        weed.stop()


def _du(args: argparse.Namespace) -> int:
    import asyncio
    import json

    from nixcache.bucket.s3 import S3
    from nixcache.config import load_config
    from nixcache.ops import du
    from nixcache.ops.collect import Collector
    from nixcache.progress import Progress

    cfg, _ = load_config(args.config)

    async def run() -> du.Usage:
        async with S3(cfg.s3) as bucket:
            return await du.measure(Collector(cfg, bucket, progress), args.host)

    progress = Progress()
    try:
        usage = asyncio.run(run())
    finally:
        progress.close()
    if args.json:
        print(json.dumps(usage.as_dict(), indent=2))
        return 0

    def mb(n: int) -> str:
        return f"{n / 1e6:10.2f} MB"

    print(f"{'bytes':>13} {'exclusive':>13} {'shared':>13}  root")
    for r in usage.roots:
        print(f"{mb(r.bytes)} {mb(r.exclusive)} {mb(r.shared)}  {r.key} ({r.paths} paths)")
    for host, h in usage.hosts.items():
        print(f"{mb(h['bytes'])} {mb(h['exclusive'])} {'':>13}  host {host} ({h['roots']} roots)")
    print(f"{mb(usage.trash)}  in the trash (freed by the next collection)")
    print(f"{mb(usage.residual)}  residual (no gcinfo accounts for it)")
    print(f"{mb(usage.total)}  total in the bucket")
    return 0


def _verify(config: str | None, key: str | None) -> int:
    import asyncio

    from nixcache.config import load_config
    from nixcache.ops import verify

    cfg, _ = load_config(config)
    report, key_name = asyncio.run(verify.run(cfg, key))
    for problem in report.problems:
        print(problem)
    signatures = f"signatures by {key_name}" if key_name else "signatures not checked (no key)"
    print(f"{report.narinfos} narinfos, {report.gcinfos} live gcinfos, {signatures}: {len(report.problems)} problem(s)")
    return 1 if report.problems else 0


def _gc_command(args: argparse.Namespace) -> int:
    import asyncio

    from nixcache.cli import gc as gccmd
    from nixcache.config import load_config, parse_duration

    cfg, _ = load_config(args.config)
    if args.command == "gc":
        result = asyncio.run(gccmd.collect(cfg, args.dry_run, residual_age=None, trash=True))
    else:
        try:
            age = float(parse_duration(args.older_than))  # type: ignore[arg-type]
        except ValueError as e:
            print(f"nixcache: --older-than: {e}", file=sys.stderr)
            return 2
        result = asyncio.run(gccmd.collect(cfg, args.dry_run, residual_age=age, trash=False))
    print(gccmd.report(result, args.dry_run))
    return 0


def _roots_command(args: argparse.Namespace) -> int:
    import asyncio

    from nixcache.config import load_config
    from nixcache.ops import roots as rootcmds

    cfg, _ = load_config(args.config)
    if args.command == "roots":
        for state, root, how in asyncio.run(rootcmds.status(cfg)):
            print(f"{state:9}  {root}  ({how})")
        return 0
    if args.command == "publish":
        result = asyncio.run(rootcmds.publish(cfg))
        print(f"published {len(result.published)}, unchanged {result.unchanged}, failed {len(result.failed)}; "
              f"S3 requests: {dict(result.requests)}")  # fmt: skip
        return 1 if result.failed else 0
    if args.command == "dereference":
        result = asyncio.run(rootcmds.dereference(cfg, args.dry_run))
        verb = "would move" if args.dry_run else "moved"
        for key in result.moved:
            print(f"{verb} {key} to the trash")
        print(f"{len(result.moved)} gcinfo(s) {verb}; S3 requests: {dict(result.requests)}")
        return 0
    moved = asyncio.run(rootcmds.move(cfg, args.roots, to_trash=args.command == "trash"))
    for key in moved:
        print(f"moved {key}")
    return 0


def _hook_script(config: str | None, output_path: str) -> int:
    from pathlib import Path

    output = Path(output_path)
    from nixcache.config import load_config
    from nixcache.errors import NixcacheError
    from nixcache.local import hook

    try:
        cfg, _ = load_config(config)
    except NixcacheError as e:
        print(f"nixcache: {e}", file=sys.stderr)
        return 1
    output.write_text(hook.script(str(cfg.fifo), defaults.spool_dir(str(cfg.state_dir))))
    output.chmod(0o755)
    print(output)
    return 0


def _push(config: str | None, paths: list[str]) -> int:
    import asyncio

    from nixcache.cli.push import push
    from nixcache.config import load_config

    cfg, _ = load_config(config)
    resolved = [os.path.realpath(p) for p in paths]
    return asyncio.run(push(cfg, resolved))


if __name__ == "__main__":
    sys.exit(main())

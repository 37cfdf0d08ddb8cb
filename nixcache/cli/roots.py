"""The GC-roots commands run by hand: roots, publish, dereference, trash, untrash."""

from __future__ import annotations

import argparse
import asyncio

from nixcache.cli.common import config
from nixcache.ops import roots as ops


def roots(args: argparse.Namespace) -> int:
    cfg = config(args)
    rows = asyncio.run(ops.status(cfg))
    for row in rows:
        print(f"{row.state:9}  {row.root}  ({' → '.join(row.via)})")
    if not rows:
        where = ", ".join(str(d) for d in cfg.roots_dirs())
        print(f"no GC roots found under {where}, and none published by {cfg.hostname}")
    return 0


def publish(args: argparse.Namespace) -> int:
    result = asyncio.run(ops.publish(config(args)))
    print(f"published {len(result.published)}, unchanged {result.unchanged}, failed {len(result.failed)}; "
          f"S3 requests: {dict(result.requests)}")  # fmt: skip
    return 1 if result.failed else 0


def dereference(args: argparse.Namespace) -> int:
    result = asyncio.run(ops.dereference(config(args), args.dry_run))
    verb = "would move" if args.dry_run else "moved"
    for key in result.moved:
        print(f"{verb} {key} to the trash")
    print(f"{len(result.moved)} gcinfo(s) {verb}; S3 requests: {dict(result.requests)}")
    return 0


def trash(args: argparse.Namespace) -> int:
    return _move(args, to_trash=True)


def untrash(args: argparse.Namespace) -> int:
    return _move(args, to_trash=False)


def _move(args: argparse.Namespace, to_trash: bool) -> int:
    for key in asyncio.run(ops.move(config(args), args.roots, to_trash)):
        print(f"moved {key}")
    return 0

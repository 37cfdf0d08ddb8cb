"""`nixcache du` and `nixcache verify`: what is in the bucket, and whether it holds together."""

from __future__ import annotations

import argparse
import asyncio
import json

from nixcache.cli.common import config, with_progress
from nixcache.ops import du as usage
from nixcache.ops import verify as checks


def du(args: argparse.Namespace) -> int:
    cfg = config(args)
    measured = with_progress(lambda progress: usage.measure(cfg, args.host, progress))
    if args.json:
        print(json.dumps(measured.as_dict(), indent=2))
        return 0

    def mb(n: int) -> str:
        return f"{n / 1e6:10.2f} MB"

    print(f"{'bytes':>13} {'exclusive':>13} {'shared':>13}  root")
    for r in measured.roots:
        print(f"{mb(r.bytes)} {mb(r.exclusive)} {mb(r.shared)}  {r.key} ({r.paths} paths)")
    for host, h in measured.hosts.items():
        print(f"{mb(h['bytes'])} {mb(h['exclusive'])} {'':>13}  host {host} ({h['roots']} roots)")
    print(f"{mb(measured.trash)}  in the trash (freed by the next collection)")
    print(f"{mb(measured.residual)}  residual (no gcinfo accounts for it)")
    print(f"{mb(measured.total)}  total in the bucket")
    return 0


def verify(args: argparse.Namespace) -> int:
    report = asyncio.run(checks.run(config(args), args.key))
    for problem in report.problems:
        print(problem)
    signatures = f"signatures by {report.key}" if report.key else "signatures not checked (no key)"
    print(f"{report.narinfos} narinfos, {report.gcinfos} live gcinfos, {signatures}: {len(report.problems)} problem(s)")
    return 1 if report.problems else 0

"""`nixcache gc` and `nixcache residual`: one collection, printed."""

from __future__ import annotations

import argparse
import sys

from nixcache.bucket.s3 import S3
from nixcache.cli.common import config, with_progress
from nixcache.config import Config, parse_duration
from nixcache.ops.collect import Collector, GcResult
from nixcache.progress import Progress


def gc(args: argparse.Namespace) -> int:
    return _collect(args, config(args), residual_age=None, trash=True)


def residual(args: argparse.Namespace) -> int:
    cfg = config(args)
    try:
        age = float(parse_duration(args.older_than))  # type: ignore[arg-type]
    except ValueError as e:
        print(f"nixcache: --older-than: {e}", file=sys.stderr)
        return 2
    return _collect(args, cfg, residual_age=age, trash=False)


def _collect(args: argparse.Namespace, cfg: Config, residual_age: float | None, trash: bool) -> int:
    async def collect(progress: Progress) -> GcResult:
        async with S3(cfg.s3) as bucket:
            collector = Collector(cfg, bucket, progress)
            return await collector.collect(dry_run=args.dry_run, residual_age=residual_age, trash=trash)

    print(report(with_progress(collect), args.dry_run))
    return 0


def report(result: GcResult, dry_run: bool) -> str:
    if result.skipped:
        return f"skipped: {result.skipped}"
    verb = "would delete" if dry_run else "deleted"
    plan = result.plan
    lines = [f"{verb} {key}{' (residual)' if key in plan.residual else ''}" for key in plan.objects()]
    total, count = plan.bytes, len(plan.objects())
    lines.append(
        f"{verb} {count} objects, {total / 1e6:.2f} MB ({total} bytes): {plan.dead_paths} dead paths, "
        f"{plan.kept_young} kept as younger than the grace period, {plan.kept_referenced} kept as referenced "
        f"by a narinfo that stays, {plan.kept_shared_nar} NARs kept as shared; "
        f"gcinfos downloaded {result.gcinfos_read}, from cache {result.gcinfos_cached}; "
        f"narinfos downloaded {result.narinfos_read}; "
        f"S3 requests: {dict(result.requests)}; {result.seconds:.1f}s"
    )
    return "\n".join(lines)

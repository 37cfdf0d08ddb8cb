"""`nixcache push`: one foreground push with a progress line and a summary."""

from __future__ import annotations

import argparse
import os

from nixcache.bucket.s3 import S3
from nixcache.cli.common import config, with_progress
from nixcache.config import Config, load_signing_key
from nixcache.local import store
from nixcache.local.store import PathInfo
from nixcache.ops.upload import PushResult, Uploader
from nixcache.progress import Progress


def push(args: argparse.Namespace) -> int:
    cfg = config(args)
    roots = [store.parse_store_path(os.path.realpath(p), cfg.store_dir) for p in args.paths]
    result = with_progress(lambda bar: _push(cfg, roots, bar))
    requests = ", ".join(f"{k} {v}" for k, v in sorted(result.requests.items())) or "none"
    print(
        f"pushed {len(roots)} root(s): closure {result.closure} paths, {result.upstream} upstream, "
        f"{result.present} already in the bucket, {result.uploaded} uploaded "
        f"({result.nar_bytes / 1e6:.1f} MB NAR, {result.file_bytes / 1e6:.1f} MB compressed) "
        f"in {result.seconds:.1f}s; S3 requests: {requests}"
    )
    return 0


async def _push(cfg: Config, roots: list[str], bar: Progress) -> PushResult:
    """Push the closures of ``roots``, counting what went up on ``bar``."""
    done = {"paths": 0, "bytes": 0}

    def progress(info: PathInfo, file_bytes: int) -> None:
        done["paths"] += 1
        done["bytes"] += file_bytes
        bar(f"uploaded {done['paths']} paths, {done['bytes'] / 1e6:.1f} MB")

    key = load_signing_key(cfg)  # a missing key is said before the bucket is opened, as always
    async with S3(cfg.s3) as s3:
        uploader = Uploader(cfg, s3, key)
        uploader.on_progress = progress
        return await uploader.push(roots)

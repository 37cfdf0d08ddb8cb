"""``nixcache push``: one foreground push with a progress line and a summary."""

from __future__ import annotations

from nixcache.bucket.s3 import S3
from nixcache.config import Config, load_signing_key
from nixcache.local import store
from nixcache.local.store import PathInfo
from nixcache.ops.upload import Uploader
from nixcache.progress import Progress


async def push(cfg: Config, paths: list[str]) -> int:
    roots = [store.parse_store_path(p, cfg.store_dir) for p in paths]
    key = load_signing_key(cfg)
    async with S3(cfg.s3) as s3:
        uploader = Uploader(cfg, s3, key)
        done = {"paths": 0, "bytes": 0}
        bar = Progress()

        def progress(info: PathInfo, file_bytes: int) -> None:
            done["paths"] += 1
            done["bytes"] += file_bytes
            bar(f"uploaded {done['paths']} paths, {done['bytes'] / 1e6:.1f} MB")

        uploader.on_progress = progress
        try:
            result = await uploader.push(roots)
        finally:
            bar.close()
    requests = ", ".join(f"{k} {v}" for k, v in sorted(result.requests.items())) or "none"
    print(
        f"pushed {len(roots)} root(s): closure {result.closure} paths, {result.upstream} upstream, "
        f"{result.present} already in the bucket, {result.uploaded} uploaded "
        f"({result.nar_bytes / 1e6:.1f} MB NAR, {result.file_bytes / 1e6:.1f} MB compressed) "
        f"in {result.seconds:.1f}s; S3 requests: {requests}"
    )
    return 0

"""Collection benchmark: a synthetic bucket of 100,000 narinfos + NARs and 500 gcinfos.

    python bench/gc.py [--paths 100000] [--roots 500] [--hosts 4] [--closure 1000]

Objects are written straight into a fresh SeaweedFS (through its filer, which is faster than
S3 PUTs for setting up). Root i's closure is a window of `--closure` consecutive paths starting
at i * (paths / roots), so roots share paths like real systems do. 20% of the roots are moved
to the trash, then:
  0. `nixcache gc --dry-run` with an empty narinfo index: every narinfo is downloaded once, as
     a host's first collection does for the narinfos other hosts wrote (a one-time cost);
  then `nixcache gc` runs three times:
  1. first collection (index and gcinfo cache warmed by 0) — collects;
  2. nothing changed (the trash is now empty);
  3. 1% more roots trashed — the live gcinfos come from the local cache, only the new trash
     gcinfos are downloaded.
Reported: wall time, peak RSS, requests by kind (nixcache's own count, and SeaweedFS's), and
what the original algorithm would have spent on run 1 (GET every gcinfo every hour, GET every
dead narinfo, one DELETE per object). Writes bench/out/gc.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import boto3

from nixcache.bucket import layout
from nixcache.bucket.seaweed import ACCESS_KEY, SECRET_KEY, SeaweedFS
from nixcache.formats import nix32
from nixcache.formats.gcinfo import Gcinfo, Member

ROOT = Path(__file__).resolve().parent.parent
HOSTS = ["alpha", "beta", "gamma", "delta"]


def path_hash(i: int) -> str:
    return nix32.encode(i.to_bytes(20, "big"))  # 32 characters, like a store path hash


def nar_hash(i: int) -> str:
    return nix32.encode(i.to_bytes(32, "big"))  # 52 characters


def closure(root: int, n_paths: int, n_roots: int, size: int) -> range:
    start = root * (n_paths // n_roots)
    return range(start, min(start + size, n_paths))


async def fill(filer: str, bucket: str, n_paths: int, block: int, concurrency: int = 48) -> None:
    sem = asyncio.Semaphore(concurrency)
    async with aiohttp.ClientSession() as http:

        async def put(key: str, body: bytes) -> None:
            async with sem, http.put(f"{filer}/buckets/{bucket}/{key}", data=body) as resp:
                if resp.status >= 300:
                    raise RuntimeError(f"{key}: {resp.status}")

        tasks = []
        for i in range(n_paths):
            h, nh = path_hash(i), nar_hash(i)
            # Path i references i-1 within blocks of `block` paths: every root's window (whole
            # blocks) is closed under references, as a real closure is.
            refs = f"{path_hash(i - 1)}-p{i - 1}" if i % block else ""
            narinfo = (
                f"StorePath: /nix/store/{h}-p{i}\nURL: nar/{nh}.nar.zst\nNarHash: sha256:{nh}\nNarSize: 4096\n"
                f"References: {refs}\n"
            )
            tasks.append(put(f"{h}.narinfo", narinfo.encode()))
            tasks.append(put(layout.nar_key(nh, "zstd"), os.urandom(256)))
            if len(tasks) >= 2000:
                await asyncio.gather(*tasks)
                tasks = []
        await asyncio.gather(*tasks)


def gcinfo_bytes(root: int, args: argparse.Namespace) -> tuple[str, bytes]:
    members = tuple(
        Member(path_hash(i), nar_hash(i), 4096) for i in closure(root, args.paths, args.roots, args.closure)
    )
    name = f"root{root}-{path_hash(10**9 + root)}.gcinfo.gz"
    return name, Gcinfo(f"/nix/store/{path_hash(10**9 + root)}-root{root}", members).render()


def run_gc(config: Path, *extra: str) -> dict[str, object]:
    started = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "nixcache.cli", "gc", "--config", str(config), *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)  # fmt: skip
    assert proc.stdout is not None
    out = proc.stdout.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"nixcache gc failed: {out[-2000:]}")
    summary = out.strip().splitlines()[-1]
    requests = json.loads(re.search(r"S3 requests: (\{.*?\})", summary)[1].replace("'", '"'))  # type: ignore[index]
    return {"seconds": round(time.monotonic() - started, 2), "peak_rss_mb": usage.ru_maxrss // 1024,
            "requests": requests, "summary": summary}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--paths", type=int, default=100_000)
    ap.add_argument("--roots", type=int, default=500)
    ap.add_argument("--closure", type=int, default=1000)
    ap.add_argument("--trashed", type=float, default=0.2)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "nixcache-gc-bench")
    args = ap.parse_args()
    work: Path = args.workdir
    work.mkdir(parents=True, exist_ok=True)
    weed = SeaweedFS(work / f"weed-{os.getpid()}", metrics=True)
    weed.start()
    try:
        bucket = f"gcbench-{int(time.time())}"
        s3 = boto3.client("s3", endpoint_url=weed.endpoint, aws_access_key_id=ACCESS_KEY,
                          aws_secret_access_key=SECRET_KEY, region_name="us-east-1")  # fmt: skip
        s3.create_bucket(Bucket=bucket)
        print(f"writing {args.paths} narinfos + NARs…", file=sys.stderr)
        t = time.monotonic()
        asyncio.run(fill(f"http://127.0.0.1:{weed.ports['filer']}", bucket, args.paths, args.paths // args.roots))
        print(f"  {time.monotonic() - t:.0f}s", file=sys.stderr)
        n_trash = int(args.roots * args.trashed)
        trashed = set(range(0, args.roots, args.roots // n_trash))  # spread over the bucket
        for r in range(args.roots):
            name, data = gcinfo_bytes(r, args)
            folder = "gctrash" if r in trashed else "gcroots"
            s3.put_object(Bucket=bucket, Key=f"{folder}/{HOSTS[r % len(HOSTS)]}/{name}", Body=data)
        live_paths = {
            i for r in range(args.roots) if r not in trashed for i in closure(r, args.paths, args.roots, args.closure)
        }
        dead = {i for r in trashed for i in closure(r, args.paths, args.roots, args.closure)} - live_paths

        (work / "credentials").write_text(
            f"[default]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n"
        )
        (work / "key").write_text("bench-1:" + "A" * 86 + "==\n")  # unused by gc
        state = work / f"state-{bucket}"
        config = work / "gc.toml"
        config.write_text(
            f'hostname = "alpha"\nstate_dir = "{state}"\n[s3]\nbucket = "{bucket}"\nendpoint = "{weed.endpoint}"\n'
            f'credentials_file = "{work / "credentials"}"\n[signing]\nsecret_key_file = "{work / "key"}"\n'
            "[gc]\ngrace_period = 0\n"
        )
        runs = {}
        for label in ("index_build_dry_run", "first", "nothing_changed", "one_percent_more_trashed"):
            if label == "one_percent_more_trashed":
                more = [r for r in range(args.roots) if r not in trashed][: max(1, args.roots // 100)]
                for r in more:
                    name, _ = gcinfo_bytes(r, args)
                    key = f"{HOSTS[r % len(HOSTS)]}/{name}"
                    s3.copy_object(
                        Bucket=bucket, Key=f"gctrash/{key}", CopySource={"Bucket": bucket, "Key": f"gcroots/{key}"}
                    )
                    s3.delete_object(Bucket=bucket, Key=f"gcroots/{key}")
            before = weed.request_counts(bucket)
            print(f"nixcache gc: {label}…", file=sys.stderr)
            runs[label] = run_gc(config, *(["--dry-run"] if label == "index_build_dry_run" else []))
            time.sleep(2)
            runs[label]["seaweedfs_requests"] = dict(weed.request_counts(bucket) - before)
        left = s3.list_objects_v2(Bucket=bucket, Prefix="gctrash/").get("KeyCount", 0)
    finally:
        weed.stop()

    original = {  # the original design, run 1: per hour, whatever changed
        "LIST": 2 + args.roots // 1000,
        "GET gcinfo": args.roots,
        "GET dead narinfo": len(dead),
        "DELETE (one per object)": 2 * len(dead) + n_trash,
    }
    result = {
        "paths": args.paths, "roots": args.roots, "closure": args.closure, "trashed_roots": n_trash,
        "dead_paths_expected": len(dead), "trash_left": left, "runs": runs,
        "original_algorithm_run1_requests": original,
        "original_algorithm_run1_total": sum(original.values()),
        "machine": f"{os.cpu_count()} cores",
    }  # fmt: skip
    out = ROOT / "bench" / "out"
    out.mkdir(exist_ok=True)
    (out / "gc.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

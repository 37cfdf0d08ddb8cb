"""What one small GET costs the daemon: the aiobotocore client (``S3.get``) vs the substituter's
lean signed GET (``S3.fetch``, bucket/signed.py) vs an anonymous GET, sequentially, against
one SeaweedFS on loopback (a narinfo walk is sequential: this is its per-step cost).

    python bench/small_gets.py [--n 300] [--rounds 3]

Prints wall and CPU (this process) per GET, per round.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import boto3

from nixcache.bucket.s3 import S3
from nixcache.bucket.seaweed import ACCESS_KEY, SECRET_KEY, SeaweedFS
from nixcache.config import S3Config


async def measure(n: int, rounds: int, endpoint: str) -> None:
    os.environ["AWS_ACCESS_KEY_ID"], os.environ["AWS_SECRET_ACCESS_KEY"] = ACCESS_KEY, SECRET_KEY
    async with S3(S3Config(bucket="small", endpoint=endpoint)) as s3, aiohttp.ClientSession() as session:

        async def anonymous(key: str) -> bytes | None:
            async with session.get(f"{endpoint}/small/{key}") as response:
                return await response.read()

        ways: dict[str, Callable[[str], Awaitable[bytes | None]]] = {
            "aiobotocore client (S3.get)": s3.get,
            "lean signed GET (S3.fetch)": s3.fetch,
            "anonymous aiohttp GET": anonymous,
        }
        for name, get in ways.items():  # warm the connections
            assert await get("k0.narinfo") == b"x" * 600, name
        for r in range(rounds):
            for name, get in ways.items():
                wall, cpu = time.perf_counter(), time.process_time()
                for i in range(n):
                    await get(f"k{i}.narinfo")
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                print(f"round {r + 1}  {name:30s} {wall / n * 1000:.2f} ms, CPU {cpu / n * 1000:.2f} ms per GET")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="nixcache-small-gets-"))
    weed = SeaweedFS(workdir / "weed")
    weed.start()
    try:
        admin = boto3.client("s3", endpoint_url=weed.endpoint, aws_access_key_id=ACCESS_KEY,
                             aws_secret_access_key=SECRET_KEY, region_name="us-east-1")  # fmt: skip
        admin.create_bucket(Bucket="small")
        for i in range(args.n):
            admin.put_object(Bucket="small", Key=f"k{i}.narinfo", Body=b"x" * 600)
        asyncio.run(measure(args.n, args.rounds, weed.endpoint))
    finally:
        weed.stop()
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()

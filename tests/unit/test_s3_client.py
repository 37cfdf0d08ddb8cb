"""bucket/s3.py against a real moto server: "absent" and "condition failed" are values, every
other error one S3Error, and every request and API call shows in nixcache.metrics."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from moto.server import ThreadedMotoServer

from nixcache import metrics
from nixcache.bucket.s3 import S3, job_requests
from nixcache.bucket.seaweed import ACCESS_KEY, SECRET_KEY, free_port
from nixcache.config import S3Config, parse_config
from nixcache.errors import S3Error


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


def s3_config(tmp_path: Path, endpoint: str, bucket: str) -> S3Config:
    credentials = tmp_path / "credentials"
    credentials.write_text(f"[default]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n")
    s3 = {"bucket": bucket, "endpoint": endpoint, "credentials_file": str(credentials), "max_attempts": 2}
    return parse_config({"s3": s3, "signing": {"secret_key_file": "/nonexistent"}}).s3


def run(cfg: S3Config, body: Callable[[S3], Awaitable[Any]], create: bool = True) -> Any:
    async def main() -> Any:
        async with S3(cfg) as s3:
            if create:
                await s3.create_bucket()
            return await body(s3)

    return asyncio.run(main())


@pytest.fixture
def cfg(tmp_path: Path, endpoint: str, request: pytest.FixtureRequest) -> S3Config:
    return s3_config(tmp_path, endpoint, "t-" + request.node.name.replace("_", "-")[:40].lower())


def test_missing_keys_are_none(cfg: S3Config) -> None:
    async def body(s3: S3) -> None:
        assert await s3.head("absent") is None
        assert await s3.get("absent") is None
        assert await s3.get_with_etag("absent") is None
        assert not await s3.exists("absent")
        await s3.put("here", b"data", metadata={"a": "b"})
        head = await s3.head("here")
        assert head is not None and head["ContentLength"] == 4 and head["Metadata"] == {"a": "b"}
        assert await s3.get("here") == b"data"

    run(cfg, body)


def test_failed_conditions_are_none_or_false(cfg: S3Config) -> None:
    async def body(s3: S3) -> None:
        etag = await s3.put_if("claim", b"mine", none_match=True)
        assert etag
        assert await s3.put_if("claim", b"theirs", none_match=True) is None
        assert await s3.get_with_etag("claim") == (b"mine", etag)
        assert await s3.put_if("claim", b"stale", match='"0123456789abcdef0123456789abcdef"') is None
        assert await s3.delete_if("claim", '"0123456789abcdef0123456789abcdef"') is False
        assert await s3.get("claim") == b"mine"
        assert await s3.delete_if("claim", etag) is True
        assert await s3.get("claim") is None

    run(cfg, body)


def test_moves_lists_and_streams(cfg: S3Config) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(3):
            yield b"x" * (3 * 1024 * 1024)

    async def body(s3: S3) -> None:
        await s3.put("dir/a", b"a")
        await s3.move("dir/a", "dir/b")
        await s3.put("dir/sub/c", b"c")
        assert await s3.list_names("dir/", max_pages=2) == ["dir/b"]
        await s3.upload_stream("dir/big", chunks(), part_size=5 * 1024 * 1024, content_type="x/y")
        assert [o["Key"] async for o in s3.list_keys("dir/")] == ["dir/b", "dir/big", "dir/sub/c"]
        assert len(await s3.get("dir/big") or b"") == 9 * 1024 * 1024
        await s3.delete_many(["dir/b", "dir/big", "dir/sub/c", "never"])
        assert [o async for o in s3.list_keys("")] == []

    run(cfg, body)


def test_a_missing_bucket_is_one_clear_error(tmp_path: Path, endpoint: str) -> None:
    cfg = s3_config(tmp_path, endpoint, "t-no-such-bucket")
    with pytest.raises(S3Error, match=r"s3://t-no-such-bucket/k: NoSuchBucket \(HTTP 404\): the bucket does not exist"):
        run(cfg, lambda s3: s3.put("k", b"v"), create=False)
    with pytest.raises(S3Error, match=r"s3://t-no-such-bucket/p/: NoSuchBucket .*the bucket does not exist"):
        run(cfg, lambda s3: s3.list_names("p/", max_pages=1), create=False)


def test_an_unreachable_endpoint_is_one_clear_error(tmp_path: Path) -> None:
    cfg = s3_config(tmp_path, f"http://127.0.0.1:{free_port()}", "t-unreachable")
    with pytest.raises(S3Error, match="s3://t-unreachable/k: Could not connect to the endpoint URL"):
        run(cfg, lambda s3: s3.get("k"), create=False)


def test_requests_and_latencies_are_in_the_metrics(cfg: S3Config) -> None:
    def seconds_count(op: str) -> float:
        labels = {"operation": op}
        return metrics.REGISTRY.get_sample_value("nixcache_s3_request_duration_seconds_count", labels) or 0.0

    before, puts, heads = metrics.requests(), seconds_count("PutObject"), seconds_count("HeadObject")

    async def body(s3: S3) -> dict[str, int]:
        with job_requests() as job:
            await s3.put("a", b"1")
            await s3.put("b", b"2")
            await s3.head("absent")
        assert s3.requests["PutObject"] == 2 and s3.requests["HeadObject"] == 1
        return dict(job)

    assert run(cfg, body) == {"PutObject": 2, "HeadObject": 1}
    after = metrics.requests()
    assert after["PutObject"] - before.get("PutObject", 0) == 2
    assert after["HeadObject"] - before.get("HeadObject", 0) == 1
    assert after["HeadBucket"] >= 1
    assert seconds_count("PutObject") - puts == 2
    assert seconds_count("HeadObject") - heads == 1  # a 404 is a call that took time too

"""The only module that talks to S3: an aiobotocore client with retries and request counters.

Every HTTP request (retries included: users pay for those too) is counted by operation, in
:mod:`nixcache.metrics` and for the job running in the current asyncio context (see
:func:`job_requests`); so is every API call's latency."""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import email.utils
import time
from collections import Counter
from collections.abc import AsyncIterable, AsyncIterator, Callable, Iterator
from types import TracebackType
from typing import TYPE_CHECKING, Any

import aiobotocore.session
import aiohttp
import botocore.utils
from aiobotocore.config import AioConfig
from botocore.exceptions import BotoCoreError, ClientError

from nixcache import __version__, metrics
from nixcache.bucket.signed import CONNECTIONS, HINTS, Reading, SignedRequests, payload_sha256, worded
from nixcache.errors import S3Error

if TYPE_CHECKING:
    from types_aiobotocore_s3 import S3Client
    from types_aiobotocore_s3.type_defs import CompletedPartTypeDef

    from nixcache.config import S3Config

_job_counters: contextvars.ContextVar[tuple[Counter[str], ...]] = contextvars.ContextVar("s3_jobs", default=())
_STARTED = "nixcache_started"  # the key of an API call's start time in botocore's request context
WRITE_CONNECTIONS = 64


@contextlib.contextmanager
def job_requests() -> Iterator[Counter[str]]:
    """Count the requests made inside this block (in this task and tasks it starts).

    Blocks nest: a request counts in every enclosing block."""
    counter: Counter[str] = Counter()
    token = _job_counters.set((*_job_counters.get(), counter))
    try:
        yield counter
    finally:
        _job_counters.reset(token)


def _describe(err: Exception, where: str) -> S3Error:
    if isinstance(err, ClientError):
        code = err.response.get("Error", {}).get("Code", "?")
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?")
        return worded(where, code, status, HINTS.get(str(code), ""))
    return S3Error(f"{where}: {err}")


@contextlib.contextmanager
def _mapped(where: str, *tolerated: int | str) -> Iterator[None]:
    """The one error mapping: botocore's errors in the block become an S3Error about ``where``,
    but a ClientError whose HTTP status (an int) or Error.Code (a str) is ``tolerated`` is
    swallowed: the code after the block then returns the "absent"/"condition failed" value."""
    try:
        yield
    except aiohttp.ClientError as e:  # a body cut or stalled while read: aiobotocore leaves those raw
        raise S3Error(f"{where}: {type(e).__name__}: {e}") from None
    except (ClientError, BotoCoreError) as e:
        if isinstance(e, ClientError) and (
            e.response.get("ResponseMetadata", {}).get("HTTPStatusCode") in tolerated
            or e.response.get("Error", {}).get("Code") in tolerated
        ):
            return
        raise _describe(e, where) from None


def parse_timestamp(value: str | int | float) -> datetime.datetime:
    """S3's timestamps: ISO 8601 in XML bodies, RFC 822 in headers; anything else the way
    botocore parses it."""
    try:
        if isinstance(value, str):
            if value[:1].isdigit():
                parsed = datetime.datetime.fromisoformat(value)
            else:
                parsed = email.utils.parsedate_to_datetime(value)
            if parsed.tzinfo is not None:
                return parsed
    except (ValueError, TypeError, IndexError):
        pass
    return botocore.utils.parse_timestamp(value)  # type: ignore[arg-type]  # it takes numbers too


class S3:
    """One bucket. Use as ``async with S3(cfg) as s3:``."""

    def __init__(self, cfg: S3Config) -> None:
        self.cfg = cfg
        self.bucket = cfg.bucket
        self.requests: Counter[str] = Counter()
        self._stack = contextlib.AsyncExitStack()
        self._client: S3Client | None = None
        self._reads: SignedRequests | None = None
        self._writes: SignedRequests | None = None

    async def __aenter__(self) -> S3:
        session = aiobotocore.session.get_session()
        # botocore parses every listed key's LastModified with dateutil (~90 µs each, on the
        # event loop): most of a 1000-key page's CPU. The stdlib does the same in ~1 µs.
        session.get_component("response_parser_factory").set_parser_defaults(timestamp_parser=parse_timestamp)
        if self.cfg.credentials_file is not None:
            session.set_config_variable("credentials_file", str(self.cfg.credentials_file))
        if self.cfg.profile is not None:
            session.set_config_variable("profile", self.cfg.profile)
        config = AioConfig(
            region_name=self.cfg.region,
            retries={"mode": "standard", "max_attempts": self.cfg.max_attempts},
            connect_timeout=self.cfg.connect_timeout,
            read_timeout=self.cfg.read_timeout,
            s3={"addressing_style": self.cfg.addressing_style},
            max_pool_connections=64,
            # A fixed User-Agent: names us in the provider's logs, and spares botocore
            # rebuilding its own for every request (~10% of the CPU of a small PUT).
            user_agent=f"nixcache/{__version__}",
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        with _mapped("cannot create S3 client"):
            client = await self._stack.enter_async_context(
                session.create_client("s3", endpoint_url=self.cfg.endpoint, config=config)
            )
        client.meta.events.register("before-send.s3", self._count)
        # API call latency, retries included; after-call-error: no response (connection errors…)
        client.meta.events.register("before-call.s3", self._started)
        client.meta.events.register("after-call.s3", self._finished)
        client.meta.events.register("after-call-error.s3", self._finished)
        self._client = client
        # Lean signed requests for the data path (signed.py): reads, and writes on a pool apart.
        self._reads, self._writes = [
            await self._stack.enter_async_context(
                SignedRequests(
                    client,
                    session,
                    self.bucket,
                    lambda op: self._count(f"before-send.s3.{op}"),
                    connections=connections,
                    attempts=self.cfg.max_attempts,
                    connect_timeout=self.cfg.connect_timeout,
                    read_timeout=self.cfg.read_timeout,
                    user_agent=f"nixcache/{__version__}",
                )
            )
            for connections in (CONNECTIONS, WRITE_CONNECTIONS)
        ]
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self._stack.aclose()

    def _count(self, event_name: str, **_: Any) -> None:
        op = event_name.rsplit(".", 1)[-1]
        self.requests[op] += 1
        metrics.S3_REQUESTS.labels(op).inc()
        for job in _job_counters.get():
            job[op] += 1

    @staticmethod
    def _started(context: dict[str, Any], **_: Any) -> None:
        context[_STARTED] = time.monotonic()

    @staticmethod
    def _finished(event_name: str, context: dict[str, Any], **_: Any) -> None:
        started = context.pop(_STARTED, None)
        if started is not None:
            metrics.S3_SECONDS.labels(event_name.rsplit(".", 1)[-1]).observe(time.monotonic() - started)

    def _errors(self, key: str | None, *tolerated: int | str) -> contextlib.AbstractContextManager[None]:
        """:func:`_mapped` about ``key`` in this bucket (the bucket itself if ``key`` is None)."""
        return _mapped(f"s3://{self.bucket}/{key}" if key else f"s3://{self.bucket}", *tolerated)

    @property
    def client(self) -> S3Client:
        assert self._client is not None, "use `async with S3(...)`"
        return self._client

    async def exists(self, key: str) -> bool:
        return await self.head(key) is not None

    async def head(self, key: str) -> dict[str, Any] | None:
        """The object's metadata (ContentLength, LastModified, ETag…), or None if it is absent."""
        with self._errors(key, 404):
            return dict(await self.client.head_object(Bucket=self.bucket, Key=key))
        return None

    async def get(self, key: str) -> bytes | None:
        """The object's bytes, or None when it does not exist."""
        got = await self.get_with_etag(key)
        return got[0] if got is not None else None

    async def get_with_etag(self, key: str) -> tuple[bytes, str] | None:
        """The object's bytes and ETag, or None when it does not exist."""
        with self._errors(key, "NoSuchKey", "404"):
            resp = await self.client.get_object(Bucket=self.bucket, Key=key)
            async with resp["Body"] as body:
                return await body.read(), str(resp.get("ETag", ""))
        return None

    async def fetch(self, key: str) -> bytes | None:
        """The object's bytes, or None when it does not exist: a lean signed GET (see
        :mod:`nixcache.bucket.signed`), for reads on a client's critical path."""
        async with self.reading(key) as reading:
            return None if reading is None else b"".join([chunk async for chunk in reading.chunks])

    @contextlib.asynccontextmanager
    async def reading(self, key: str) -> AsyncIterator[Reading | None]:
        """The object as a stream (its size, ETag and chunks), or None when it does not exist:
        the body is read inside the block, in bounded memory; leaving early drops the connection.
        A lean signed GET (see :mod:`nixcache.bucket.signed`)."""
        assert self._reads is not None, "use `async with S3(...)`"
        started, answered = time.monotonic(), False
        try:
            async with self._reads.get(key, f"s3://{self.bucket}/{key}") as got:
                answered = True
                metrics.S3_SECONDS.labels("GetObject").observe(time.monotonic() - started)
                yield got
        finally:
            if not answered:  # failed calls take time too, as botocore's are observed
                metrics.S3_SECONDS.labels("GetObject").observe(time.monotonic() - started)

    async def put(
        self,
        key: str,
        body: bytes,
        content_type: str = "application/octet-stream",
        metadata: dict[str, str] | None = None,
    ) -> None:
        """PUT ``body`` as ``key``: a lean signed request (see :mod:`nixcache.bucket.signed`)."""
        headers = {"Content-Type": content_type} | {f"x-amz-meta-{k}": v for k, v in (metadata or {}).items()}
        await self._write(key, body, headers=headers)

    async def _write(self, key: str, body: bytes | memoryview, sha256: str | None = None, **how: Any) -> str:
        """A lean PUT (an object, or a part with ``part=(upload id, number)``); its ETag."""
        assert self._writes is not None, "use `async with S3(...)`"
        digest = sha256 or await payload_sha256(body)
        with self._observed("UploadPart" if "part" in how else "PutObject"):
            return await self._writes.put(key, body, digest, f"s3://{self.bucket}/{key}", **how)

    @contextlib.contextmanager
    def _observed(self, op: str) -> Iterator[None]:
        started = time.monotonic()
        try:
            yield
        finally:  # failed calls take time too, as botocore's are observed
            metrics.S3_SECONDS.labels(op).observe(time.monotonic() - started)

    async def put_if(self, key: str, body: bytes, *, none_match: bool = False, match: str | None = None) -> str | None:
        """Conditional PUT (``If-None-Match: *`` or ``If-Match: etag``): the new ETag, or None
        when the condition failed (someone else's object is there / it changed)."""
        kwargs: dict[str, Any] = {"IfNoneMatch": "*"} if none_match else {"IfMatch": match}
        with self._errors(key, 409, 412):
            resp = await self.client.put_object(Bucket=self.bucket, Key=key, Body=body, **kwargs)
            return str(resp.get("ETag", ""))
        return None

    async def delete_if(self, key: str, etag: str) -> bool:
        """Delete ``key`` only if its ETag is still ``etag``."""
        with self._errors(key, 404, 409, 412):
            await self.client.delete_object(Bucket=self.bucket, Key=key, IfMatch=etag)
            return True
        return False

    async def delete_many(self, keys: list[str]) -> None:
        """DeleteObjects, ≤ 1000 keys a request (missing keys are not an error in S3)."""
        for start in range(0, len(keys), 1000):
            batch = keys[start : start + 1000]
            with self._errors(batch[0]):
                resp = await self.client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True}
                )
            errors = resp.get("Errors") or []
            if errors:
                first = errors[0]
                raise S3Error(f"s3://{self.bucket}/{first.get('Key')}: delete failed: {first.get('Code')}")

    async def move(self, src: str, dst: str) -> bool:
        """Copy then delete: safe to repeat after a crash between the two (the copy is redone).
        False when ``src`` is not there (someone moved it first)."""
        with self._errors(src, "NoSuchKey"):
            await self.client.copy_object(
                Bucket=self.bucket, Key=dst, CopySource={"Bucket": self.bucket, "Key": src}, MetadataDirective="COPY"
            )
            await self.client.delete_object(Bucket=self.bucket, Key=src)
            return True
        return False

    async def upload_stream(
        self,
        key: str,
        chunks: AsyncIterable[bytes],
        part_size: int,
        content_type: str,
        digest: Callable[[], bytes] | None = None,
    ) -> None:
        """Upload a stream in bounded memory: one PUT if it fits in a part, else multipart,
        every part ``part_size`` bytes but the last (R2 requires equal parts). ``digest``, if
        given, is the SHA-256 of the whole stream once it is exhausted (a single PUT's body is
        then not hashed again for its signature).

        The object appears only once the stream is exhausted without error; on any error an
        open multipart upload is aborted. At most one part is held, plus the chunk that
        overflows it: chunks are copied into the part as they come, and the part is sent from
        there (lean signed PUTs, see :mod:`nixcache.bucket.signed`).
        """
        buf = bytearray()
        upload_id: str | None = None
        parts: list[CompletedPartTypeDef] = []
        client = self.client

        async def part(body: memoryview) -> None:
            assert upload_id is not None
            n = len(parts) + 1
            etag = await self._write(key, body, part=(upload_id, n))
            parts.append({"ETag": etag, "PartNumber": n})

        try:
            with self._errors(key):
                async for chunk in chunks:
                    buf += chunk
                    while len(buf) > part_size:  # a stream of exactly one part is one PUT
                        if upload_id is None:
                            resp = await client.create_multipart_upload(
                                Bucket=self.bucket, Key=key, ContentType=content_type
                            )
                            upload_id = resp["UploadId"]
                        whole = memoryview(buf)
                        await part(whole[:part_size])
                        buf = bytearray(whole[part_size:])
                        del whole  # the sent part goes with the last view of it
                if upload_id is None:
                    whole_sha = digest().hex() if digest is not None else None
                    await self._write(key, memoryview(buf), whole_sha, headers={"Content-Type": content_type})
                    return
                if buf or not parts:
                    await part(memoryview(buf))
                await client.complete_multipart_upload(
                    Bucket=self.bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": parts}
                )
                upload_id = None
        finally:
            if upload_id is not None:
                with contextlib.suppress(ClientError, BotoCoreError):
                    await client.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload_id)

    async def list_keys(self, prefix: str, delimiter: str | None = None) -> AsyncIterator[dict[str, Any]]:
        """Every object under ``prefix`` (paged LIST), as the API's dicts (Key, Size, ETag,
        LastModified). With ``delimiter="/"``, sub-folders are not descended."""
        paginator = self.client.get_paginator("list_objects_v2")
        extra: dict[str, Any] = {"Delimiter": delimiter} if delimiter else {}
        with self._errors(prefix):
            async for page in paginator.paginate(Bucket=self.bucket, Prefix=prefix, **extra):
                for obj in page.get("Contents", []):
                    yield dict(obj)

    async def list_names(self, prefix: str, max_pages: int) -> list[str] | None:
        """Key names directly under ``prefix`` (``/`` as delimiter: sub-folders are not
        descended), or None if that takes more than ``max_pages`` LIST requests."""
        names: list[str] = []
        token: str | None = None
        with self._errors(prefix):
            for _ in range(max_pages):
                kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": prefix, "Delimiter": "/"}
                if token:
                    kwargs["ContinuationToken"] = token
                page = await self.client.list_objects_v2(**kwargs)
                names += [obj["Key"] for obj in page.get("Contents", [])]
                token = page.get("NextContinuationToken")
                if not page.get("IsTruncated") or not token:
                    return names
        return None

    async def create_bucket(self) -> None:
        """Create the bucket if it is missing (embedded mode, tests, benchmarks)."""
        with contextlib.suppress(ClientError):  # an error of the HEAD: try to create it
            await self.client.head_bucket(Bucket=self.bucket)
            return
        with self._errors(None):
            await self.client.create_bucket(Bucket=self.bucket)

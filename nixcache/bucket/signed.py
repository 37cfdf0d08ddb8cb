"""Signed requests without botocore's per-call pipeline: the substituter's GETs and the
uploads' PUTs (whole objects and multipart parts).

A client that substitutes a closure asks for one narinfo after another, each a round trip
through the daemon to the bucket. Through the aiobotocore client, a small GET costs ~1.5 ms of
CPU on a small machine (parameter validation, a dozen event hooks, response parsing), against
~0.5 ms for the same request signed by botocore's own SigV4 signer and sent on a plain aiohttp
session. A push is two PUTs per path, and for its bodies the client costs more: it hashes each
body again on the event loop for the signature (over HTTP, and over HTTPS too without a
checksum header), and aiohttp copies it twice more. Here the caller gives the body's SHA-256
(the push has it already for a whole NAR, or hashes a part in a thread), and aiohttp sends the
``bytes`` as they are.

Everything else is botocore's: the signer, credentials (refreshed as botocore refreshes
them), endpoint and addressing style (the URL comes from the client), certificate bundle,
timeouts and retries (its "standard" mode: connection errors, 5xx and 429, its transient and
throttling error codes, exponential backoff with jitter, ``max_attempts``; a PUT of the same
bytes to the same key is as safe to repeat as a GET). Reads take the bytes as stored
(``Accept-Encoding: identity``); no redirect is followed. Conditional writes, listings,
deletes and the multipart upload's creation and completion stay on the client. Every request
that reaches the wire is counted by the caller's ``counted``, by operation.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import re
import ssl
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Callable
from typing import Any, NamedTuple

import aiohttp
import botocore.httpsession
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.exceptions import BotoCoreError, ClientError
from multidict import CIMultiDictProxy
from yarl import URL

from nixcache.errors import S3Error

RETRIED = frozenset({429, 500, 502, 503, 504})
RETRIED_CODES = frozenset(
    # botocore.retries.standard: TransientRetryableChecker, ThrottledRetryableChecker (a test
    # compares them)
    [
        "RequestTimeout",
        "RequestTimeoutException",
        "PriorRequestNotComplete",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottledException",
        "TooManyRequestsException",
        "ProvisionedThroughputExceededException",
        "TransactionInProgressException",
        "RequestLimitExceeded",
        "BandwidthLimitExceeded",
        "LimitExceededException",
        "RequestThrottled",
        "SlowDown",
        "EC2ThrottledException",
    ]
)
MAX_BACKOFF = 20.0  # botocore's standard mode
CHUNK = 1 << 16
"""Read buffer and largest chunk (aiohttp's default; 4× was measured: no less CPU)."""
CONNECTIONS = 32
"""Connections to the bucket for reads: its own pool, apart from the uploads' (64)."""
SLICE = 1 << 18
"""A PUT body longer than this is handed to aiohttp a slice at a time, each awaited: a slow
connection then never holds a copy of the rest of the body in the transport's buffer."""
HASH_INLINE = 1 << 16
"""Bodies up to this size are hashed on the event loop; longer ones in a thread."""
KNOWN_PAYLOAD = "nixcache_payload_sha256"
"""Where a request's context tells the signer its body's SHA-256 (hex)."""

_CODE = re.compile(rb"<Code>([^<]{1,64})</Code>")
HINTS = {
    "InvalidAccessKeyId": "the access key is not known to the endpoint: check credentials_file/profile",
    "SignatureDoesNotMatch": "the secret key is wrong: check credentials_file/profile",
    "AccessDenied": "these credentials may not do this: check the bucket policy",
    "NoSuchBucket": "the bucket does not exist: create it first",
    # HEAD responses carry no body, so only the status is known:
    "403": "forbidden: wrong credentials (check credentials_file/profile) or a bucket policy that denies this",
}
"""What to do about an S3 error, by code (or status): the client's and the lean reads' alike."""


def worded(where: str, code: object, status: object, hint: str) -> S3Error:
    """The one wording of an S3 error answer (see :func:`nixcache.bucket.s3._describe`)."""
    return S3Error(f"{where}: {code} (HTTP {status}){': ' + hint if hint else ''}")


def backoff(attempt: int) -> float:
    """Seconds before retry ``attempt`` (1, 2…): botocore's standard mode."""
    return random.random() * min(MAX_BACKOFF, 2.0 ** (attempt - 1))


class Reading(NamedTuple):
    """An object being read: its size (-1 if not told), ETag and chunks (read inside the
    ``get`` block)."""

    size: int
    etag: str
    chunks: AsyncIterator[bytes]


class _Signer(S3SigV4Auth):
    """botocore's S3 signer, told the body's SHA-256 rather than reading the body for it."""

    def payload(self, request: AWSRequest) -> str:
        known = request.context.get(KNOWN_PAYLOAD)
        return known if isinstance(known, str) else str(super().payload(request))


class SignedRequests:
    """Requests to the objects of ``bucket``, signed as ``client`` signs (the aiobotocore client
    of :class:`nixcache.bucket.s3.S3`, and its ``session``), on a pool of ``connections`` of
    their own. Set up at the first request, so that opening the bucket needs neither
    credentials nor the network."""

    def __init__(
        self,
        client: Any,
        session: Any,
        bucket: str,
        counted: Callable[[str], None],
        *,
        connections: int = CONNECTIONS,
        attempts: int,
        connect_timeout: float,
        read_timeout: float,
        user_agent: str,
    ) -> None:
        self._client = client
        self._botocore = session
        self.bucket = bucket
        self._counted = counted
        self._connections = connections
        self.attempts = attempts
        self._timeout = aiohttp.ClientTimeout(sock_connect=connect_timeout, sock_read=read_timeout)
        self._user_agent = user_agent
        self._lock = asyncio.Lock()
        self._session: aiohttp.ClientSession | None = None
        self._credentials: Any = None
        self._proxy: str | None = None
        self.base = ""
        self.region = ""

    async def __aenter__(self) -> SignedRequests:
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def _ready(self, where: str) -> aiohttp.ClientSession:
        async with self._lock:
            if self._session is None:
                try:
                    # The client's own URL for a key "k" (endpoint, addressing style), less "k".
                    presigned = await self._client.generate_presigned_url(
                        "get_object", Params={"Bucket": self.bucket, "Key": "k"}
                    )
                    self._credentials = await self._botocore.get_credentials()
                    # HTTP(S)_PROXY and NO_PROXY, as botocore: looked up once (aiohttp's
                    # trust_env would look them up, and ~/.netrc, in a thread for every request).
                    self.base = presigned.split("?", 1)[0][:-1]
                    self._proxy = await asyncio.to_thread(_proxy_for, self.base)
                    context: ssl.SSLContext | bool = True  # aiohttp's default: used by no request
                    if self.base.startswith("https:") or (self._proxy or "").startswith("https:"):
                        # Loading the certificates costs ~0.1 s of CPU: only where TLS is spoken.
                        verify = self._botocore.get_config_variable("ca_bundle") or True
                        context = await asyncio.to_thread(_verifying, botocore.httpsession.get_cert_path(verify))
                except (BotoCoreError, ClientError, OSError, ssl.SSLError) as e:
                    raise S3Error(f"{where}: {e}") from None
                self.region = self._client.meta.region_name
                trace = aiohttp.TraceConfig()
                trace.on_request_headers_sent.append(self._sent)
                self._session = aiohttp.ClientSession(
                    connector=aiohttp.TCPConnector(limit=self._connections, ssl=context),
                    timeout=self._timeout,
                    read_bufsize=CHUNK,
                    # The bytes as stored: never a compressed copy a proxy or CDN might offer.
                    headers={"Accept-Encoding": "identity", "User-Agent": self._user_agent},
                    auto_decompress=False,
                    trace_configs=[trace],
                )
            return self._session

    async def _sent(self, _session: object, context: Any, _params: object) -> None:
        """Every request that reaches the wire, aiohttp's own retry on a closed keep-alive
        connection included: users pay for each."""
        self._counted(context.trace_request_ctx["op"])

    async def _headers(
        self, method: str, url: str, where: str, headers: dict[str, str] | None = None, sha256: str | None = None
    ) -> dict[str, str]:
        try:
            credentials = None if self._credentials is None else await self._credentials.get_frozen_credentials()
        except (BotoCoreError, ClientError) as e:  # a refresh that failed (STS refused, SSO expired…)
            raise S3Error(f"{where}: cannot get credentials: {e}") from None
        if credentials is None:
            raise S3Error(f"{where}: Unable to locate credentials")
        request = AWSRequest(method=method, url=url, headers=headers)
        if sha256 is not None:
            request.context[KNOWN_PAYLOAD] = sha256
        _Signer(credentials, "s3", self.region).add_auth(request)
        return dict(request.headers.items())

    def url(self, key: str) -> str:
        return self.base + urllib.parse.quote(key, safe="/~")

    async def put(
        self,
        key: str,
        body: bytes | memoryview,
        sha256: str,
        where: str,
        *,
        headers: dict[str, str] | None = None,
        part: tuple[str, int] | None = None,
    ) -> str:
        """PUT ``body`` (``sha256``: its hex SHA-256) as ``key``, or as part ``part[1]`` of the
        multipart upload ``part[0]``; the answer's ETag. Failures raise one :class:`S3Error`
        about ``where``, after the retries."""
        session = await self._ready(where)
        url, op = self.url(key), "PutObject"
        if part is not None:
            url += f"?partNumber={part[1]}&uploadId={urllib.parse.quote(part[0], safe='-_.~')}"
            op = "UploadPart"
        failure = ""
        for attempt in range(self.attempts):
            if attempt:
                await asyncio.sleep(backoff(attempt))
            signed = await self._headers("PUT", url, where, headers, sha256)
            signed["Content-Length"] = str(len(body))
            data = _slices(body) if len(body) > SLICE else body  # the transport then holds a slice
            try:
                async with session.put(
                    URL(url, encoded=True), data=data, headers=signed, proxy=self._proxy, allow_redirects=False,
                    trace_request_ctx={"op": op},
                ) as response:  # fmt: skip
                    answer = await _read_capped(response)
                    if 200 <= response.status < 300:  # as botocore takes any 2xx
                        return response.headers.get("ETag", "")
                    failure = self._failure(response, answer, where)
            except (aiohttp.ClientError, TimeoutError) as e:
                failure = f"{type(e).__name__}: {e}"
        raise S3Error(f"{where}: {failure} ({self.attempts} attempts)")

    def _failure(self, response: aiohttp.ClientResponse, answer: bytes, where: str) -> str:
        """What a retried failure was, to say if it is the last; raise at once for the others."""
        code = _code(answer)
        if response.status in RETRIED or code in RETRIED_CODES:
            return f"{code} (HTTP {response.status})" if code else f"HTTP {response.status}"
        raise self._error(response.status, response.headers, code, where)

    @contextlib.asynccontextmanager
    async def get(self, key: str, where: str) -> AsyncIterator[Reading | None]:
        """The object ``key`` as a stream, or None when it does not exist (404). Other answers
        and failures raise one :class:`S3Error` about ``where``, after the retries."""
        session = await self._ready(where)
        url = self.url(key)
        failure = ""
        for attempt in range(self.attempts):
            if attempt:
                await asyncio.sleep(backoff(attempt))
            headers = await self._headers("GET", url, where)
            try:
                response = await session.get(
                    URL(url, encoded=True), headers=headers, proxy=self._proxy, allow_redirects=False,
                    trace_request_ctx={"op": "GetObject"},
                )  # fmt: skip
            except (aiohttp.ClientError, TimeoutError) as e:
                failure = f"{type(e).__name__}: {e}"
                continue
            async with response:
                if response.status != 200:
                    try:
                        body = await _read_capped(response)
                    except (aiohttp.ClientError, TimeoutError) as e:  # the error itself cut: retried
                        failure = f"HTTP {response.status}, its answer cut: {type(e).__name__}: {e}"
                        continue
                    if response.status == 404 and _code(body) != "NoSuchBucket":
                        yield None
                        return
                    failure = self._failure(response, body, where)
                    continue
                length = response.headers.get("Content-Length", "")
                size = int(length) if length.isdigit() else -1
                yield Reading(size, response.headers.get("ETag", ""), _chunks(response, where))
                return
        raise S3Error(f"{where}: {failure} ({self.attempts} attempts)")

    def _error(self, status: int, headers: CIMultiDictProxy[str], code: str, where: str) -> S3Error:
        hint = HINTS.get(code, "") if code else HINTS.get(str(status), "")  # the status's: no code told
        code = code or str(status)
        region = headers.get("x-amz-bucket-region")
        if region and region != self.region:  # botocore would redirect; a clear line instead
            hint = f"the bucket is in region {region}, not {self.region}: set s3.region (and its endpoint)"
        return worded(where, code, status, hint)


async def payload_sha256(body: bytes | memoryview) -> str:
    """The hex SHA-256 of a body to sign (in a thread if long: hashlib lets go of the GIL)."""
    if len(body) <= HASH_INLINE:
        return hashlib.sha256(body).hexdigest()
    return await asyncio.to_thread(lambda: hashlib.sha256(body).hexdigest())


async def _slices(body: bytes | memoryview) -> AsyncIterator[memoryview]:
    view = memoryview(body)
    for start in range(0, len(view), SLICE):
        yield view[start : start + SLICE]


async def _read_capped(response: aiohttp.ClientResponse, cap: int = 1 << 16) -> bytes:
    """An error's body, to its end (or ``cap`` bytes)."""
    body = b""
    while len(body) < cap and (chunk := await response.content.read(cap - len(body))):
        body += chunk
    return body


def _code(body: bytes) -> str:
    match = _CODE.search(body)
    return match.group(1).decode(errors="replace") if match else ""


def _proxy_for(url: str) -> str | None:
    proxies = urllib.request.getproxies()
    host = urllib.parse.urlsplit(url).hostname or ""
    if urllib.request.proxy_bypass(host):
        return None
    return proxies.get(urllib.parse.urlsplit(url).scheme)


def _verifying(ca_bundle: str | None) -> ssl.SSLContext:
    """As aiobotocore verifies: the system's defaults and botocore's bundle (or ``ca_bundle``)."""
    context = ssl.create_default_context()
    if ca_bundle:
        context.load_verify_locations(ca_bundle)
    return context


async def _chunks(response: aiohttp.ClientResponse, where: str) -> AsyncIterator[bytes]:
    try:
        async for chunk in response.content.iter_chunked(CHUNK):
            yield chunk
    except (aiohttp.ClientError, TimeoutError) as e:
        raise S3Error(f"{where}: cut while reading: {type(e).__name__}: {e}") from None

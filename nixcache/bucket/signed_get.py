"""Signed GETs of whole objects without botocore's per-call pipeline: the substituter's reads.

A client that substitutes a closure asks for one narinfo after another, each a round trip
through the daemon to the bucket. Through the aiobotocore client, a small GET costs ~1.5 ms of
CPU on a small machine (parameter validation, a dozen event hooks, response parsing), against
~0.5 ms for the same request signed by botocore's own SigV4 signer and sent on a plain aiohttp
session. So reads go that way: the same signer, credentials (refreshed as botocore refreshes
them), endpoint and addressing style (the URL comes from the client), certificate bundle,
timeouts and retries (botocore's "standard" mode: connection errors, 5xx and 429, exponential
backoff with jitter, ``max_attempts``). Every attempt is counted by the caller's ``counted``.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import re
import ssl
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Callable
from typing import Any, NamedTuple

import aiohttp
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.exceptions import BotoCoreError
from yarl import URL

from nixcache.errors import S3Error

RETRIED = frozenset({429, 500, 502, 503, 504})
MAX_BACKOFF = 20.0  # botocore's standard mode
CHUNK = 1 << 16
"""Read buffer and largest chunk (aiohttp's default; 4× was measured: no less CPU)."""
CONNECTIONS = 32
"""Connections to the bucket for reads: its own pool, apart from the uploads' (64)."""

_CODE = re.compile(rb"<Code>([^<]{1,64})</Code>")


def backoff(attempt: int) -> float:
    """Seconds before retry ``attempt`` (1, 2…): botocore's standard mode."""
    return random.random() * min(MAX_BACKOFF, 2.0 ** (attempt - 1))


class Reading(NamedTuple):
    """An object being read: its size (-1 if not told), ETag and chunks (read inside the
    ``get`` block)."""

    size: int
    etag: str
    chunks: AsyncIterator[bytes]


class SignedGets:
    """GETs of ``base + key`` signed with ``credentials()`` for ``region``."""

    def __init__(
        self,
        base: str,
        region: str,
        credentials: Callable[[], Any],
        counted: Callable[[], None],
        hints: dict[str, str],
        *,
        attempts: int,
        connect_timeout: float,
        read_timeout: float,
        ca_bundle: str | None,
    ) -> None:
        self.base = base
        self.region = region
        self._credentials = credentials
        self._counted = counted
        self._hints = hints
        self.attempts = attempts
        self._timeout = aiohttp.ClientTimeout(sock_connect=connect_timeout, sock_read=read_timeout)
        self._ca_bundle = ca_bundle
        self._session: aiohttp.ClientSession | None = None
        self._proxy: str | None = None

    async def __aenter__(self) -> SignedGets:
        context = await asyncio.to_thread(_verifying, self._ca_bundle)
        # HTTP(S)_PROXY and NO_PROXY, as botocore: looked up once (aiohttp's trust_env would
        # look them up, and ~/.netrc, in a thread for every request).
        self._proxy = await asyncio.to_thread(_proxy_for, self.base)
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=CONNECTIONS, ssl=context),
            timeout=self._timeout,
            read_bufsize=CHUNK,
            auto_decompress=False,  # the bytes as stored
        )
        return self

    async def __aexit__(self, *_: object) -> None:
        if self._session is not None:
            await self._session.close()

    async def _headers(self, url: str, where: str) -> dict[str, str]:
        try:
            credentials = await self._credentials()
        except BotoCoreError as e:  # a refresh that failed (expired SSO, unreachable IMDS…)
            raise S3Error(f"{where}: {e}") from None
        if credentials is None:
            raise S3Error(f"{where}: no credentials: set credentials_file/profile or AWS_* variables")
        request = AWSRequest(method="GET", url=url)
        S3SigV4Auth(credentials, "s3", self.region).add_auth(request)
        return dict(request.headers.items())

    @contextlib.asynccontextmanager
    async def get(self, key: str, where: str) -> AsyncIterator[Reading | None]:
        """The object ``key`` as a stream, or None when it does not exist (404). Other answers
        and failures raise one :class:`S3Error` about ``where``, after the retries."""
        assert self._session is not None, "use `async with SignedGets(...)`"
        url = self.base + urllib.parse.quote(key, safe="/~")
        failure = ""
        for attempt in range(self.attempts):
            if attempt:
                await asyncio.sleep(backoff(attempt))
            self._counted()
            try:
                response = await self._session.get(
                    URL(url, encoded=True), headers=await self._headers(url, where), proxy=self._proxy
                )
            except (aiohttp.ClientError, TimeoutError) as e:
                failure = f"{type(e).__name__}: {e}"
                continue
            async with response:
                if response.status in RETRIED:
                    failure = f"HTTP {response.status}"
                    continue
                if response.status != 200:
                    body = await response.content.read(4096)
                    if response.status == 404 and b"<Code>NoSuchBucket</Code>" not in body:
                        yield None
                        return
                    raise self._error(response.status, body, where)
                length = response.headers.get("Content-Length", "")
                size = int(length) if length.isdigit() else -1
                yield Reading(size, response.headers.get("ETag", ""), _chunks(response, where))
                return
        raise S3Error(f"{where}: {failure} ({self.attempts} attempts)")

    def _error(self, status: int, body: bytes, where: str) -> S3Error:
        """Worded as :func:`nixcache.bucket.s3._describe` words botocore's errors."""
        match = _CODE.search(body)
        code = match.group(1).decode(errors="replace") if match else str(status)
        hint = self._hints.get(code) or self._hints.get(str(status), "")
        return S3Error(f"{where}: {code} (HTTP {status}){': ' + hint if hint else ''}")


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

"""A loopback HTTP/1.1 proxy in front of a real S3 server that drops conditional-request headers
(``If-None-Match``, ``If-Match``): the server then sees plain PUTs and DELETEs, as on a provider
that silently ignores conditional writes. It stands in for such a provider in the tests.

botocore signs ``if-none-match`` / ``if-match`` (they are in the SigV4 ``SignedHeaders``), and
SeaweedFS checks signatures, so a request with the header merely removed is refused
(``SignatureDoesNotMatch``). With ``resign`` (the default) the proxy also removes the header from
``SignedHeaders`` and signs the request again with the test credentials, keeping the client's
``X-Amz-Date`` and ``X-Amz-Content-SHA256`` (the payload hash: the body is relayed untouched).

It parses just enough HTTP (request head + Content-Length body) to know where each request
ends; responses are relayed byte for byte. Runs in a thread with its own event loop.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import threading
import urllib.parse
from collections import Counter

from nixcache.bucket.seaweed import ACCESS_KEY, SECRET_KEY, free_port

STRIPPED = (b"if-none-match", b"if-match")


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def _auth_fields(value: str) -> dict[str, str] | None:
    """``AWS4-HMAC-SHA256 Credential=…, SignedHeaders=…, Signature=…`` → its three fields."""
    algorithm, _, rest = value.strip().partition(" ")
    if algorithm != "AWS4-HMAC-SHA256":
        return None
    fields = {}
    for part in rest.split(","):
        name, _, val = part.strip().partition("=")
        fields[name] = val
    return fields if {"Credential", "SignedHeaders", "Signature"} <= fields.keys() else None


def sigv4_signature(
    secret_key: str,
    method: str,
    target: str,
    headers: list[tuple[str, str]],
    signed: list[str],
    scope: str,
) -> str:
    """The SigV4 signature of a request as S3 computes it: the canonical URI is the path as sent
    (S3 does not normalise it), the payload hash is the ``x-amz-content-sha256`` header."""
    path, _, query = target.partition("?")
    pairs = sorted(tuple(p.partition("=")[::2]) for p in query.split("&") if p) if query else []
    canonical_query = "&".join(f"{k}={v}" for k, v in pairs)
    values: dict[str, list[str]] = {}
    for name, value in headers:
        values.setdefault(name.lower(), []).append(" ".join(value.split()))
    canonical_headers = "".join(f"{name}:{','.join(values.get(name, []))}\n" for name in signed)
    payload = values.get("x-amz-content-sha256", ["UNSIGNED-PAYLOAD"])[0]
    canonical = "\n".join([method, path or "/", canonical_query, canonical_headers, ";".join(signed), payload])
    amz_date = values["x-amz-date"][0]
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    date, region, service, terminal = scope.split("/")
    key = _hmac(_hmac(_hmac(_hmac(f"AWS4{secret_key}".encode(), date), region), service), terminal)
    return hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


def strip_head(head: bytes, secret_key: str, resign: bool) -> tuple[bytes, list[str]]:
    """The request head without the conditional headers (re-signed if it was signed with them),
    and the names of the headers removed."""
    lines = head.rstrip(b"\r\n").split(b"\r\n")
    request_line, header_lines = lines[0], lines[1:]
    kept: list[tuple[str, str]] = []
    removed: list[str] = []
    for raw in header_lines:
        name, _, value = raw.decode("latin-1").partition(":")
        if name.strip().lower().encode() in STRIPPED:
            removed.append(name.strip().lower())
        else:
            kept.append((name.strip(), value.strip()))
    if removed and resign:
        index = next((i for i, (n, _) in enumerate(kept) if n.lower() == "authorization"), None)
        fields = _auth_fields(kept[index][1]) if index is not None else None
        if index is not None and fields is not None:
            signed = [h for h in fields["SignedHeaders"].split(";") if h not in removed]
            method, target, _ = request_line.decode("latin-1").split(" ", 2)
            scope = fields["Credential"].split("/", 1)[1]
            signature = sigv4_signature(secret_key, method, target, kept, signed, scope)
            kept[index] = (
                "Authorization",
                f"AWS4-HMAC-SHA256 Credential={fields['Credential']}, SignedHeaders={';'.join(signed)}, "
                f"Signature={signature}",
            )
    out = request_line + b"\r\n" + b"".join(f"{n}: {v}\r\n".encode("latin-1") for n, v in kept) + b"\r\n"
    return out, removed


class StripProxy:
    """``StripProxy(target_port).start()``; ``endpoint`` is what the client should use instead."""

    def __init__(self, target_port: int, resign: bool = True, secret_key: str = SECRET_KEY) -> None:
        self.listen_port = free_port()
        self.target_port = target_port
        self.resign = resign
        self.secret_key = secret_key
        self.access_key = ACCESS_KEY
        self.stripped: Counter[str] = Counter()
        """How many of each header were removed (proof the proxy was in the path)."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    @classmethod
    def for_endpoint(cls, endpoint: str, resign: bool = True) -> StripProxy:
        port = urllib.parse.urlsplit(endpoint).port
        assert port is not None, endpoint
        return cls(port, resign=resign)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.listen_port}"

    def start(self) -> StripProxy:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.listen_port)

    def stop(self) -> None:
        async def close() -> None:
            if self._server is not None:
                self._server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def __enter__(self) -> StripProxy:
        return self.start()

    def __exit__(self, *_: object) -> None:
        self.stop()

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_w.close()
            return
        relay = asyncio.create_task(self._relay(server_r, client_w))
        try:
            while True:
                head = await client_r.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                head, removed = strip_head(head, self.secret_key, self.resign)
                self.stripped.update(removed)
                server_w.write(head)
                remaining = length  # streamed: it may wait for the server's 100 Continue
                while remaining:
                    chunk = await client_r.read(min(remaining, 1 << 16))
                    if not chunk:
                        raise ConnectionError("client closed mid-body")
                    server_w.write(chunk)
                    remaining -= len(chunk)
                await server_w.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass
        except asyncio.CancelledError:
            pass  # stop(): end quietly (Python 3.11's stream callback logs a cancelled handler)
        finally:
            relay.cancel()
            server_w.close()
            client_w.close()

    @staticmethod
    async def _relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(1 << 16):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, asyncio.CancelledError):
            pass

"""An HTTP/1.1 proxy for the fault-injection tests: sits between nixcache and SeaweedFS and
answers some requests itself with 500s or 503 SlowDown, resets some connections, stalls some.

It parses just enough HTTP (request head + Content-Length body) to know where each request
ends; responses are relayed byte for byte. Faults follow a seeded schedule, so a failing run
can be replayed. Runs in a thread with its own event loop.
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections import Counter
from dataclasses import dataclass, field


def _response(status: str, code: str, message: str) -> bytes:
    body = f"<Error><Code>{code}</Code><Message>{message}</Message></Error>".encode()
    head = f"HTTP/1.1 {status}\r\nContent-Type: application/xml\r\nContent-Length: {len(body)}\r\n\r\n"
    return head.encode() + body


SLOWDOWN = _response("503 Slow Down", "SlowDown", "Please reduce your request rate.")
INTERNAL = _response("500 Internal Server Error", "InternalError", "We encountered an internal error.")


@dataclass
class Faults:
    """Probabilities per request (the rest pass through)."""

    error500: float = 0.08
    slowdown: float = 0.08
    reset: float = 0.05
    stall: float = 0.03
    stall_seconds: float = 1.5
    seed: int = 1
    injected: Counter[str] = field(default_factory=Counter)


class FaultProxy:
    def __init__(self, listen_port: int, target_port: int, faults: Faults) -> None:
        self.listen_port, self.target_port, self.faults = listen_port, target_port, faults
        self.random = random.Random(faults.seed)
        self.enabled = True
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.base_events.Server | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.listen_port}"

    def start(self) -> FaultProxy:
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

    def _pick(self) -> str | None:
        if not self.enabled:
            return None
        f, r = self.faults, self.random.random()
        for name, p in (("error500", f.error500), ("slowdown", f.slowdown), ("reset", f.reset), ("stall", f.stall)):
            if r < p:
                return name
            r -= p
        return None

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
                expect_continue = False
                for line in head.split(b"\r\n"):
                    lower = line.lower()
                    if lower.startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                    elif lower.startswith(b"expect:") and b"100-continue" in lower:
                        expect_continue = True
                fault = self._pick()
                if expect_continue and fault in ("error500", "slowdown"):
                    fault = None  # the body only comes after the server's 100 Continue: pass through
                if fault:
                    self.faults.injected[fault] += 1
                if fault == "reset":
                    client_w.transport.abort()
                    break
                if fault in ("error500", "slowdown"):
                    if length:  # the request body is read and dropped
                        await client_r.readexactly(length)
                    response = INTERNAL if fault == "error500" else SLOWDOWN
                    if head.startswith(b"HEAD "):  # a response to HEAD has no body
                        response = response.split(b"\r\n\r\n", 1)[0] + b"\r\n\r\n"
                    client_w.write(response)
                    await client_w.drain()
                    continue
                if fault == "stall":
                    await asyncio.sleep(self.faults.stall_seconds)
                # Pass through, streaming the body (it may wait for the server's 100 Continue).
                server_w.write(head)
                remaining = length
                while remaining:
                    chunk = await client_r.read(min(remaining, 1 << 16))
                    if not chunk:
                        raise ConnectionError("client closed mid-body")
                    server_w.write(chunk)
                    remaining -= len(chunk)
                await server_w.drain()
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError, ValueError):
            pass
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

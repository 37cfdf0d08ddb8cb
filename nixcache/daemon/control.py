"""What the daemon tells the outside: `nixcache status` and metrics on the control socket,
Prometheus metrics on a loopback port and in a textfile, systemd's STATUS and WATCHDOG."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

from nixcache import __version__, metrics
from nixcache.daemon import sdnotify
from nixcache.daemon.state import State
from nixcache.local.journal import write_atomic
from nixcache.logs import get
from nixcache.status import Outage, Status

log = get("nixcache.daemon.control")


class Control(State):
    _servers: list[asyncio.Server]

    def status(self) -> Status:
        """What `nixcache status` shows: no S3 request needed."""
        return Status(
            version=__version__,
            pid=os.getpid(),
            uptime_seconds=round(time.time() - self.started, 1),
            config_file=str(self.config_file) if self.config_file else None,
            bucket=self.cfg.s3.bucket,
            queue_depth=self.queue.qsize(),
            in_flight=len(self.busy),
            pending=len(self.backlog),
            uploaded=metrics.value("uploads_total"),
            failing=len(self.errors),
            failures=dict(list(self.errors.items())[-20:]),
            outage=None
            if self.outage is None
            else Outage(self.outage, round(max(0.0, self.resume_at - time.monotonic()), 1)),
            roots=len(self.live_roots),
            dereference=self.cycles.get("dereference"),
            collection=self.cycles.get("collection"),
            requests=dict(sorted(metrics.requests().items())),
        )

    def status_line(self) -> str:
        return (
            f"{len(self.backlog)} paths pending, {len(self.busy)} uploading, "
            f"{len(self.live_roots)} roots, bucket {self.cfg.s3.bucket}"
        )

    async def _control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One command per connection on the control socket: `status` (JSON) or `metrics`."""
        try:
            command = (await asyncio.wait_for(reader.readline(), 5)).decode().strip()
            if command == "metrics":
                writer.write(metrics.exposition())
            else:
                writer.write(self.status().to_json().encode() + b"\n")
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeDecodeError):
            pass
        finally:
            writer.close()

    async def _metrics_http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A scrape. On the event loop, not prometheus_client's server: that one starts a
        thread per connection with no timeout (idle local connections would pile up), binds
        one address of a name (``localhost`` is two), and takes 0.5 s to stop."""
        try:
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            body = metrics.exposition()
            # The text format 0.0.4 (metric names as Prometheus has always had them: the 1.0.0
            # format the library calls latest writes the same bytes for them).
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
                         b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))  # fmt: skip
            await writer.drain()
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    async def _metrics_textfile_loop(self, path: Path) -> None:
        """For node_exporter's textfile collector (written atomically and durably)."""

        async def job() -> None:
            try:
                await asyncio.to_thread(write_atomic, path, metrics.exposition())
            except OSError as e:
                log.warning("metrics.textfile_failed", path=str(path), error=e.strerror)

        await self._every(lambda: 15.0, job)

    async def _start_servers(self) -> None:
        """The control socket beside the FIFO; the Prometheus listener if configured (its
        gauges are read when scraped)."""
        metrics.QUEUE_DEPTH.set_function(self.queue.qsize)
        metrics.PENDING_PATHS.set_function(lambda: len(self.backlog))
        metrics.IN_FLIGHT.set_function(lambda: len(self.busy))
        control = self.cfg.fifo.parent / "control.sock"
        control.unlink(missing_ok=True)
        self._servers = [await asyncio.start_unix_server(self._control, path=str(control))]
        os.chmod(control, 0o660)
        if self.cfg.metrics.listen:
            host, _, port = self.cfg.metrics.listen.rpartition(":")
            self._servers.append(await asyncio.start_server(self._metrics_http, host or "127.0.0.1", int(port)))

    def _stop_servers(self) -> None:
        for server in self._servers:
            server.close()

    async def _watchdog_loop(self, period: float) -> None:
        """WATCHDOG=1 from the event loop itself: if the loop hangs, systemd restarts us."""

        async def job() -> None:
            sdnotify.notify("WATCHDOG=1", f"STATUS={self.status_line()}")

        await self._every(lambda: period, job)

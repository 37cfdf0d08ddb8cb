"""Intake: store paths from the post-build hook's FIFO and spool files into the journal.

A path is journaled (durably: one directory fsync per batch) before it becomes pending;
garbage on the FIFO is rejected with one log line per batch, never a crash."""

from __future__ import annotations

import asyncio
import os
import stat

from nixcache.daemon.state import State
from nixcache.errors import NixcacheError, StoreError
from nixcache.local import store
from nixcache.logs import get

log = get("nixcache.daemon.intake")

MAX_LINE = 4096
READ_SIZE = 1 << 16
LOG_EACH = 100
"""Received paths logged one per line up to this many at once; more get one summary line."""


class Intake(State):
    def _parse(self, lines: list[str]) -> tuple[list[str], list[str]]:
        """Store paths among ``lines`` (blank ones ignored), and why the others were rejected."""
        paths, reasons = [], []
        for line in lines:
            line = line.strip()
            if not line:
                continue
            try:
                paths.append(store.parse_store_path(line, self.cfg.store_dir))
            except StoreError as e:
                reasons.append(str(e))
        return paths, reasons

    def _pending(self, paths: list[str], new: list[str], source: str) -> None:
        """Journaled paths become pending: the feeder hands them to the workers."""
        if len(new) <= LOG_EACH:
            for path in new:
                log.info("path.received", path=path, source=source)
        else:  # a spool of a week offline: one line, not 100,000 on the event loop
            log.info("paths.received", paths=len(new), first=new[0], last=new[-1], source=source)
        for path in paths:
            self.backlog.add(path)
        self.backlog_changed.set()

    async def _intake(self, paths: list[str], source: str) -> None:
        """Journal (durably, off the event loop: one fsync per batch), then make pending."""
        async with self._intake_lock:
            try:
                new = await asyncio.to_thread(self.journal.add_many, paths)
            except OSError as e:  # disk full, read-only state dir: say so; the paths are lost
                log.error("journal.error", error=str(e), lost=len(paths), first=paths[0])
                return
        self._pending(paths, new, source)

    def _open_fifo(self) -> None:
        fifo = self.cfg.fifo
        fifo.parent.mkdir(parents=True, exist_ok=True)
        try:
            st = os.stat(fifo)
            if not stat.S_ISFIFO(st.st_mode):
                raise NixcacheError(f"{fifo} exists and is not a FIFO; remove it or change `fifo`")
        except FileNotFoundError:
            os.mkfifo(fifo, 0o600)
        # O_RDWR: we are a writer too, so the FIFO never reports EOF when hooks close it.
        self._fifo_fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        asyncio.get_running_loop().add_reader(self._fifo_fd, self._on_fifo_readable)

    def _close_fifo(self) -> None:
        """Stop reading, but first take what hooks already wrote (their write succeeded: they
        spooled nothing, so it exists nowhere else)."""
        if self._fifo_fd is not None:
            asyncio.get_running_loop().remove_reader(self._fifo_fd)
            while True:
                try:
                    data = os.read(self._fifo_fd, READ_SIZE)
                except (BlockingIOError, InterruptedError):
                    break
                if not data:
                    break
                self.feed(data)
            os.close(self._fifo_fd)
            self._fifo_fd = None

    def _on_fifo_readable(self) -> None:
        assert self._fifo_fd is not None
        try:
            data = os.read(self._fifo_fd, READ_SIZE)
        except BlockingIOError:
            return
        self.feed(data)

    def feed(self, data: bytes) -> None:
        """Split FIFO bytes into lines; overlong lines and undecodable bytes are rejected."""
        lines: list[str] = []
        reasons: list[str] = []
        self._partial += data
        while True:
            nl = self._partial.find(b"\n")
            if nl < 0:
                if len(self._partial) > MAX_LINE:
                    if not self._discarding:
                        reasons.append(f"line longer than {MAX_LINE} bytes")
                    self._discarding = True
                    self._partial.clear()
                break
            raw = bytes(self._partial[:nl])
            del self._partial[: nl + 1]
            if self._discarding:
                self._discarding = False
                continue
            try:
                lines.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                reasons.append("bytes that are not UTF-8")
        paths, rejected = self._parse(lines)
        reasons += rejected
        if reasons:
            log.warning("fifo.rejected", lines=len(reasons), first_reason=reasons[0][:300])
        if paths:
            task = asyncio.create_task(self._intake(paths, "fifo"))
            self._intakes.add(task)
            task.add_done_callback(self._intakes.discard)

    async def import_spool(self) -> None:
        """Journal what hooks spooled while nobody read the FIFO (off the event loop)."""
        got: list[tuple[list[str], list[str], list[str]]] = []

        def accept(lines: list[str]) -> None:
            paths, rejected = self._parse(lines)
            got.append((paths, self.journal.add_many(paths), rejected))

        async with self._intake_lock:
            try:
                n = await asyncio.to_thread(self.journal.import_spool, accept)
            except OSError as e:
                log.error("journal.error", error=str(e))
                return
        for paths, new, rejected in got:
            self._pending(paths, new, "spool")
            if rejected:
                log.warning("spool.rejected", lines=len(rejected), first_reason=rejected[0][:300])
        if n:
            log.info("spool.imported", lines=n)
        for problem in sorted(self.journal.unreadable - self._reported):
            self._reported.add(problem)
            log.error("spool.unreadable", problem=problem)

    async def _spool_loop(self) -> None:
        await self._every(lambda: self.cfg.upload.spool_interval, self.import_spool)

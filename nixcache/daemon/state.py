"""What the daemon's tasks share: the configuration, the bucket, the pending paths, the roots.

Each task is a mixin over this state (daemon/intake.py, workers.py, schedule.py, control.py);
daemon/service.py puts them together. They share one state, not copies: a reload swaps the
bucket for all of them at once, and the feeder, the workers and `status` read one backlog.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

from nixcache.config import Config
from nixcache.daemon.backlog import Backlog
from nixcache.daemon.bucket import Bucket
from nixcache.local import roots
from nixcache.local.journal import Journal
from nixcache.ops.publish import Publisher
from nixcache.status import Cycle


class State:
    def __init__(self, cfg: Config, config_file: Path | None) -> None:
        self.cfg = cfg
        self.config_file = config_file
        self.journal = Journal(cfg.state_dir, cfg.store_dir)
        self.backlog = Backlog()
        """The journal's pending paths, in memory: what the feeder hands to the workers."""
        self.backlog_changed = asyncio.Event()
        self.queue: asyncio.Queue[str] = asyncio.Queue(maxsize=cfg.upload.queue_size)
        self.resume_at = 0.0
        """Uploads are paused (an outage) until this time.monotonic()."""
        self.outage: str | None = None
        self.outage_failures = 0
        self._intake_lock = asyncio.Lock()
        self._reload_lock = asyncio.Lock()
        self._intakes: set[asyncio.Task[None]] = set()
        self.bucket: Bucket | None = None
        self.workers: dict[int, asyncio.Task[None]] = {}
        self.busy: set[int] = set()
        self.stopping = asyncio.Event()
        self._fifo_fd: int | None = None
        self._partial = bytearray()
        self._discarding = False
        self._background: set[asyncio.Task[None]] = set()
        self.publisher = Publisher(cfg)
        self.watcher: roots.Watcher | None = None
        self.roots_lock = asyncio.Lock()
        """publish and dereference of this host's folder, one at a time."""
        self.live_roots: dict[str, roots.Root] = {}
        self.roots_scanned = asyncio.Event()
        self.roots_complete = False
        self.roots_memory = roots.Memory(cfg.state_dir)
        self._reported: set[str] = set()
        self.started = time.time()
        self.errors: dict[str, str] = {}
        """Last error of each failing path (at most MAX_ERRORS, most recent last)."""
        self.cycles: dict[str, Cycle] = {}
        """last/next time and summary of each periodic job, for `nixcache status`."""

    async def _wait(self, event: asyncio.Event, seconds: float | None) -> None:
        """Until ``event`` is set, SIGTERM or ``seconds`` have passed (None: no limit)."""
        waiters = {asyncio.create_task(event.wait()), asyncio.create_task(self.stopping.wait())}
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when="FIRST_COMPLETED")
        finally:
            for waiter in waiters:
                waiter.cancel()

    async def _every(self, interval: Callable[[], float], job: Callable[[], Awaitable[None]]) -> None:
        """Run ``job`` now and then every ``interval()`` seconds (read each time: a reload
        may change it) until SIGTERM."""
        while not self.stopping.is_set():
            await job()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), interval())

    def _background_task(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

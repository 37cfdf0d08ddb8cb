"""``nixcache serve``: wires the tasks together — intake (FIFO, spool), upload workers, the
periodic jobs, the control socket — and owns the process's life: start-up, reload on SIGHUP,
drain on SIGTERM. The decisions live in the modules it calls."""

from __future__ import annotations

import asyncio
import signal

from nixcache.config import load_config
from nixcache.daemon import sdnotify
from nixcache.daemon.bucket import Bucket
from nixcache.daemon.control import Control
from nixcache.daemon.intake import Intake
from nixcache.daemon.schedule import Schedule
from nixcache.daemon.substituter import Substituter
from nixcache.daemon.workers import Workers
from nixcache.errors import NixcacheError
from nixcache.local import roots
from nixcache.logs import get
from nixcache.ops.publish import Publisher

log = get("nixcache.daemon.service")

__all__ = ["Bucket", "Service"]


class Service(Intake, Workers, Schedule, Control, Substituter):
    """The daemon: one of each task, over one shared state (daemon/state.py)."""

    async def reload(self) -> None:
        """SIGHUP: apply a new config; keep the old one if the new one is broken. One reload
        at a time, in signal order: the last SIGHUP's config is the one that stays."""
        async with self._reload_lock:
            await self._reload()

    async def _reload(self) -> None:
        try:
            cfg, _ = load_config(self.config_file)
            new = await Bucket(cfg).open()
        except NixcacheError as e:
            log.error("config.rejected", error=str(e), keeping="previous config")
            return
        for key in ("state_dir", "fifo", "store_dir", "substituter"):
            if getattr(cfg, key) != getattr(self.cfg, key):
                log.warning("config.needs_restart", key=key)
        old, self.bucket = self.bucket, new
        if old is not None and old.uploader is not None and new.uploader is not None:
            if old.target == new.target:
                new.uploader.known_present = set(old.uploader.known_present)
                new.uploader.records.adopt(old.uploader.records)
            else:  # another bucket: nothing known of the old one applies (a fresh uploader)
                self.publisher = Publisher(cfg)  # its gcinfos are listed afresh…
                self._roots_changed()  # …and every root is published to it now
                self.resume_at, self.outage, self.outage_failures = 0.0, None, 0
                self.backlog_changed.set()
                log.info("bucket.changed", bucket=cfg.s3.bucket, endpoint=cfg.s3.endpoint)
                self._follow(new)  # the substituter's narinfo cache: the new bucket's
            self._background_task(old.close())
        if cfg.hostname != self.cfg.hostname:
            self.publisher = Publisher(cfg)  # another folder in the bucket: listed (and claimed) afresh
        self.cfg = cfg
        self.publisher.cfg = cfg
        self._spawn_workers()
        sdnotify.notify(f"STATUS={self.status_line()}")
        log.info("config.reloaded", workers=cfg.upload.workers, compression=cfg.upload.compression,
                 bucket=cfg.s3.bucket)  # fmt: skip

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self.bucket = await Bucket(self.cfg).open()
        loop.add_signal_handler(signal.SIGHUP, lambda: self._background_task(self.reload()))
        loop.add_signal_handler(signal.SIGTERM, self.stopping.set)
        loop.add_signal_handler(signal.SIGINT, self.stopping.set)
        for path in await asyncio.to_thread(self.journal.pending):
            self.backlog.add(path)
        self._open_fifo()
        await self._start_servers()
        await self._start_substituter()
        self._spawn_workers()
        refill = asyncio.create_task(self._spool_loop(), name="spool")
        loops_feed = asyncio.create_task(self._feed_loop(), name="feed")
        watcher = self.watcher = roots.Watcher()
        watcher.start()
        loops = [
            refill,
            loops_feed,
            asyncio.create_task(self._roots_loop(watcher), name="roots"),
            asyncio.create_task(self._dereference_loop(), name="dereference"),
            asyncio.create_task(self._collect_loop(), name="collect"),
        ]
        # Ready only once the FIFO is open and the roots are scanned and watched.
        await self.roots_scanned.wait()
        if self.cfg.metrics.textfile is not None:
            loops.append(asyncio.create_task(self._metrics_textfile_loop(self.cfg.metrics.textfile)))
        if (period := sdnotify.watchdog_period()) is not None:
            loops.append(asyncio.create_task(self._watchdog_loop(period), name="watchdog"))
        sdnotify.notify("READY=1", f"STATUS={self.status_line()}")
        log.info("service.ready", fifo=str(self.cfg.fifo), bucket=self.cfg.s3.bucket,
                 workers=self.cfg.upload.workers, pending=len(self.backlog))  # fmt: skip
        await self.stopping.wait()
        self._stop_servers()
        await self._stop_substituter()
        watcher.close()
        await self._drain(loops)
        return 0

    async def _drain(self, loops: list[asyncio.Task[None]]) -> None:
        """Stop taking work, give in-flight uploads ``drain_timeout``, leave the rest pending."""
        sdnotify.notify("STOPPING=1")
        log.info("service.stopping", in_flight=len(self.busy), pending=len(self.backlog))
        self._close_fifo()
        await asyncio.gather(*self._intakes, return_exceptions=True)  # what was read is journaled
        for loop in loops:
            loop.cancel()
        for idx, task in list(self.workers.items()):
            if idx not in self.busy:
                task.cancel()
        tasks = list(self.workers.values())
        if tasks:
            # In an outage the busy ones only wait for an unreachable bucket: no use waiting.
            timeout = 0 if self.outage is not None else self.cfg.upload.drain_timeout
            _, late = await asyncio.wait(tasks, timeout=timeout)
            for task in late:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.gather(*loops, return_exceptions=True)
        if self.bucket is not None:
            await self.bucket.close()
        log.info("service.stopped", pending=len(self.backlog))

"""The periodic jobs: publish the roots (on inotify, debounced, and every rescan interval),
learn what collections deleted and dereference (every 30 min), collect (every hour)."""

from __future__ import annotations

import asyncio
import time
from collections import Counter

from nixcache import metrics
from nixcache.bucket.s3 import job_requests
from nixcache.daemon.state import State
from nixcache.errors import NixcacheError
from nixcache.local import roots
from nixcache.logs import get
from nixcache.ops.collect import Collector
from nixcache.ops.publish import CycleResult
from nixcache.status import Cycle

log = get("nixcache.daemon.schedule")


class Schedule(State):
    def _report(self, scan: roots.Scan) -> None:
        """Log each junk entry once, not at every rescan."""
        for event, lines in (("roots.skipped", scan.problems), ("roots.unknown", scan.unreadable),
                             ("roots.held", scan.held)):  # fmt: skip
            for problem in lines:
                if problem not in self._reported:
                    self._reported.add(problem)
                    log.warning(event, problem=problem)

    async def _roots_loop(self, watcher: roots.Watcher) -> None:
        """Scan, publish, then wait for inotify (debounced) or the periodic rescan."""
        while not self.stopping.is_set():
            try:
                await self._roots_round(watcher)
            except Exception as e:  # a bug must not end publishing for good; next round retries
                log.exception("roots.crashed", error=repr(e))
            await self._wait_for_change(watcher)

    def _roots_changed(self) -> None:
        """Make the roots loop publish again soon (a collection touched the bucket)."""
        if self.watcher is not None:
            self.watcher.changed.set()

    async def _roots_round(self, watcher: roots.Watcher) -> None:
        scan = await roots.discover(self.cfg.roots_dirs(), self.cfg.store_dir, self.roots_memory)
        watcher.update(scan.dirs)
        self._report(scan)
        selected = roots.select(scan.roots, self.cfg.roots.include, self.cfg.roots.exclude)
        self.live_roots, self.roots_complete = selected, scan.complete
        self.roots_scanned.set()
        try:
            # The bucket and its publisher are taken under the lock, together: a reload to
            # another bucket while this round waited must not mix one's client with the other's.
            async with self.roots_lock:
                assert self.bucket is not None
                with self.bucket.use() as uploader:
                    result = await self.publisher.publish(uploader, selected)
            metrics.ROOTS_PUBLISHED.inc(len(result.published))
            self._log_cycle("roots.published", result, roots=len(selected))
        except NixcacheError as e:
            log.warning("roots.publish_failed", error=str(e))

    async def _wait_for_change(self, watcher: roots.Watcher) -> None:
        stop = asyncio.create_task(self.stopping.wait())
        change = asyncio.create_task(watcher.changed.wait())
        await asyncio.wait({stop, change}, timeout=self.cfg.roots.rescan_interval, return_when="FIRST_COMPLETED")
        stop.cancel()
        change.cancel()
        # Debounce: a rebuild or a collection touches many links; wait for quiet (≤ 30 s).
        deadline = time.monotonic() + 30
        while watcher.changed.is_set() and time.monotonic() < deadline and not self.stopping.is_set():
            watcher.changed.clear()
            await asyncio.sleep(self.cfg.roots.debounce)

    async def _dereference_loop(self) -> None:
        await self.roots_scanned.wait()

        async def job() -> None:
            requests = await self.learn_deletions()
            if self.cfg.gc.dereference:
                await self.dereference_now(requests)

        await self._every(lambda: self.cfg.gc.dereference_interval, job)

    async def learn_deletions(self) -> Counter[str]:
        """What collections deleted (one LIST when nothing happened): forget it, and re-check
        the roots whose closures lost a path. Every dereference interval, dereferencing or not."""
        assert self.bucket is not None
        with self.bucket.use() as uploader, job_requests() as requests:
            try:
                await uploader.records.refresh()
            except NixcacheError as e:
                log.warning("deletions.refresh_failed", error=str(e))
            except Exception as e:  # a bug: keep the daemon (and its dereference loop) running
                log.exception("deletions.refresh_crashed", error=repr(e))
            uploader.forget()
            if uploader.records.deleted:
                self._roots_changed()
        return requests

    async def dereference_now(self, requests: Counter[str] | None = None) -> None:
        if not self.roots_complete:
            log.warning("dereference.skipped", reason="some roots could not be read (see roots.unknown)")
            return
        try:
            async with self.roots_lock:  # never between a publish's writes and its checks
                if not self.roots_complete:  # the scan that finished while we waited
                    log.warning("dereference.skipped", reason="some roots could not be read (see roots.unknown)")
                    return
                assert self.bucket is not None
                with self.bucket.use() as uploader:
                    result = await self.publisher.dereference(uploader.s3, self.live_roots)
            result.requests.update(requests or Counter())  # the cycle's whole cost
            metrics.GCINFOS_TRASHED.inc(len(result.moved))
            self._cycle("dereference", self.cfg.gc.dereference_interval, trashed=len(result.moved),
                        requests=dict(result.requests))  # fmt: skip
            self._log_cycle("dereference.done", result)
        except NixcacheError as e:
            log.warning("dereference.failed", error=str(e))
        except Exception as e:  # a bug: keep the daemon (and its uploads) running
            log.exception("dereference.crashed", error=repr(e))

    async def _collect_loop(self) -> None:
        await self.roots_scanned.wait()  # our own roots are published before we judge others'

        async def job() -> None:
            if self.cfg.gc.collect:
                await self.collect_now()

        await self._every(lambda: self.cfg.gc.collect_interval, job)

    async def collect_now(self) -> None:
        assert self.bucket is not None
        with self.bucket.use() as uploader:
            try:
                with metrics.GC_SECONDS.time():  # aborted collections too
                    result = await Collector(self.cfg, uploader.s3).collect(residual_age=self.cfg.gc.residual_age)
            except NixcacheError as e:  # e.g. a corrupt gcinfo: nothing was deleted
                metrics.GC_ABORTED.inc()
                self._cycle("collection", self.cfg.gc.collect_interval, aborted=str(e))
                log.error("gc.aborted", error=str(e))
                return
            except Exception as e:  # a bug: keep the daemon (and its uploads) running
                log.exception("gc.crashed", error=repr(e))
                return
        plan = result.plan
        if plan.narinfos and self.bucket is not None and self.bucket.uploader is not None:
            # Our own collection: forget those paths now, and re-check our roots' closures.
            self.bucket.uploader.records.learn(plan.paths())
            self._roots_changed()
        freed = plan.bytes
        metrics.GC_RUNS.inc()
        metrics.GC_DELETED_OBJECTS.inc(result.deleted)
        metrics.GC_DELETED_BYTES.inc(freed if result.deleted else 0)
        self._cycle("collection", self.cfg.gc.collect_interval, skipped=result.skipped, dead_paths=plan.dead_paths,
                    deleted=result.deleted, bytes=freed, requests=dict(result.requests))  # fmt: skip
        log.info(
            "gc.done",
            skipped=result.skipped,
            gcinfos_read=result.gcinfos_read,
            gcinfos_cached=result.gcinfos_cached,
            dead_paths=plan.dead_paths,
            kept_young=plan.kept_young,
            kept_shared_nar=plan.kept_shared_nar,
            deleted=result.deleted,
            bytes=plan.bytes,
            kept_referenced=plan.kept_referenced,
            narinfos_read=result.narinfos_read,
            requests=dict(result.requests),
            seconds=round(result.seconds, 3),
        )

    def _cycle(self, job: str, interval: float, **summary: object) -> None:
        now = time.time()
        self.cycles[job] = Cycle(now, now + interval, summary)

    @staticmethod
    def _log_cycle(event: str, result: CycleResult, **extra: object) -> None:
        log.info(
            event,
            published=len(result.published),
            unchanged=result.unchanged,
            failed=len(result.failed),
            trashed=len(result.moved),
            requests=dict(result.requests),
            seconds=round(result.seconds, 3),
            **extra,
        )

"""Upload workers: the feeder hands due pending paths to a bounded queue, workers push them.

A path leaves the journal only once its closure is in the bucket it is configured for now,
or once Nix says it is no longer valid. Failures for a reason not the path's (the bucket or
Nix unreachable) pause every upload for ``retry_interval``."""

from __future__ import annotations

import asyncio
import time

from nixcache import metrics
from nixcache.daemon.bucket import Bucket
from nixcache.daemon.state import State
from nixcache.errors import NixcacheError, S3Error, StoreError
from nixcache.local import store
from nixcache.logs import get
from nixcache.ops.upload import PushResult

log = get("nixcache.daemon.workers")

MAX_ERRORS = 1000
"""Failing paths whose last error is kept for `nixcache status` (the most recent ones)."""
OUTAGE_AFTER = 3
"""Failures in a row, of different paths, for a reason not theirs, that pause all uploads."""
BATCH = 64
"""Pending paths a worker pushes as one job when they are queued together."""


class Workers(State):
    async def _feed_loop(self) -> None:
        """Hand due paths to the workers through the bounded queue; none during an outage."""
        while not self.stopping.is_set():
            now = time.monotonic()
            path = self.backlog.take(now) if now >= self.resume_at else None
            if path is not None:
                await self.queue.put(path)
                continue
            self.backlog_changed.clear()
            due = self.backlog.next_due()
            if now < self.resume_at:
                timeout: float | None = self.resume_at - now
            else:
                timeout = None if due is None else max(0.0, due - now)
            await self._wait(self.backlog_changed, timeout)

    async def _worker(self, idx: int) -> None:
        while not self.stopping.is_set() and idx < self.cfg.upload.workers:
            paths = [await self.queue.get()]
            while len(paths) < BATCH and not self.queue.empty():
                paths.append(self.queue.get_nowait())
            self.busy.add(idx)
            try:
                await self._process_batch(paths)
            except Exception as e:  # a bug must not end the worker: its paths stay pending
                log.exception("push.crashed", paths=len(paths), error=repr(e))
                for path in paths:
                    if path in self.backlog:
                        self.backlog.retry(path, time.monotonic() + self.cfg.upload.retry_interval)
                self.backlog_changed.set()
            finally:
                self.busy.discard(idx)
        self.workers.pop(idx, None)

    def _paused(self, paths: list[str]) -> bool:
        """During an outage, hand ``paths`` back untried (they were queued before it began)."""
        if time.monotonic() >= self.resume_at:
            return False
        for path in paths:
            self.backlog.release(path)
        self.backlog_changed.set()
        return True

    async def _process_batch(self, paths: list[str], top: bool = True) -> None:
        """Push several pending paths as one job (one closure query, one presence check, one
        check of the deletion records): a week's backlog drains in batches. If the batch
        fails, it is pushed again in halves, down to single paths, to find out which one failed
        and why (``_process`` judges a single path's error)."""
        if self._paused(paths):
            return
        if len(paths) == 1 or any(p.endswith(".drv") for p in paths):
            for n, path in enumerate(paths):
                if self._paused(paths[n:]):
                    return
                await self._process(path)
            return
        bucket = self.bucket
        assert bucket is not None
        error: Exception | None = None
        with bucket.use() as uploader:
            try:
                result = await uploader.push(paths)
            except Exception as e:
                error = e
        if error is None:
            await self._pushed(bucket, paths, result)
            return
        log.info("push.batch_failed", paths=len(paths), error=str(error) or repr(error), then="in halves")
        if top and isinstance(error, S3Error):
            # The bucket's trouble, most likely: counts toward a pause, once per batch (its
            # halves do not count: one path's own S3 error must not pause everything).
            self._outage(error)
        half = len(paths) // 2  # a path that fails on its own costs log2(batch) more pushes
        await self._process_batch(paths[:half], top=False)
        await self._process_batch(paths[half:], top=False)

    async def _process(self, path: str) -> None:
        """Push one pending path. Only a path no longer valid in the store is dropped; any
        other failure leaves it pending (an outage of the bucket or of Nix pauses all)."""
        bucket = self.bucket
        assert bucket is not None
        with bucket.use() as uploader:
            try:
                roots = await store.derivation_outputs(path) if path.endswith(".drv") else [path]
                result = await uploader.push(roots)
            except StoreError as e:
                gone = await self._gone(path)
                if gone and self.backlog.reported_again(path):  # rebuilt meanwhile: judge again
                    self.backlog.retry(path, time.monotonic())
                    self.backlog_changed.set()
                elif gone:
                    log.error("path.skipped", path=path, error=str(e), reason="no longer valid in the store")
                    await self._forget(path)
                else:  # gone is None: Nix could not be asked (nix-daemon restarting): an outage
                    self._failed(path, e, outage=gone is None)
                return
            except S3Error as e:
                self._failed(path, e, outage=True)
                return
            except NixcacheError as e:  # this path's own trouble (e.g. a NAR hash mismatch)
                self._failed(path, e, outage=False)
                return
            except Exception as e:  # a bug must not kill the worker; the path stays pending
                log.exception("push.crashed", path=path, error=repr(e))
                self._failed(path, e, outage=False)
                return
        await self._pushed(bucket, [path], result)

    async def _pushed(self, bucket: Bucket, paths: list[str], result: PushResult) -> None:
        self._recovered()
        for n, path in enumerate(paths):
            if self.bucket is not None and bucket.target != self.bucket.target:
                # Reloaded to another bucket (now, or while the last entry was removed): the
                # rest went to the old one only; queue them again for the new one.
                for rest in paths[n:]:
                    self.backlog.retry(rest, time.monotonic())
                self.backlog_changed.set()
                return
            await self._forget(path)
        metrics.pushed(result.uploaded, result.nar_bytes, result.file_bytes)
        log.info(
            "push.done",
            path=paths[0],
            paths=paths,
            closure=result.closure,
            upstream=result.upstream,
            already_present=result.present,
            uploaded=result.uploaded,
            nar_bytes=result.nar_bytes,
            compressed_bytes=result.file_bytes,
            seconds=round(result.seconds, 3),
            requests=dict(result.requests),
        )

    @staticmethod
    async def _gone(path: str) -> bool | None:
        """Is ``path`` (or, for a .drv, one of its outputs) no longer valid? None: Nix could
        not be asked."""
        try:
            if await store.invalid_paths([path]):
                return True
            if path.endswith(".drv"):
                return bool(await store.invalid_paths(await store.derivation_outputs(path)))
            return False
        except StoreError:
            return None

    async def _forget(self, path: str) -> None:
        self.backlog.done(path)
        self.errors.pop(path, None)
        try:
            await asyncio.to_thread(self.journal.remove, path)
        except OSError as e:
            log.error("journal.error", error=str(e), path=path)

    def _failed(self, path: str, error: Exception, outage: bool) -> None:
        """Retry ``path`` later. Failures of several paths in a row for a reason that is not
        theirs (bucket unreachable, Nix unavailable) pause every upload for ``retry_interval``:
        a week offline costs a few attempts per interval, not one per pending path."""
        now, interval = time.monotonic(), self.cfg.upload.retry_interval
        self.errors.pop(path, None)
        self.errors[path] = str(error)
        while len(self.errors) > MAX_ERRORS:
            del self.errors[next(iter(self.errors))]
        metrics.UPLOAD_FAILURES.inc()
        self.backlog.retry(path, now + interval)
        self.backlog_changed.set()  # the feeder may be waiting with no retry time to wake for
        if outage:
            self._outage(error)
        log.warning("push.failed", path=path, error=str(error), retry_in=interval)

    def _outage(self, error: Exception) -> None:
        """A failure whose cause is not the path: after OUTAGE_AFTER in a row, pause."""
        now, interval = time.monotonic(), self.cfg.upload.retry_interval
        self.outage_failures += 1
        if self.outage_failures >= OUTAGE_AFTER and now >= self.resume_at:
            self.resume_at = now + interval
            if self.outage is None:
                log.warning("uploads.paused", error=str(error), retry_in=interval, pending=len(self.backlog))
            self.outage = str(error)

    def _recovered(self) -> None:
        self.outage_failures, self.resume_at = 0, 0.0
        if self.outage is not None:
            log.info("uploads.resumed", pending=len(self.backlog))
            self.outage = None

    def _spawn_workers(self) -> None:
        for idx in range(self.cfg.upload.workers):
            if idx not in self.workers:
                self.workers[idx] = asyncio.create_task(self._worker(idx), name=f"worker-{idx}")

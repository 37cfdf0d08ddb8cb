"""``nixcache serve``: wires the tasks together — FIFO reader, spool import, upload workers,
reload on SIGHUP, drain on SIGTERM. The decisions live in the modules it calls."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import stat
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

from nixcache import __version__
from nixcache.bucket.s3 import REQUESTS, S3, job_requests
from nixcache.config import Config, load_config, load_signing_key
from nixcache.daemon import sdnotify
from nixcache.daemon.backlog import Backlog
from nixcache.errors import NixcacheError, S3Error, StoreError
from nixcache.local import roots, store
from nixcache.local.journal import Journal, write_atomic
from nixcache.logs import get
from nixcache.metrics import Metrics
from nixcache.ops.collect import Collector
from nixcache.ops.publish import CycleResult, Publisher
from nixcache.ops.upload import PushResult, Uploader

log = get("nixcache.daemon.service")

MAX_LINE = 4096
READ_SIZE = 1 << 16
MAX_ERRORS = 1000
"""Failing paths whose last error is kept for `nixcache status` (the most recent ones)."""
OUTAGE_AFTER = 3
"""Failures in a row, of different paths, for a reason not theirs, that pause all uploads."""
BATCH = 64
"""Pending paths a worker pushes as one job when they are queued together."""
LOG_EACH = 100
"""Received paths logged one per line up to this many at once; more get one summary line."""
"""Pending paths a worker pushes as one job when they are queued together."""
"""Failures in a row, of different paths, for a reason not theirs, that pause all uploads."""


class Bucket:
    """An open S3 client and the uploader using it; retired (closed) once no job uses it."""

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.target = (cfg.s3.endpoint, cfg.s3.region, cfg.s3.bucket)
        """Which bucket: what the uploader's and publisher's knowledge is about."""
        self.s3 = S3(cfg.s3)
        self.uploader: Uploader | None = None
        self.active = 0
        self.idle = asyncio.Event()
        self.idle.set()

    async def open(self) -> Bucket:
        key = load_signing_key(self.cfg)
        await self.s3.__aenter__()
        self.uploader = Uploader(self.cfg, self.s3, key)
        return self

    async def close(self) -> None:
        await self.idle.wait()
        await self.s3.__aexit__(None, None, None)

    @contextlib.contextmanager
    def use(self) -> Iterator[Uploader]:
        assert self.uploader is not None
        self.active += 1
        self.idle.clear()
        try:
            yield self.uploader
        finally:
            self.active -= 1
            if self.active == 0:
                self.idle.set()


class Service:
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
        self.metrics = Metrics()
        self.started = time.time()
        self.errors: dict[str, str] = {}
        """Last error of each failing path (at most MAX_ERRORS, most recent last)."""
        self.cycles: dict[str, dict[str, Any]] = {}
        """last/next time and summary of each periodic job, for `nixcache status`."""

    # ---- input: FIFO and spool -------------------------------------------------------------

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

    async def _wait(self, event: asyncio.Event, seconds: float | None) -> None:
        """Until ``event`` is set, SIGTERM or ``seconds`` have passed (None: no limit)."""
        waiters = {asyncio.create_task(event.wait()), asyncio.create_task(self.stopping.wait())}
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when="FIRST_COMPLETED")
        finally:
            for waiter in waiters:
                waiter.cancel()

    # ---- work ------------------------------------------------------------------------------

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
        self.metrics.uploads += result.uploaded
        self.metrics.nar_bytes += result.nar_bytes
        self.metrics.compressed_bytes += result.file_bytes
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
        self.metrics.upload_failures += 1
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

    # ---- GC roots ----------------------------------------------------------------------------

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
            self.metrics.roots_published += len(result.published)
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

    async def _every(self, interval: Callable[[], float], job: Callable[[], Awaitable[None]]) -> None:
        """Run ``job`` now and then every ``interval()`` seconds (read each time: a reload
        may change it) until SIGTERM."""
        while not self.stopping.is_set():
            await job()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), interval())

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
            self.metrics.gcinfos_trashed += len(result.moved)
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
                result = await Collector(self.cfg, uploader.s3).collect(residual_age=self.cfg.gc.residual_age)
            except NixcacheError as e:  # e.g. a corrupt gcinfo: nothing was deleted
                self.metrics.gc_aborted += 1
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
        self.metrics.gc_runs += 1
        self.metrics.gc_deleted_objects += result.deleted
        self.metrics.gc_deleted_bytes += freed if result.deleted else 0
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

    def _cycle(self, job: str, interval: float, **summary: Any) -> None:
        now = time.time()
        self.cycles[job] = {"last": now, "next": now + interval, "summary": summary}

    def refresh_gauges(self) -> Metrics:
        self.metrics.queue_depth = self.queue.qsize()
        self.metrics.pending_paths = len(self.backlog)
        self.metrics.in_flight = len(self.busy)
        self.metrics.requests = Counter(REQUESTS)
        return self.metrics

    def status(self) -> dict[str, Any]:
        """What `nixcache status` shows: no S3 request needed."""
        m = self.refresh_gauges()
        return {
            "version": __version__,
            "pid": os.getpid(),
            "uptime_seconds": round(time.time() - self.started, 1),
            "config_file": str(self.config_file) if self.config_file else None,
            "bucket": self.cfg.s3.bucket,
            "queue_depth": m.queue_depth,
            "in_flight": m.in_flight,
            "pending": m.pending_paths,
            "uploaded": m.uploads,
            "failing": len(self.errors),
            "failures": dict(list(self.errors.items())[-20:]),
            "outage": None
            if self.outage is None
            else {"error": self.outage, "retry_in": round(max(0.0, self.resume_at - time.monotonic()), 1)},
            "roots": len(self.live_roots),
            "dereference": self.cycles.get("dereference"),
            "collection": self.cycles.get("collection"),
            "requests": dict(sorted(m.requests.items())),
        }

    async def _control(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One command per connection on the control socket: `status` (JSON) or `metrics`."""
        try:
            command = (await asyncio.wait_for(reader.readline(), 5)).decode().strip()
            if command == "metrics":
                writer.write(self.refresh_gauges().render().encode())
            else:
                writer.write(json.dumps(self.status()).encode() + b"\n")
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeDecodeError):
            pass
        finally:
            writer.close()

    async def _metrics_http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
            body = self.refresh_gauges().render().encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\n"
                         b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))  # fmt: skip
            await writer.drain()
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    async def _metrics_textfile_loop(self, path: Path) -> None:
        async def job() -> None:
            try:
                await asyncio.to_thread(write_atomic, path, self.refresh_gauges().render().encode())
            except OSError as e:
                log.warning("metrics.textfile_failed", path=str(path), error=e.strerror)

        await self._every(lambda: 15.0, job)

    async def _start_servers(self) -> list[asyncio.Server]:
        servers = []
        control = self.cfg.fifo.parent / "control.sock"
        control.unlink(missing_ok=True)
        servers.append(await asyncio.start_unix_server(self._control, path=str(control)))
        os.chmod(control, 0o660)
        if self.cfg.metrics.listen:
            host, _, port = self.cfg.metrics.listen.rpartition(":")
            servers.append(await asyncio.start_server(self._metrics_http, host or "127.0.0.1", int(port)))
        return servers

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

    # ---- control ---------------------------------------------------------------------------

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
        for key in ("state_dir", "fifo", "store_dir"):
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
            self._background_task(old.close())
        if cfg.hostname != self.cfg.hostname:
            self.publisher = Publisher(cfg)  # another folder in the bucket: listed (and claimed) afresh
        self.cfg = cfg
        self.publisher.cfg = cfg
        self._spawn_workers()
        sdnotify.notify(f"STATUS={self.status_line()}")
        log.info("config.reloaded", workers=cfg.upload.workers, compression=cfg.upload.compression,
                 bucket=cfg.s3.bucket)  # fmt: skip

    def _background_task(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        self.bucket = await Bucket(self.cfg).open()
        loop.add_signal_handler(signal.SIGHUP, lambda: self._background_task(self.reload()))
        loop.add_signal_handler(signal.SIGTERM, self.stopping.set)
        loop.add_signal_handler(signal.SIGINT, self.stopping.set)
        for path in await asyncio.to_thread(self.journal.pending):
            self.backlog.add(path)
        self._open_fifo()
        servers = await self._start_servers()
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
        for server in servers:
            server.close()
        watcher.close()
        await self._drain(loops)
        return 0

    def status_line(self) -> str:
        return (
            f"{len(self.backlog)} paths pending, {len(self.busy)} uploading, "
            f"{len(self.live_roots)} roots, bucket {self.cfg.s3.bucket}"
        )

    async def _watchdog_loop(self, period: float) -> None:
        """WATCHDOG=1 from the event loop itself: if the loop hangs, systemd restarts us."""

        async def job() -> None:
            sdnotify.notify("WATCHDOG=1", f"STATUS={self.status_line()}")

        await self._every(lambda: period, job)

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

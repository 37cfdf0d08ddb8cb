"""Pending backlog benchmark (issue 11): 100,000 store paths pending with the endpoint down.

    python bench/pending.py [--paths 100000] [--window 120] [--hold 60] [--retry-interval 5]
    python bench/pending.py --paths 2000 --window 20 --hold 15      # a quick version (~8 min)

What a host offline for a week looks like to `nixcache serve`, measured on a real daemon:

  0. N real, valid store paths (one tiny file each, unique contents, names unique to this
     generation), made with one `nix-store --import` stream and kept alive by one GC root
     (`/nix/var/nix/gcroots/nixcache-bench/pending-N` → an index path that references them
     all). Reused on the next run while that root is valid.
  1. SeaweedFS on loopback with a fresh bucket, then stopped: the endpoint refuses
     connections from here on, until step 5.
  2. The daemon starts with an empty journal; N paths are written to its FIFO as hooks do
     (`nixcache.local.hook.send_to_fifo`, `--chunk` paths a hook run; where a hook would spool
     what does not fit, the writer waits for the FIFO instead, and counts it): time until
     the control socket says N pending (the batched journal writes).
  3. Once `nixcache status` shows the outage (timed), it is held for `--hold` seconds (many
     retry intervals): `nixcache status` latency (the CLI end to end, and the bare
     control-socket round trip), the daemon's RSS/HWM, the S3 attempts it makes meanwhile.
  4. SIGTERM (timed), and start again with N pending in the journal: time to READY
     ($NOTIFY_SOCKET; `service.ready` gives the count), then the same outage figures again.
  5. SeaweedFS started again (same ports, same data): time to the first upload, then for
     `--window` seconds: paths uploaded per second, S3 requests per path (the daemon's
     `push.done` events, and SeaweedFS's own request counters), status latency under load.

The daemon runs as a process with its own state dir, an empty `gcroots_dir`,
`profiles_dir = ""`, `gc.collect = gc.dereference = false` and `upload.retry_interval =
--retry-interval`; every other setting is the default. Writes bench/out/pending[-N].json and
prints a Markdown table. Every process it starts (SeaweedFS, the daemon) is killed on exit.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import secrets
import select
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import boto3  # type: ignore[import-untyped]

from nixcache.bucket.seaweed import ACCESS_KEY, SECRET_KEY, SeaweedFS
from nixcache.formats import nix32
from nixcache.local import hook

ROOT = Path(__file__).resolve().parent.parent
STORE = "/nix/store"
BENCH_ROOTS = Path("/nix/var/nix/gcroots/nixcache-bench")
"""One GC root per generation size (pending-N); never a directory the daemon under test scans."""
CLI = Path(sys.executable).parent / "nixcache"
"""The console script pip installs: what a user types (not a pyenv shim in front of it)."""
EXPORT_MAGIC = 0x4558494E
TIMEOUT_READY = 300.0


# ---- store paths -------------------------------------------------------------------------


def _u64(n: int) -> bytes:
    return struct.pack("<Q", n)


def _str(data: bytes) -> bytes:
    """A string of Nix's serialisation: length, bytes, zero padding to 8."""
    return _u64(len(data)) + data + b"\0" * (-len(data) % 8)


def nar_of_file(contents: bytes) -> bytes:
    """The NAR serialisation of a regular (non-executable) file."""
    head = b"".join(_str(s) for s in (b"nix-archive-1", b"(", b"type", b"regular", b"contents"))
    return head + _str(contents) + _str(b")")


def export_entry(path: str, contents: bytes, references: list[str]) -> bytes:
    """One path of a `nix-store --export` stream: NAR, trailer (path, references, no deriver,
    no signature)."""
    refs = b"".join(_str(r.encode()) for r in references)
    return (
        _u64(1) + nar_of_file(contents) + _u64(EXPORT_MAGIC) + _str(path.encode()) + _u64(len(references)) + refs
        + _str(b"") + _u64(0)
    )  # fmt: skip


def store_path(seed: str, name: str) -> str:
    digest = hashlib.sha256(f"nixcache-pending-bench:{seed}:{name}".encode()).digest()[:20]
    return f"{STORE}/{nix32.encode(digest)}-{name}"


def import_paths(n: int) -> tuple[list[str], str]:
    """Make ``n`` new store paths (and their index path) with one import stream."""
    seed = secrets.token_hex(4)
    paths = [store_path(seed, f"nixcache-pending-{seed}-{i}") for i in range(n)]
    index = store_path(seed, f"nixcache-pending-index-{seed}-{n}")
    proc = subprocess.Popen(["nix-store", "--import"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                            env=nix_env())  # fmt: skip
    assert proc.stdin is not None
    try:
        buf = bytearray()
        for i, path in enumerate(paths):
            buf += export_entry(path, f"pending path {i} of generation {seed}\n".encode(), [])
            if len(buf) > 1 << 20:
                proc.stdin.write(buf)
                buf.clear()
        # Last: it references every path above (which must be valid before it is added).
        buf += export_entry(index, "".join(p + "\n" for p in paths).encode(), paths)
        buf += _u64(0)
        proc.stdin.write(buf)
        proc.stdin.close()
    except BrokenPipeError:
        pass
    if proc.wait() != 0:
        raise SystemExit(f"nix-store --import failed ({proc.returncode})")
    return paths, index


def nix_env() -> dict[str, str]:
    """The real store, directly, as root (no nix-daemon in between)."""
    return {k: v for k, v in os.environ.items() if k != "NIX_REMOTE"}


def valid(paths: list[str]) -> bool:
    proc = subprocess.run(["nix-store", "--check-validity", "--", *paths], capture_output=True, env=nix_env())
    return proc.returncode == 0


def bench_paths(n: int) -> tuple[list[str], str, float | None]:
    """(paths, index path, seconds spent importing; None when reused from an earlier run)."""
    link = BENCH_ROOTS / f"pending-{n}"
    with contextlib.suppress(OSError):
        index = os.readlink(link)
        if valid([index]):  # a valid path's references are valid too (Nix's invariant)
            paths = Path(index).read_text().split()
            if len(paths) == n and valid(paths[:: max(1, n // 200)]):
                return paths, index, None
    started = time.monotonic()
    paths, index = import_paths(n)
    seconds = time.monotonic() - started
    BENCH_ROOTS.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(f".{link.name}.{os.getpid()}")
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(index)
    tmp.replace(link)  # the previous generation of this size is garbage from now on
    return paths, index, seconds


# ---- the daemon ----------------------------------------------------------------------------


def write_config(work: Path, weed: SeaweedFS, bucket: str, retry_interval: float) -> Path:
    key = work / "key.sec"
    if not key.exists():
        subprocess.run(["nix-store", "--generate-binary-cache-key", "pending-bench-1", str(key), f"{key}.pub"],
                       check=True, env=nix_env())  # fmt: skip
    creds = work / "credentials"
    creds.write_text(f"[default]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n")
    (work / "gcroots").mkdir(exist_ok=True)  # empty: the daemon publishes no root
    config = work / "pending.toml"
    config.write_text(
        f'hostname = "pending-bench"\nstate_dir = "{work / "state"}"\nfifo = "{work / "run" / "hook.fifo"}"\n'
        f'gcroots_dir = "{work / "gcroots"}"\nprofiles_dir = ""\n'
        f'[s3]\nbucket = "{bucket}"\nendpoint = "{weed.endpoint}"\ncredentials_file = "{creds}"\n'
        f'[signing]\nsecret_key_file = "{key}"\n'
        f"[upload]\nretry_interval = {retry_interval}\n"
        "[gc]\ncollect = false\ndereference = false\n"
    )
    return config


def parse_time(stamp: str) -> float:
    return datetime.fromisoformat(stamp).timestamp()


class Daemon:
    """``nixcache serve`` as a process: READY through $NOTIFY_SOCKET, JSON log on stderr."""

    def __init__(self, config: Path, work: Path) -> None:
        self.config = config
        self.log_path = work / "daemon.log"
        self.notify_path = work / "notify.sock"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> float:
        """Start it and wait for READY=1; returns the seconds from spawn to READY."""
        self.notify_path.unlink(missing_ok=True)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.bind(str(self.notify_path))
            notify.settimeout(1.0)
            started = time.perf_counter()
            self.process = subprocess.Popen(
                [sys.executable, "-m", "nixcache.cli", "serve", "--config", str(self.config)],
                stdout=subprocess.DEVNULL, stderr=self.log_path.open("ab"), stdin=subprocess.DEVNULL,
                env={**nix_env(), "NOTIFY_SOCKET": str(self.notify_path)},
            )  # fmt: skip
            while time.perf_counter() - started < TIMEOUT_READY:
                with contextlib.suppress(TimeoutError):
                    if b"READY=1" in notify.recv(65536).split(b"\n"):
                        return time.perf_counter() - started
                if self.process.poll() is not None:
                    raise SystemExit(f"the daemon exited ({self.process.returncode}); see {self.log_path}")
        raise SystemExit(f"the daemon was not ready in {TIMEOUT_READY:.0f}s; see {self.log_path}")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stop(self, timeout: float = 60.0) -> float:
        """SIGTERM (the daemon drains) and wait; returns the seconds it took to exit."""
        assert self.process is not None
        started = time.perf_counter()
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise SystemExit(f"the daemon did not exit {timeout:.0f}s after SIGTERM; see {self.log_path}") from None
        if code != 0:
            raise SystemExit(f"the daemon exited {code} after SIGTERM; see {self.log_path}")
        return time.perf_counter() - started

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def log_offset(self) -> int:
        return self.log_path.stat().st_size if self.log_path.exists() else 0

    def events(self, since: int = 0, *names: str) -> Iterator[dict[str, Any]]:
        with self.log_path.open("rb") as f:
            f.seek(since)
            for raw in f:
                try:
                    event = json.loads(raw)
                except ValueError:
                    continue
                if not names or event.get("event") in names:
                    yield event


def control(sock: Path, command: str = "status") -> bytes:
    """One round trip on the control socket, as `nixcache status` makes it."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(str(sock))
        s.sendall(command.encode() + b"\n")
        chunks = []
        while data := s.recv(65536):
            chunks.append(data)
    return b"".join(chunks)


def status(sock: Path) -> dict[str, Any]:
    return json.loads(control(sock))  # type: ignore[no-any-return]


def raw_ms(sock: Path) -> float:
    started = time.perf_counter()
    control(sock)
    return (time.perf_counter() - started) * 1000


def cli_ms(config: Path, *extra: str) -> float:
    """`nixcache status`, end to end: interpreter start-up, imports, config, round trip, print."""
    started = time.perf_counter()
    subprocess.run([str(CLI), "status", "--config", str(config), *extra], check=True, stdout=subprocess.DEVNULL)
    return (time.perf_counter() - started) * 1000


CLEAN_PYTHON = "/usr/bin/python3"
"""An interpreter without this environment's site-packages start-up (.pth files that import
certifi, an editable-install finder): `nixcache status` needs only the standard library."""


def clean_cli_ms(config: Path) -> float | None:
    """`nixcache status` run by a clean interpreter (the distribution's python3, the package on
    PYTHONPATH), as a packaged nixcache on NixOS would start; None without one."""
    if not os.path.exists(CLEAN_PYTHON):
        return None
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    started = time.perf_counter()
    subprocess.run([CLEAN_PYTHON, "-m", "nixcache.cli", "status", "--config", str(config)], check=True,
                   stdout=subprocess.DEVNULL, env=env)  # fmt: skip
    return (time.perf_counter() - started) * 1000


def startup_ms(*flags: str) -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, *flags, "-c", "pass"], check=True)
    return (time.perf_counter() - started) * 1000


def summary(samples: list[float]) -> dict[str, float | int]:
    return {"n": len(samples), "median": round(statistics.median(samples), 1), "max": round(max(samples), 1)}


def median_or_none(values: list[float]) -> float | None:
    return round(statistics.median(values), 2) if values else None


class Memory(threading.Thread):
    """Samples the daemon's /proc/<pid>/status (VmRSS, VmHWM) every 0.2 s."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.done = threading.Event()
        self.max_rss = 0
        self.rss = 0
        self.hwm = 0

    def read(self) -> None:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    self.rss = int(line.split()[1]) // 1024
                    self.max_rss = max(self.max_rss, self.rss)
                elif line.startswith("VmHWM:"):
                    self.hwm = int(line.split()[1]) // 1024

    def run(self) -> None:
        while not self.done.wait(0.2):
            self.read()

    def stop(self) -> dict[str, int]:
        if self.is_alive():
            self.done.set()
            self.join()
        self.read()
        return {"rss_mb_now": self.rss, "rss_mb_max_sampled": self.max_rss, "hwm_mb": self.hwm}


def client(weed: SeaweedFS) -> Any:
    return boto3.client("s3", endpoint_url=weed.endpoint, aws_access_key_id=ACCESS_KEY,
                        aws_secret_access_key=SECRET_KEY, region_name="us-east-1")  # fmt: skip


# ---- the phases ----------------------------------------------------------------------------


def intake(paths: list[str], fifo: Path, sock: Path, chunk: int) -> dict[str, Any]:
    """Hand ``paths`` to the daemon as hooks do: ``chunk`` paths a hook run, one line per
    write, without blocking. Where a hook would spool what does not fit (the FIFO full), wait
    until the FIFO takes more instead (counted): this measures the FIFO path. Then time until
    the daemon reports them all pending (journaled: one file each, one fsync a batch)."""
    started = time.perf_counter()
    full = 0
    waiter = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # only to wait on (select) when full
    try:
        for i in range(0, len(paths), chunk):
            rest = [p.encode() + b"\n" for p in paths[i : i + chunk]]
            while rest := hook.send_to_fifo(str(fifo), rest):
                full += 1
                select.select([], [waiter], [], 1.0)
    finally:
        os.close(waiter)
    written = time.perf_counter() - started
    deadline = started + 900
    while (pending := status(sock)["pending"]) < len(paths):
        if time.perf_counter() > deadline:
            raise SystemExit(f"only {pending} of {len(paths)} pending after 900 s")
        time.sleep(0.02)
    seconds = time.perf_counter() - started
    return {"chunk": chunk, "hooks": -(-len(paths) // chunk), "written_seconds": round(written, 2),
            "journaled_seconds": round(seconds, 2), "paths_per_second": round(len(paths) / seconds),
            "fifo_full": full, "pending": pending}  # fmt: skip


def wait_outage(sock: Path, timeout: float = 600.0) -> float:
    """Seconds until the daemon declares the outage (several pushes in a row failed)."""
    started = time.perf_counter()
    while status(sock)["outage"] is None:
        if time.perf_counter() - started > timeout:
            raise SystemExit(f"no outage declared after {timeout:.0f}s")
        time.sleep(0.2)
    return time.perf_counter() - started


def wait_event(daemon: Daemon, offset: int, name: str, timeout: float = 10.0) -> dict[str, Any]:
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        for event in daemon.events(offset, name):
            return event
        time.sleep(0.05)
    raise SystemExit(f"no {name} event in {daemon.log_path}")


def outage(daemon: Daemon, sock: Path, seconds: float) -> dict[str, Any]:
    """Once the daemon has declared the outage, hold it for ``seconds``: sample status (CLI
    and socket) every ~0.5 s, RSS every 0.2 s; then back-to-back status samples."""
    declared = wait_outage(sock)
    print(f"  outage declared after {declared:.1f}s; holding it {seconds:.0f}s…", file=sys.stderr)
    memory = Memory(daemon.pid)
    memory.start()
    before = status(sock)
    cli: list[float] = []
    raw: list[float] = []
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        cli.append(cli_ms(daemon.config))
        raw.append(raw_ms(sock))
        time.sleep(0.5)
    cli += [cli_ms(daemon.config) for _ in range(10)]
    raw += [raw_ms(sock) for _ in range(50)]
    json_ms = [cli_ms(daemon.config, "--json") for _ in range(5)]
    clean = [ms for _ in range(20) if (ms := clean_cli_ms(daemon.config)) is not None]
    after = status(sock)
    attempts = Counter(after["requests"]) - Counter(before["requests"])
    return {
        "declared_after_seconds": round(declared, 1), "held_seconds": seconds, "loadavg": os.getloadavg(),
        "status_cli_ms": summary(cli), "status_cli_json_ms": summary(json_ms),
        "status_clean_cli_ms": summary(clean) if clean else None,
        "status_socket_ms": summary(raw), "memory": memory.stop(), "pending": after["pending"],
        "outage": after["outage"], "failing": after["failing"],
        "attempts_per_minute": round(sum(attempts.values()) * 60 / seconds, 1), "attempts": dict(attempts),
    }  # fmt: skip


def drain(daemon: Daemon, weed: SeaweedFS, bucket: str, sock: Path, window: float, n: int) -> dict[str, Any]:
    """Bring the endpoint back and watch the backlog drain for ``window`` seconds."""
    offset = daemon.log_offset()
    restart = time.perf_counter()
    weed.start()  # returns once S3 answers
    back, restart = time.time(), time.perf_counter() - restart
    memory = Memory(daemon.pid)
    memory.start()
    cli: list[float] = []
    raw: list[float] = []
    while time.time() < back + window:  # a sample every ~5 s: each CLI run takes CPU from the drain
        cli.append(cli_ms(daemon.config))
        raw.append(raw_ms(sock))
        time.sleep(max(0.0, min(5.0, back + window - time.time())))
    counts = weed.request_counts(bucket)
    left = status(sock)
    mem = memory.stop()
    client(weed).head_bucket(Bucket=bucket)  # it survived the restart (after the counts: not counted)
    end = back + window
    done, uploaded = [], []
    other: Counter[str] = Counter()
    for e in daemon.events(offset, "push.done", "nar.uploaded", "push.failed", "path.skipped", "push.batch_failed"):
        t = parse_time(e["timestamp"])
        if t > end or (t < back and e["event"] != "push.done"):
            continue
        if e["event"] == "push.done":
            done.append((t, e))
        elif e["event"] == "nar.uploaded":
            uploaded.append(t)
        else:
            other[e["event"]] += 1
    if not done:
        raise SystemExit(f"nothing was pushed in {window:.0f}s after the endpoint came back; see {daemon.log_path}")
    paths = sum(len(e["paths"]) for _, e in done)
    requests: Counter[str] = Counter()
    for _, e in done:
        requests.update(e["requests"])
    quarters = []
    first = done[0][0]
    for q in range(4):
        lo, hi = first + (end - first) * q / 4, first + (end - first) * (q + 1) / 4
        part = [e for t, e in done if lo <= t < hi or (q == 3 and t == hi)]
        p = sum(len(e["paths"]) for e in part)
        r = sum(sum(e["requests"].values()) for e in part)
        full = [e for e in part if len(e["paths"]) > 1]  # batches (single paths: a failed batch's fallback)

        quarters.append({
            "paths": p, "requests_per_path": round(r / p, 2) if p else None, "batches": len(full),
            "single_path_jobs": len(part) - len(full),
            "batch_median_seconds": median_or_none([e["seconds"] for e in full]),
            "batch_median_lists": median_or_none([e["requests"].get("ListObjectsV2", 0) for e in full]),
            "batch_median_heads": median_or_none([e["requests"].get("HeadObject", 0) for e in full]),
        })  # fmt: skip
    return {
        "window_seconds": window, "seaweedfs_restart_seconds": round(restart, 1),
        "first_upload_seconds": round(min(uploaded) - back, 2) if uploaded else None,
        "first_push_done_seconds": round(first - back, 2),
        "paths_pushed": paths, "jobs": len(done), "nars_uploaded": len(uploaded),
        "paths_per_second_window": round(paths / window, 1),
        "paths_per_second_steady": round(sum(len(e["paths"]) for t, e in done if t > first) / (end - first), 1),
        "requests_per_path": round(sum(requests.values()) / paths, 2), "requests": dict(sorted(requests.items())),
        "seaweedfs_requests": dict(sorted(counts.items())),
        "seaweedfs_requests_per_nar": round(sum(counts.values()) / max(1, len(uploaded)), 2),
        "by_quarter": quarters,
        "push_failed": other["push.failed"], "batch_failed": other["push.batch_failed"],
        "skipped_invalid": other["path.skipped"], "pending_left": left["pending"],
        "status_cli_ms": summary(cli), "status_socket_ms": summary(raw), "memory": mem,
    }  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0] if __doc__ else None)
    ap.add_argument("--paths", type=int, default=100_000, help="pending store paths (default 100000)")
    ap.add_argument("--window", type=float, default=120.0, help="seconds of drain measured (default 120)")
    ap.add_argument("--hold", type=float, default=60.0, help="seconds of declared outage measured (default 60)")
    ap.add_argument("--retry-interval", type=float, default=5.0, help="upload.retry_interval (default 5)")
    ap.add_argument("--chunk", type=int, default=100, help="paths per simulated hook run (default 100)")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "nixcache-pending-bench")
    ap.add_argument("--keep", action="store_true", help="keep the daemon's state and SeaweedFS's data")
    args = ap.parse_args()
    n: int = args.paths
    work: Path = args.workdir / f"run-{int(time.time())}-{os.getpid()}"
    work.mkdir(parents=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so the processes are killed below
    command = " ".join(["python", "bench/pending.py", *sys.argv[1:]])
    started = time.monotonic()

    print(f"{n} store paths…", file=sys.stderr)
    paths, index, import_seconds = bench_paths(n)
    print(f"  {'reused' if import_seconds is None else f'imported in {import_seconds:.1f}s'}: {index}",
          file=sys.stderr)  # fmt: skip

    weed = SeaweedFS(work / "weed", metrics=True)
    daemon: Daemon | None = None
    imported = None if import_seconds is None else round(import_seconds, 1)
    result: dict[str, Any] = {"paths": n, "command": command, "index_path": index, "import_seconds": imported,
                              "loadavg_start": os.getloadavg()}  # fmt: skip
    try:
        weed.start()
        bucket = f"pending-{int(time.time())}"
        client(weed).create_bucket(Bucket=bucket)
        weed.stop()  # the endpoint is down from here on (connection refused), until the drain
        config = write_config(work, weed, bucket, args.retry_interval)
        sock = work / "run" / "control.sock"
        daemon = Daemon(config, work)

        print("daemon, empty journal…", file=sys.stderr)
        ready_empty = daemon.start()
        result["empty"] = {
            "ready_seconds": round(ready_empty, 2),
            "status_cli_ms": summary([cli_ms(config) for _ in range(10)]),
            "status_socket_ms": summary([raw_ms(sock) for _ in range(50)]),
            "memory": Memory(daemon.pid).stop(),
        }

        print(f"intake: {n} paths through the FIFO…", file=sys.stderr)
        result["intake"] = intake(paths, work / "run" / "hook.fifo", sock, args.chunk)
        print(f"  {result['intake']}", file=sys.stderr)
        result["outage_after_intake"] = outage(daemon, sock, args.hold)

        print("restart with the journal full…", file=sys.stderr)
        result["stop_seconds_outage"] = round(daemon.stop(), 2)
        offset = daemon.log_offset()
        ready = daemon.start()
        ready_event = wait_event(daemon, offset, "service.ready")
        result["restart"] = {
            "ready_seconds": round(ready, 2),
            "ready_event_pending": ready_event["pending"],
            "journal_entries": sum(1 for _ in os.scandir(work / "state" / "pending")),
        }
        print(f"  {result['restart']}", file=sys.stderr)
        result["outage_after_restart"] = outage(daemon, sock, args.hold)

        print(f"endpoint back: draining for {args.window:.0f}s…", file=sys.stderr)
        result["drain"] = drain(daemon, weed, bucket, sock, args.window, n)
        result["stop_seconds_draining"] = round(daemon.stop(), 2)
    finally:
        if daemon is not None:
            daemon.kill()
        weed.stop()
        if not args.keep:
            subprocess.run(["rm", "-rf", str(work / "state"), str(work / "weed")], check=False)
    result["loadavg_end"] = os.getloadavg()
    result["interpreter_startup_ms"] = {"python": summary([startup_ms() for _ in range(10)]),
                                        "python -S": summary([startup_ms("-S") for _ in range(10)])}  # fmt: skip
    result["total_seconds"] = round(time.monotonic() - started, 1)
    result["machine"] = f"{os.cpu_count()} cores"
    result["date"] = time.strftime("%Y-%m-%d")
    out = ROOT / "bench" / "out"
    out.mkdir(exist_ok=True)
    (out / ("pending.json" if n == 100_000 else f"pending-{n}.json")).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(table(result, args))


def _clean(outage: dict[str, Any]) -> str:
    c = outage.get("status_clean_cli_ms")
    return f"median {c['median']} ms, max {c['max']} ms ({c['n']} samples)" if c else "no /usr/bin/python3"


def table(r: dict[str, Any], args: argparse.Namespace) -> str:
    """The figures against the targets of issue 11, as Markdown."""
    n = r["paths"]
    o1, o2, d = r["outage_after_intake"], r["outage_after_restart"], r["drain"]
    cli_max = max(o1["status_cli_ms"]["max"], o2["status_cli_ms"]["max"])
    cli_med = max(o1["status_cli_ms"]["median"], o2["status_cli_ms"]["median"])
    rss = max(o1["memory"]["hwm_mb"], o2["memory"]["hwm_mb"])
    clean_ok = bool(o1.get("status_clean_cli_ms")) and o1["status_clean_cli_ms"]["median"] < 100

    def met(ok: bool) -> str:
        return "met" if ok else "**missed**"

    rows = [
        ("`nixcache status`, CLI end to end, outage, after intake",
         f"median {o1['status_cli_ms']['median']} ms, max {o1['status_cli_ms']['max']} ms "
         f"({o1['status_cli_ms']['n']} samples)",
         f"< 100 ms: {met(cli_med < 100)} (median), {met(cli_max < 100)} (max)"),
        ("the same, run by a clean interpreter (`/usr/bin/python3 -m nixcache.cli status`; no .pth files)",
         _clean(o1), f"< 100 ms: {met(clean_ok)} (median)"),
        ("`nixcache status`, CLI end to end, outage, after restart",
         f"median {o2['status_cli_ms']['median']} ms, max {o2['status_cli_ms']['max']} ms", ""),
        ("`nixcache status` with 0 pending (same daemon, before intake)",
         f"median {r['empty']['status_cli_ms']['median']} ms, max {r['empty']['status_cli_ms']['max']} ms", ""),
        ("control socket round trip, outage (after intake / after restart)",
         f"median {o1['status_socket_ms']['median']} / {o2['status_socket_ms']['median']} ms, "
         f"max {o1['status_socket_ms']['max']} / {o2['status_socket_ms']['max']} ms", ""),
        ("daemon RSS in the outage, after intake (now / VmHWM)",
         f"{o1['memory']['rss_mb_now']} / {o1['memory']['hwm_mb']} MB", f"< 200 MB: {met(rss < 200)}"),
        ("daemon RSS in the outage, after restart (now / VmHWM)",
         f"{o2['memory']['rss_mb_now']} / {o2['memory']['hwm_mb']} MB", ""),
        ("start-up to READY: empty journal / with the journal full",
         f"{r['empty']['ready_seconds']} s / {r['restart']['ready_seconds']} s "
         f"(service.ready pending={r['restart']['ready_event_pending']})", ""),
        (f"FIFO intake of {n} paths, {r['intake']['hooks']} hook runs of {r['intake']['chunk']}",
         f"{r['intake']['journaled_seconds']} s to all journaled ({r['intake']['paths_per_second']} paths/s; "
         f"written in {r['intake']['written_seconds']} s; FIFO full {r['intake']['fifo_full']} times)", ""),
        ("outage: S3 requests attempted per minute (after intake / after restart)",
         f"{o1['attempts_per_minute']} / {o2['attempts_per_minute']}", ""),
        ("outage declared (status shows it) after: intake / restart",
         f"{o1['declared_after_seconds']} s / {o2['declared_after_seconds']} s", ""),
        ("SIGTERM to exit: during the outage / while draining",
         f"{r['stop_seconds_outage']} s / {r['stop_seconds_draining']} s", ""),
        ("endpoint back → first NAR uploaded / first job done",
         f"{d['first_upload_seconds']} s / {d['first_push_done_seconds']} s", f"≤ retry_interval "
         f"({args.retry_interval:g} s): {met((d['first_upload_seconds'] or 1e9) <= args.retry_interval)}"),
        (f"drain over {d['window_seconds']:g} s", f"{d['paths_pushed']} paths, {d['paths_per_second_window']} paths/s "
         f"({d['paths_per_second_steady']} after the first job)", ""),
        ("S3 requests per path in the window (daemon's count / SeaweedFS's per NAR)",
         f"{d['requests_per_path']} / {d['seaweedfs_requests_per_nar']}; by quarter: "
         + ", ".join(str(q["requests_per_path"]) for q in d["by_quarter"]), ""),
        ("by quarter of the window: paths; median seconds, LISTs, HEADs of a 64-path job; single-path jobs",
         "; ".join(f"{q['paths']}: {q['batch_median_seconds']} s, {q['batch_median_lists']}, "
                   f"{q['batch_median_heads']}, {q['single_path_jobs']}" for q in d["by_quarter"]),
         ""),
        ("daemon RSS while draining (max sampled / VmHWM)",
         f"{d['memory']['rss_mb_max_sampled']} / {d['memory']['hwm_mb']} MB", ""),
        ("`nixcache status` while draining (CLI / socket)",
         f"median {d['status_cli_ms']['median']} / {d['status_socket_ms']['median']} ms, "
         f"max {d['status_cli_ms']['max']} / {d['status_socket_ms']['max']} ms", ""),
    ]  # fmt: skip
    load = ", ".join(f"{x:.1f}" for x in r["loadavg_start"])
    lines = [f"`{r['command']}` — {r['date']}, {r['machine']}, load average at start {load}, "
             f"total {r['total_seconds']} s", "",
             "| measure | result | target |", "|---|---|---|"]  # fmt: skip
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

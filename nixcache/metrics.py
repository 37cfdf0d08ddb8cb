"""Prometheus text exposition of the daemon's counters (pure rendering; the service serves it
on a loopback port and/or writes it for node_exporter's textfile collector)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class Metrics:
    uploads: int = 0
    upload_failures: int = 0
    nar_bytes: int = 0
    compressed_bytes: int = 0
    roots_published: int = 0
    gcinfos_trashed: int = 0
    gc_runs: int = 0
    gc_deleted_objects: int = 0
    gc_deleted_bytes: int = 0
    gc_aborted: int = 0
    queue_depth: int = 0
    pending_paths: int = 0
    in_flight: int = 0
    requests: Counter[str] = field(default_factory=Counter)

    def render(self) -> str:
        rows: list[tuple[str, str, str, list[tuple[str, int]]]] = [
            ("uploads_total", "counter", "Store paths uploaded (NAR and narinfo).", [("", self.uploads)]),
            ("upload_failures_total", "counter", "Pushes that failed and stay pending.", [("", self.upload_failures)]),
            ("upload_nar_bytes_total", "counter", "Uncompressed NAR bytes uploaded.", [("", self.nar_bytes)]),
            ("upload_compressed_bytes_total", "counter", "Compressed bytes uploaded.", [("", self.compressed_bytes)]),
            ("roots_published_total", "counter", "gcinfos written.", [("", self.roots_published)]),
            ("gcinfos_trashed_total", "counter", "gcinfos moved to the trash.", [("", self.gcinfos_trashed)]),
            ("gc_runs_total", "counter", "Collections run.", [("", self.gc_runs)]),
            ("gc_aborted_total", "counter", "Collections aborted (nothing deleted).", [("", self.gc_aborted)]),
            ("gc_deleted_objects_total", "counter", "Objects deleted by collections.", [("", self.gc_deleted_objects)]),
            ("gc_deleted_bytes_total", "counter", "Bytes freed by collections.", [("", self.gc_deleted_bytes)]),
            ("queue_depth", "gauge", "Paths waiting in the upload queue.", [("", self.queue_depth)]),
            ("pending_paths", "gauge", "Paths in the pending journal.", [("", self.pending_paths)]),
            ("uploads_in_flight", "gauge", "Pushes in progress.", [("", self.in_flight)]),
            ("s3_requests_total", "counter", "S3 requests by operation (retries included).",
             [(f'{{operation="{op}"}}', n) for op, n in sorted(self.requests.items())]),
        ]  # fmt: skip
        out = []
        for name, kind, help_text, samples in rows:
            out += [f"# HELP nixcache_{name} {help_text}", f"# TYPE nixcache_{name} {kind}"]
            out += [f"nixcache_{name}{labels} {value}" for labels, value in samples]
        return "\n".join(out) + "\n"

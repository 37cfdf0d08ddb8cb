"""The daemon's Prometheus metrics, with ``prometheus_client``: one registry per process.

The daemon serves them on a loopback port and/or writes them for node_exporter's textfile
collector (daemon/control.py); they are observed where the work happens: bucket/s3.py
every request and its latency, ops/upload.py each path, the daemon's jobs their cycles.
A process runs one daemon, so module-level metrics are the library's own idiom; counters
run from process start (``nixcache status`` says "since start").
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

disable_created_metrics()  # type: ignore[no-untyped-call]  # no `_created` series: the counters start with the process

REGISTRY = CollectorRegistry(auto_describe=True)


def _counter(name: str, help_text: str, labels: tuple[str, ...] = ()) -> Counter:
    return Counter(f"nixcache_{name}", help_text, labels, registry=REGISTRY)


def _gauge(name: str, help_text: str) -> Gauge:
    return Gauge(f"nixcache_{name}", help_text, registry=REGISTRY)


SIZES = tuple(float(4**n * 1024) for n in range(11))  # 1 KiB … 1 GiB, each 4 times the last
"""Histogram buckets for bytes per store path."""

UPLOADS = _counter("uploads", "Store paths uploaded (NAR and narinfo).")
UPLOAD_FAILURES = _counter("upload_failures", "Pushes that failed and stay pending.")
NAR_BYTES = _counter("upload_nar_bytes", "Uncompressed NAR bytes uploaded.")
COMPRESSED_BYTES = _counter("upload_compressed_bytes", "Compressed bytes uploaded.")
ROOTS_PUBLISHED = _counter("roots_published", "gcinfos written.")
GCINFOS_TRASHED = _counter("gcinfos_trashed", "gcinfos moved to the trash.")
GC_RUNS = _counter("gc_runs", "Collections run.")
GC_ABORTED = _counter("gc_aborted", "Collections aborted (nothing deleted).")
GC_DELETED_OBJECTS = _counter("gc_deleted_objects", "Objects deleted by collections.")
GC_DELETED_BYTES = _counter("gc_deleted_bytes", "Bytes freed by collections.")
S3_REQUESTS = _counter("s3_requests", "S3 requests by operation (retries included).", ("operation",))

QUEUE_DEPTH = _gauge("queue_depth", "Paths waiting in the upload queue.")
PENDING_PATHS = _gauge("pending_paths", "Paths in the pending journal.")
IN_FLIGHT = _gauge("uploads_in_flight", "Pushes in progress.")

UPLOAD_SECONDS = Histogram(
    "nixcache_upload_duration_seconds",
    "Time to upload one store path: NAR (read, hash, compress, PUT) and narinfo.",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
    registry=REGISTRY,
)
UPLOAD_NAR_SIZE = Histogram(
    "nixcache_upload_path_nar_bytes", "Uncompressed NAR bytes per uploaded path.", buckets=SIZES, registry=REGISTRY
)
UPLOAD_FILE_SIZE = Histogram(
    "nixcache_upload_path_compressed_bytes", "Compressed bytes per uploaded path.", buckets=SIZES, registry=REGISTRY
)
S3_SECONDS = Histogram(
    "nixcache_s3_request_duration_seconds",
    "S3 API calls by operation, retries included (what a caller waits for).",
    ("operation",),
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
    registry=REGISTRY,
)
GC_SECONDS = Histogram(
    "nixcache_gc_duration_seconds",
    "Collections, from the first LIST to the last delete (aborted ones too).",
    buckets=(0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600),
    registry=REGISTRY,
)


def pushed(paths: int, nar_bytes: int, compressed_bytes: int) -> None:
    """A worker's push of pending paths succeeded: what the hook's paths cost (the counters
    and `nixcache status`'s ``uploaded``; what publishing a root uploads is not counted)."""
    UPLOADS.inc(paths)
    NAR_BYTES.inc(nar_bytes)
    COMPRESSED_BYTES.inc(compressed_bytes)


def observe_upload(nar_bytes: int, compressed_bytes: int, seconds: float) -> None:
    """One store path uploaded, by anyone in this process (the histograms)."""
    UPLOAD_NAR_SIZE.observe(nar_bytes)
    UPLOAD_FILE_SIZE.observe(compressed_bytes)
    UPLOAD_SECONDS.observe(seconds)


def exposition() -> bytes:
    """The text format Prometheus scrapes."""
    return generate_latest(REGISTRY)


def value(sample: str) -> int:
    """One sample's current value, by its exposed name without the prefix (``uploads_total``)."""
    return int(REGISTRY.get_sample_value(f"nixcache_{sample}") or 0)


def requests() -> dict[str, int]:
    """S3 requests since start, by operation."""
    return {
        sample.labels["operation"]: int(sample.value)
        for metric in S3_REQUESTS.collect()
        for sample in metric.samples
        if sample.name.endswith("_total")
    }

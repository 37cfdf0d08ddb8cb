"""glibc's malloc, tuned once at start so the daemon's memory is what it uses.

A push moves every byte through buffers of 1 MiB and more, allocated in the upload
threads. Left alone, glibc gives each thread an arena of its own (up to 8 per core) and
raises its mmap threshold to the largest buffer freed so far, so later buffers of that size
come from the arenas and stay there when freed: measured, 20 to 30 MB of a push's peak RSS.
"""

from __future__ import annotations

import ctypes

M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
ARENAS = 2
MMAP_THRESHOLD = 1 << 20


def tune_malloc() -> bool:
    """At most ``ARENAS`` arenas, and buffers of ``MMAP_THRESHOLD`` bytes or more mapped on
    their own and given back to the system when freed (a fixed threshold, not glibc's rising
    one). False where there is no glibc ``mallopt`` (musl has one that does nothing)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_ARENA_MAX, ARENAS) == 1 and mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1)

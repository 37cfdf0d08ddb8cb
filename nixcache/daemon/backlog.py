"""Pending paths in the order the upload workers take them: the journal's index, in memory.

The journal (one file per path) is the durable copy; reading it on every status query,
watchdog ping or refill would cost a file read per pending path (a week offline: 100,000).
The backlog is loaded from it once, then kept in step: O(1) to count, O(log n) to take.

Failed paths go first once their retry time has come, then never-tried paths, oldest
first. Pure bookkeeping: no I/O, no clock (the caller passes ``now``).
"""

from __future__ import annotations

import heapq
import itertools
from collections.abc import Iterable


class Backlog:
    def __init__(self, paths: Iterable[str] = ()) -> None:
        self._fresh: dict[str, None] = dict.fromkeys(paths)
        """Never tried (or released by a worker), in arrival order."""
        self._later: list[tuple[float, int, str]] = []
        """(due, tie-breaker, path): failed paths; entries whose ``_due`` differs are stale."""
        self._due: dict[str, float] = {}
        self._taken: set[str] = set()
        """Handed to a worker, not done yet."""
        self._again: set[str] = set()
        """Taken paths received again meanwhile."""
        self._seq = itertools.count()

    def __len__(self) -> int:
        return len(self._fresh) + len(self._due) + len(self._taken)

    def __contains__(self, path: object) -> bool:
        return path in self._fresh or path in self._due or path in self._taken

    @property
    def in_flight(self) -> int:
        return len(self._taken)

    @property
    def waiting_retry(self) -> int:
        return len(self._due)

    def add(self, path: str) -> bool:
        """A path received (again): pending unless it already is. True if it is new."""
        if path in self._taken:
            self._again.add(path)  # e.g. rebuilt while a worker found it gone: judge again
            return False
        if path in self:
            return False
        self._fresh[path] = None
        return True

    def reported_again(self, path: str) -> bool:
        """Was ``path`` received again while a worker had it?"""
        return path in self._again

    def take(self, now: float) -> str | None:
        """The next path due (marked in flight), or None. Failed paths whose time has come go
        before fresh ones: a steady stream of new builds must not postpone retries forever."""
        path = None
        while self._later and self._later[0][0] <= now:
            due, _, head = heapq.heappop(self._later)
            if self._due.get(head) == due:
                del self._due[head]
                path = head
                break
        if path is None:
            if not self._fresh:
                return None
            path = next(iter(self._fresh))
            del self._fresh[path]
        self._taken.add(path)
        return path

    def next_due(self) -> float | None:
        """When the earliest failed path may be retried (None: no failed path waits)."""
        while self._later and self._due.get(self._later[0][2]) != self._later[0][0]:
            heapq.heappop(self._later)  # stale
        return self._later[0][0] if self._later else None

    def done(self, path: str) -> None:
        """Uploaded (or gone from the store): no longer pending."""
        self._taken.discard(path)
        self._again.discard(path)
        self._fresh.pop(path, None)
        self._due.pop(path, None)

    def retry(self, path: str, due: float) -> None:
        """The push failed: try again at ``due``."""
        self.done(path)
        self._due[path] = due
        heapq.heappush(self._later, (due, next(self._seq), path))
        if len(self._later) > 2 * len(self._due) + 64:  # keep stale entries bounded
            self._later = [e for e in self._later if self._due.get(e[2]) == e[0]]
            heapq.heapify(self._later)

    def release(self, path: str) -> None:
        """Not attempted after all (shutdown, a reload): pending as before, first in line."""
        if path in self._taken:
            self.retry(path, float("-inf"))

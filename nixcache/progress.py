"""Progress for long manual commands: one rewritten line on a terminal, plain lines otherwise
(throttled, so a log file gets a line every few seconds, not one per object)."""

from __future__ import annotations

import math
import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, stream: TextIO | None = None, interval: float = 2.0) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty()
        self.interval = 0.1 if self.tty else interval
        self._last = -math.inf  # the first line always shows, whatever the uptime
        self._shown = False

    def __call__(self, text: str, done: int = 0, total: int = 0) -> None:
        now = time.monotonic()
        final = total and done >= total
        if now - self._last < self.interval and not final:
            return
        self._last = now
        line = f"{text} {done}/{total}" if total else text
        if self.tty:
            width = 30
            bar = "#" * (width * done // total) + "-" * (width - width * done // total) if total else ""
            self.stream.write(f"\r\033[K{text} [{bar}] {done}/{total}" if total else f"\r\033[K{text}")
            self._shown = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self._shown:
            self.stream.write("\r\033[K")
            self.stream.flush()


def silent(text: str, done: int = 0, total: int = 0) -> None:
    """The daemon's progress: none (its logs say what happened)."""

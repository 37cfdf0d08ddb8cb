"""Progress lines: a rewritten bar on a terminal, throttled plain lines otherwise."""

from __future__ import annotations

import io

from nixcache.progress import Progress


class Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_plain_lines_are_throttled_but_the_last_one_is_always_shown() -> None:
    out = io.StringIO()
    p = Progress(out, interval=3600)
    for i in range(1, 101):
        p("deleting narinfos", i, 100)
    assert out.getvalue().splitlines() == ["deleting narinfos 1/100", "deleting narinfos 100/100"]


def test_a_terminal_gets_one_rewritten_line_with_a_bar() -> None:
    out = Tty()
    p = Progress(out)
    p("reading gcinfos", 15, 30)
    p.close()
    text = out.getvalue()
    assert text.startswith("\r\033[Kreading gcinfos [" + "#" * 15 + "-" * 15 + "] 15/30")
    assert text.endswith("\r\033[K") and "\n" not in text

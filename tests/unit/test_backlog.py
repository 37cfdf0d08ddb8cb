"""The in-memory backlog: order, retries, and that it agrees with a simple model."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from nixcache.daemon.backlog import Backlog


def test_fresh_paths_first_oldest_first_then_failed_ones_when_due() -> None:
    b = Backlog(["a", "b"])
    assert not b.add("a") and b.add("c") and len(b) == 3
    assert b.take(0) == "a" and b.in_flight == 1 and len(b) == 3
    b.retry("a", due=10)
    assert [b.take(0), b.take(0), b.take(0)] == ["b", "c", None], "a waits for its retry time"
    assert b.next_due() == 10 and b.waiting_retry == 1
    assert b.take(10) == "a"
    b.done("a")
    b.done("b")
    b.release("c")  # not attempted (an outage began): first in line again
    assert b.take(0) == "c" and len(b) == 1


def test_a_path_reported_again_while_in_flight_or_waiting_is_not_duplicated() -> None:
    b = Backlog(["a"])
    assert b.take(0) == "a" and not b.add("a")
    b.retry("a", 5)
    assert not b.add("a") and b.take(0) is None and len(b) == 1


@given(st.lists(st.tuples(st.sampled_from(["add", "take", "done", "retry"]), st.integers(0, 5), st.integers(0, 9))))
def test_agrees_with_a_model(ops: list[tuple[str, int, int]]) -> None:
    """Whatever the sequence: every pending path is counted once, nothing due is withheld,
    nothing is handed out twice or before its time."""
    b = Backlog()
    pending: dict[str, float] = {}  # path -> due (-1: fresh)
    taken: set[str] = set()
    now = 0.0
    for op, n, t in ops:
        path = f"p{n}"
        now += t
        if op == "add":
            assert b.add(path) == (path not in pending and path not in taken)
            if path not in taken:
                pending.setdefault(path, -1)
        elif op == "take":
            got = b.take(now)
            due = [p for p, d in pending.items() if d <= now]
            if got is None:
                assert due == []
            else:
                assert got in due and got not in taken
                del pending[got]
                taken.add(got)
        elif op == "done" and path in taken:
            b.done(path)
            taken.discard(path)
        elif op == "retry" and path in taken:
            b.retry(path, now + t)
            taken.discard(path)
            pending[path] = now + t
        assert len(b) == len(pending) + len(taken) and b.in_flight == len(taken)

"""Collection planning (pure): each safety rule of docs/gc.md as a case."""

from __future__ import annotations

import pytest

from nixcache.bucket import layout
from nixcache.bucket.deletions import Record
from nixcache.bucket.inventory import UNREADABLE, Edges, Obj
from nixcache.formats.gcinfo import Gcinfo, Member
from nixcache.ops.collect import restrict
from nixcache.ops.plan import UnsafeToCollect, layers, plan_collection

NOW = 1_000_000.0
DAY = 86400.0


def h(n: int) -> str:
    return f"{n:032d}"


def nh(n: int) -> str:
    return f"{n:052d}"


def nar(n: int) -> str:
    return layout.nar_key(nh(n), "zstd")


def member(n: int, nar: int | None = None, known: bool = True) -> Member:
    return Member(h(n), nh(nar if nar is not None else n) if known else None, 100)


def g(*members: Member) -> Gcinfo:
    return Gcinfo("/nix/store/x", members)


class Bucket:
    """narinfos, their edges and NARs, as the collector would list and index them."""

    def __init__(self, *ns: int, age: float = 2 * DAY, nar_of: dict[int, int] | None = None) -> None:
        nar_of = nar_of or {}
        self.narinfos: dict[str, Obj] = {}
        self.edges: dict[str, Edges] = {}
        self.nars: dict[str, Obj] = {}
        for n in ns:
            self.add(n, nar_of.get(n, n), age=age)

    def add(self, n: int, nar_n: int | None = None, refs: tuple[int, ...] = (), age: float = 2 * DAY,
            url: str | None = None) -> None:  # fmt: skip
        key = url or nar(n if nar_n is None else nar_n)
        self.narinfos[h(n)] = Obj(f"{h(n)}.narinfo", 10, NOW - age)
        self.edges[h(n)] = Edges(key, tuple(h(r) for r in refs))
        self.nars[key] = Obj(key, 1000, NOW - age)

    def plan(self, trash: dict[str, Gcinfo], live: dict[str, Gcinfo], residual: float | None = None) -> object:
        return plan_collection(trash, live, self.narinfos, self.edges, self.nars, NOW, DAY, residual)


def test_dead_is_trash_minus_live_and_order_is_narinfo_nar_trash() -> None:
    b = Bucket(1, 2, 3)
    plan = b.plan({"gctrash/b/t": g(member(1), member(2))}, {"gcroots/a/l": g(member(2), member(3))})
    assert plan.dead_paths == 1
    assert plan.objects() == [f"{h(1)}.narinfo", nar(1), "gctrash/b/t"]
    assert plan.bytes == 1010


def test_a_nar_shared_with_a_live_path_is_kept() -> None:
    b = Bucket(1, 2, nar_of={1: 9, 2: 9})
    plan = b.plan({"gctrash/b/t": g(member(1, nar=9))}, {"gcroots/a/l": g(member(2, nar=9))})
    assert plan.narinfos == [f"{h(1)}.narinfo"] and plan.nars == [] and plan.kept_shared_nar == 1


def test_a_nar_named_by_an_unrooted_narinfo_is_kept() -> None:
    """Issue sequence 1: b was pushed without a root; its narinfo names the NAR a shares."""
    b = Bucket(1, 2, nar_of={1: 9, 2: 9})
    plan = b.plan({"gctrash/alpha/a": g(member(1, nar=9))}, {})
    assert plan.narinfos == [f"{h(1)}.narinfo"] and plan.nars == [] and plan.kept_shared_nar == 1


def test_a_path_referenced_by_a_narinfo_that_stays_stays_with_its_references() -> None:
    """Issue sequence 2: `two` (never rooted) references `shared` and `shared` references `lib`."""
    b = Bucket(1, 5)  # 1: one, 5: one's own dependency
    b.add(3, refs=(4,))  # shared → lib
    b.add(4)
    b.add(2, refs=(3,))  # two → shared
    plan = b.plan({"gctrash/alpha/one": g(member(1), member(3), member(4), member(5))}, {})
    assert sorted(plan.narinfos) == [f"{h(1)}.narinfo", f"{h(5)}.narinfo"]
    assert plan.kept_referenced == 2 and nar(3) not in plan.nars and nar(4) not in plan.nars
    assert plan.trash == ["gctrash/alpha/one"], "the trash gcinfo goes: what stays is no longer its business"


def test_young_narinfo_or_nar_keeps_the_path_its_nar_and_its_trash_gcinfo() -> None:
    b = Bucket(1, 2)
    b.narinfos[h(1)] = Obj(f"{h(1)}.narinfo", 10, NOW - 60)  # pushed a minute ago
    b.nars[nar(2)] = Obj(nar(2), 1000, NOW - 60)  # NAR just rewritten by another host
    plan = b.plan({"gctrash/b/t": g(member(1), member(2))}, {})
    assert plan.objects() == [] and plan.kept_young == 2


def test_young_dead_path_protects_an_old_dead_path_sharing_its_nar() -> None:
    b = Bucket(1, 2, nar_of={1: 9, 2: 9})
    b.narinfos[h(2)] = Obj(f"{h(2)}.narinfo", 10, NOW - 60)
    plan = b.plan({"gctrash/b/t": g(member(1, nar=9)), "gctrash/b/u": g(member(2, nar=9))}, {})
    assert plan.narinfos == [f"{h(1)}.narinfo"] and plan.nars == []
    assert plan.trash == ["gctrash/b/t"]


def test_a_nar_not_named_by_narhash_goes_by_its_url() -> None:
    """`nix copy` names NARs by the compressed file's hash: the narinfo's URL says which."""
    b = Bucket()
    b.add(1, url="nar/" + "7" * 52 + ".nar.xz")
    plan = b.plan({"gctrash/b/t": g(member(1, known=False))}, {})
    assert plan.objects() == [f"{h(1)}.narinfo", "nar/" + "7" * 52 + ".nar.xz", "gctrash/b/t"]


def test_a_rerun_after_a_crash_deletes_the_nars_left_behind() -> None:
    b = Bucket(1)
    del b.narinfos[h(1)]  # narinfo already gone
    plan = b.plan({"gctrash/b/t": g(member(1))}, {})
    assert plan.objects() == [nar(1), "gctrash/b/t"]


def test_referrers_are_deleted_in_an_earlier_layer_than_what_they_reference() -> None:
    b = Bucket(3)
    b.add(2, refs=(3,))
    b.add(1, refs=(2, 3))
    plan = b.plan({"gctrash/b/t": g(member(1), member(2), member(3))}, {})
    assert plan.narinfo_layers == [[f"{h(1)}.narinfo"], [f"{h(2)}.narinfo"], [f"{h(3)}.narinfo"]]
    assert layers({"a", "b"}, {"a": Edges("u", ("b",)), "b": Edges("u", ("a",))}) == [["a", "b"]], "a cycle: together"


def test_an_unreadable_narinfo_that_stays_stops_the_collection() -> None:
    b = Bucket(1, 2)
    b.edges[h(2)] = UNREADABLE  # could reference anything
    with pytest.raises(UnsafeToCollect, match=f"{h(2)}.narinfo"):
        b.plan({"gctrash/b/t": g(member(1))}, {})
    b.edges[h(1)], b.edges[h(2)] = UNREADABLE, Edges(nar(2))  # a doomed one unreadable: fine
    assert b.plan({"gctrash/b/t": g(member(1))}, {}).narinfos == [f"{h(1)}.narinfo"]
    # Residual with nothing doomed would still sweep NARs: the unreadable one may name any.
    c = Bucket(3)
    c.add(1, url="nar/" + "7" * 52 + ".nar.xz")
    c.edges[h(1)] = UNREADABLE
    with pytest.raises(UnsafeToCollect):
        c.plan({}, {"gcroots/a/l": g(member(1, known=False), member(3))}, residual=DAY)


def test_residual_keeps_live_young_referenced_and_what_stays_names() -> None:
    """Issue sequences 4 and 5: a live path's NAR named by file hash, an old path a young
    narinfo references."""
    b = Bucket(2, 4)
    b.add(1, url="nar/" + "7" * 52 + ".nar.xz")  # live, named by nix copy
    b.add(5)  # old, referenced by 3
    b.add(3, refs=(5,), age=60)  # young, in no gcinfo
    plan = b.plan({}, {"gcroots/a/l": g(member(1, known=False))}, residual=DAY)
    assert plan.narinfos == [f"{h(2)}.narinfo", f"{h(4)}.narinfo"]
    assert plan.nars == [nar(2), nar(4)]
    assert plan.residual == {*plan.narinfos, *plan.nars}


def test_a_trash_gcinfo_caught_mid_move_is_kept_for_the_next_run() -> None:
    # Dereference copies gcroots/h/x to gctrash/h/x, then deletes gcroots/h/x. A collection
    # listing in between sees both: nothing is dead, and the trash copy must survive.
    b = Bucket(1)
    assert b.plan({"gctrash/h/x": g(member(1))}, {"gcroots/h/x": g(member(1))}).objects() == []
    after = b.plan({"gctrash/h/x": g(member(1))}, {})
    assert after.trash == ["gctrash/h/x"] and after.narinfos == [f"{h(1)}.narinfo"]
    # …but a trash copy older than any move, beside its live twin, is a root that came back.
    back = plan_collection({"gctrash/h/x": g(member(1))}, {"gcroots/h/x": g(member(1))}, b.narinfos, b.edges,
                           b.nars, NOW, DAY, None, {"gctrash/h/x": NOW - 3600})  # fmt: skip
    assert back.objects() == ["gctrash/h/x"]


def test_two_dead_paths_sharing_a_nar_delete_and_count_it_once() -> None:
    b = Bucket(1, 2, nar_of={1: 9, 2: 9})
    plan = b.plan({"gctrash/t": g(member(1, nar=9), member(2, nar=9))}, {})
    assert plan.nars == [nar(9)] and plan.bytes == 10 + 10 + 1000


def test_only_what_the_open_record_announced_is_deleted() -> None:
    """A path that turned residual only after the record was written, or a NAR no record
    named, may be what a host relied on unseen: it waits for the next collection."""
    b = Bucket(1, 2, 3)
    plan = b.plan({"gctrash/t": g(member(1))}, {}, residual=DAY)
    announced = Record("r", frozenset({h(1), h(2)}), frozenset({nh(1)}), frozenset())
    restricted = restrict(plan, announced, b.edges, {"gctrash/t": g(member(1))})
    assert restricted.narinfos == [f"{h(1)}.narinfo"], "2's NAR was not announced: it waits, with its narinfo"
    assert restricted.nars == [nar(1)] and restricted.trash == ["gctrash/t"]

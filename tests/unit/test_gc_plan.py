"""Collection planning (pure): each safety rule of docs/gc.md as a case."""

from __future__ import annotations

from nixcache import layout
from nixcache.gc import Obj, plan_collection, plan_residual
from nixcache.gcinfo import Gcinfo, Member

NOW = 1_000_000.0
DAY = 86400.0


def h(n: int) -> str:
    return f"{n:032d}"


def nh(n: int) -> str:
    return f"{n:052d}"


def member(n: int, nar: int | None = None, known: bool = True) -> Member:
    return Member(h(n), nh(nar if nar is not None else n) if known else None, 100)


def g(*members: Member) -> Gcinfo:
    return Gcinfo("/nix/store/x", members)


def objects(
    *ns: int, age: float = 2 * DAY, nar_of: dict[int, int] | None = None
) -> tuple[dict[str, Obj], dict[str, Obj]]:
    nar_of = nar_of or {}
    narinfos = {h(n): Obj(f"{h(n)}.narinfo", 10, NOW - age) for n in ns}
    nars = {}
    for n in ns:
        key = layout.nar_key(nh(nar_of.get(n, n)), "zstd")
        nars[key] = Obj(key, 1000, NOW - age)
    return narinfos, nars


def test_dead_is_trash_minus_live_and_order_is_narinfo_nar_trash() -> None:
    narinfos, nars = objects(1, 2, 3)
    plan = plan_collection(
        {"gctrash/b/t": g(member(1), member(2))}, {"gcroots/a/l": g(member(2), member(3))}, narinfos, nars, NOW, DAY
    )
    assert plan.dead_paths == 1
    assert plan.objects() == [f"{h(1)}.narinfo", layout.nar_key(nh(1), "zstd"), "gctrash/b/t"]
    assert plan.bytes == 1010


def test_a_nar_shared_with_a_live_path_is_kept() -> None:
    narinfos, nars = objects(1, 2, nar_of={1: 9, 2: 9})
    plan = plan_collection(
        {"gctrash/b/t": g(member(1, nar=9))}, {"gcroots/a/l": g(member(2, nar=9))}, narinfos, nars, NOW, DAY
    )
    assert plan.narinfos == [f"{h(1)}.narinfo"] and plan.nars == [] and plan.kept_shared_nar == 1


def test_young_narinfo_or_nar_keeps_the_path_its_nar_and_its_trash_gcinfo() -> None:
    narinfos, nars = objects(1, 2)
    narinfos[h(1)] = Obj(f"{h(1)}.narinfo", 10, NOW - 60)  # pushed a minute ago
    young_nar = layout.nar_key(nh(2), "zstd")
    nars[young_nar] = Obj(young_nar, 1000, NOW - 60)  # NAR just rewritten by another host
    plan = plan_collection({"gctrash/b/t": g(member(1), member(2))}, {}, narinfos, nars, NOW, DAY)
    assert plan.objects() == [] and plan.kept_young == 2


def test_young_dead_path_protects_an_old_dead_path_sharing_its_nar() -> None:
    narinfos, nars = objects(1, 2, nar_of={1: 9, 2: 9})
    narinfos[h(2)] = Obj(f"{h(2)}.narinfo", 10, NOW - 60)
    plan = plan_collection(
        {"gctrash/b/t": g(member(1, nar=9)), "gctrash/b/u": g(member(2, nar=9))}, {}, narinfos, nars, NOW, DAY
    )
    assert plan.narinfos == [f"{h(1)}.narinfo"] and plan.nars == []
    assert plan.trash == ["gctrash/b/t"]


def test_live_members_without_nar_hash_keep_every_nar() -> None:
    narinfos, nars = objects(1, 2)
    plan = plan_collection(
        {"gctrash/b/t": g(member(1))}, {"gcroots/a/old-format": g(member(2, known=False))}, narinfos, nars, NOW, DAY
    )
    assert plan.narinfos == [f"{h(1)}.narinfo"] and plan.nars == []


def test_dead_member_without_nar_hash_leaves_its_nar_to_residual() -> None:
    narinfos, nars = objects(1)
    plan = plan_collection({"gctrash/t": g(member(1, known=False))}, {}, narinfos, nars, NOW, DAY)
    assert plan.narinfos == [f"{h(1)}.narinfo"] and plan.nars == [] and plan.nar_hash_unknown == 1


def test_a_rerun_after_a_crash_deletes_the_nars_left_behind() -> None:
    _, nars = objects(1)
    plan = plan_collection({"gctrash/b/t": g(member(1))}, {}, {}, nars, NOW, DAY)  # narinfo already gone
    assert plan.objects() == [layout.nar_key(nh(1), "zstd"), "gctrash/b/t"]


def test_residual_keeps_live_and_young_and_what_young_narinfos_name() -> None:
    narinfos, nars = objects(1, 2, 3, 4)
    narinfos[h(3)] = Obj(f"{h(3)}.narinfo", 10, NOW - 60)  # young, in no gcinfo
    residual = plan_residual(
        {"gcroots/a/l": g(member(1))}, narinfos, nars, {h(3): layout.nar_key(nh(3), "zstd")}, NOW, DAY
    )
    assert residual.narinfos == [f"{h(2)}.narinfo", f"{h(4)}.narinfo"]
    assert residual.nars == [layout.nar_key(nh(2), "zstd"), layout.nar_key(nh(4), "zstd")]
    unsure = plan_residual({}, narinfos, nars, {h(3): None}, NOW, DAY)
    assert unsure.nars == [], "a narinfo that could not be read: no NAR is taken for residual"


def test_a_trash_gcinfo_caught_mid_move_is_kept_for_the_next_run() -> None:
    # Dereference copies gcroots/h/x to gctrash/h/x, then deletes gcroots/h/x. A collection
    # listing in between sees both: nothing is dead, and the trash copy must survive.
    narinfos, nars = objects(1)
    both = {"gctrash/h/x": g(member(1))}, {"gcroots/h/x": g(member(1))}
    plan = plan_collection(*both, narinfos, nars, NOW, DAY)
    assert plan.objects() == []
    after = plan_collection({"gctrash/h/x": g(member(1))}, {}, narinfos, nars, NOW, DAY)
    assert after.trash == ["gctrash/h/x"] and after.narinfos == [f"{h(1)}.narinfo"]


def test_two_dead_paths_sharing_a_nar_delete_and_count_it_once() -> None:
    narinfos, nars = objects(1, 2, nar_of={1: 9, 2: 9})
    plan = plan_collection({"gctrash/t": g(member(1, nar=9), member(2, nar=9))}, {}, narinfos, nars, NOW, DAY)
    assert plan.nars == [layout.nar_key(nh(9), "zstd")] and plan.bytes == 10 + 10 + 1000

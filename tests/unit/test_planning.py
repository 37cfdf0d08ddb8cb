"""Upload planning: order, upstream skip."""

from __future__ import annotations

from nixcache.local.store import PathInfo
from nixcache.ops.upload import make_narinfo, upload_order, upstream_paths


def info(name: str, refs: list[str] = [], sigs: list[str] = []) -> PathInfo:  # noqa: B006
    return PathInfo(
        path=f"/nix/store/{name}",
        nar_hash="sha256:x",
        nar_size=1,
        references=tuple(f"/nix/store/{r}" for r in refs),
        deriver=None,
        sigs=tuple(sigs),
        ca=None,
    )


def closure(*infos: PathInfo) -> dict[str, PathInfo]:
    return {i.path: i for i in infos}


def test_every_path_comes_after_its_references() -> None:
    infos = closure(
        info("app", ["lib", "tool", "app"]),  # self-reference, as real paths have
        info("tool", ["lib"]),
        info("lib", ["glibc"]),
        info("glibc"),
    )
    order = [i.path.rsplit("/", 1)[1] for i in upload_order(infos, set())]
    assert sorted(order) == ["app", "glibc", "lib", "tool"]
    for i in infos.values():
        for ref in i.references:
            if ref != i.path:
                assert order.index(ref.rsplit("/", 1)[1]) < order.index(i.path.rsplit("/", 1)[1])


def test_skipped_paths_are_left_out_but_still_ordered_around() -> None:
    infos = closure(info("app", ["lib"]), info("lib", ["glibc"]), info("glibc"))
    order = upload_order(infos, {"/nix/store/lib"})
    assert [i.path for i in order] == ["/nix/store/glibc", "/nix/store/app"]


def test_deep_chain_does_not_recurse() -> None:
    n = 5000
    infos = closure(*(info(f"p{i}", [f"p{i - 1}"] if i else []) for i in range(n)))
    order = upload_order(infos, set())
    assert [i.path for i in order] == [f"/nix/store/p{i}" for i in range(n)]


def test_upstream_is_decided_by_signature_key_name() -> None:
    infos = closure(
        info("glibc", sigs=["cache.nixos.org-1:abc"]),
        info("mine", ["glibc"], sigs=["mykey-1:def"]),
        info("unsigned", ["glibc"]),
    )
    assert upstream_paths(infos, ["cache.nixos.org-1"]) == {"/nix/store/glibc"}
    assert upstream_paths(infos, []) == set()


def test_narinfo_uses_base_names() -> None:
    i = PathInfo("/nix/store/a-x", "sha256:h", 5, ("/nix/store/b-y",), "/nix/store/d-x.drv", (), "fixed:sha256:z")
    n = make_narinfo(i, "nar/h.nar.zst", "zstd", "sha256:f", 3)
    assert n.references == ("b-y",)
    assert n.deriver == "d-x.drv"
    assert n.ca == "fixed:sha256:z"


def test_a_part_size_never_needs_more_than_s3s_10000_parts() -> None:
    from nixcache.bucket.layout import MAX_PARTS, part_size

    assert part_size(8 << 20, 600 << 20) == 8 << 20
    for nar_size in (0, 1, 80 << 30, 200 << 30, (1 << 40) + 12345):
        size = part_size(8 << 20, nar_size)
        assert size >= 8 << 20
        incompressible = nar_size + nar_size // 200 + (64 << 10)  # zstd's worst case, generously
        assert -(-incompressible // size) <= MAX_PARTS

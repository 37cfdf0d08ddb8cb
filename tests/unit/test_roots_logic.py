"""Pure parts of GC roots: selection, pinning, gcinfo format, closures, what dereference moves."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import pytest

from nixcache import gcinfo, layout
from nixcache.config import parse_config
from nixcache.publisher import Publisher, build_gcinfo, closure_of
from nixcache.roots import Root, is_kept, scan, select
from nixcache.store import PathInfo

H = "0123456789abcdfghijklmnpqrsvwxyz"  # 32 nix32 characters


def sp(name: str, digest: str = H) -> str:
    return f"/nix/store/{digest}-{name}"


def test_select_by_chain_include_and_exclude() -> None:
    roots = {
        sp("system"): Root(sp("system"), (("/gc/profiles/system-3-link",),)),
        sp("rebuilt"): Root(sp("rebuilt"), (("/gc/auto/x", "/tmp/nixos-rebuild.abc/result"),)),
        sp("both"): Root(sp("both"), (("/gc/auto/y", "/tmp/nixos-rebuild.q/result"), ("/gc/profiles/p-1-link",))),
    }
    chosen = select(roots, ["*"], ["*nixos-rebuild*"])
    assert set(chosen) == {sp("system"), sp("both")}, "a root also reached by a clean chain is kept"
    assert set(select(roots, ["/gc/profiles/*"], [])) == {sp("system"), sp("both")}
    assert select(roots, ["*"], ["*"]) == {}


def test_keep_matches_store_path_or_gcinfo_name() -> None:
    assert is_kept(sp("firefox-120"), ["*firefox*"])
    assert is_kept(sp("firefox-120"), [f"firefox-120-{H}.gcinfo.gz"])
    assert not is_kept(sp("firefox-120"), ["*chromium*"])


def test_gcinfo_names_roundtrip() -> None:
    name = layout.gcinfo_name(sp("hello-2.12"))
    assert name == f"hello-2.12-{H}.gcinfo.gz"
    assert layout.store_path_of_gcinfo(name, "/nix/store") == sp("hello-2.12")
    assert layout.store_path_of_gcinfo("junk.gcinfo.gz", "/nix/store") is None
    assert layout.store_path_of_gcinfo("hello.txt", "/nix/store") is None


def test_gcinfo_render_is_deterministic_and_parses_back() -> None:
    members = (gcinfo.Member(H, "1" * 52, 10), gcinfo.Member("1" * 32, "2" * 52, 5))
    a = gcinfo.Gcinfo(sp("x"), members).render()
    b = gcinfo.Gcinfo(sp("x"), tuple(reversed(members))).render()
    assert a == b and gcinfo.etag_of(a) == gcinfo.etag_of(b)
    parsed = gcinfo.parse(a)
    assert parsed.root == sp("x") and parsed.nar_size == 15 and set(parsed.members) == set(members)
    # The original tool's format: hash-only lines.
    assert gcinfo.parse(gzip.compress(f"{H}.narinfo\n".encode())).members == (gcinfo.Member(H),)


@pytest.mark.parametrize(
    "data",
    [
        b"not gzip",
        gzip.compress(b"x" * 10)[:-4],  # truncated
        gzip.compress(b"hello world\n"),
        gzip.compress(f"{H}.narinfo extra\n".encode()),
        gzip.compress(b"\xff\xfe\n"),
        b"\x1f\x8b\x08 not really gzip",  # a gzip header, then garbage: zlib's own error
    ],
)
def test_corrupt_gcinfo_is_an_error(data: bytes) -> None:
    with pytest.raises(gcinfo.GcinfoError):
        gcinfo.parse(data, "gcroots/h/x.gcinfo.gz")


def info(path: str, refs: tuple[str, ...] = (), sigs: tuple[str, ...] = ()) -> PathInfo:
    return PathInfo(path, "sha256:" + "1" * 52, 7, refs, None, sigs, None)


def test_closure_and_gcinfo_exclude_upstream() -> None:
    glibc, lib, app, other = sp("glibc", "1" * 32), sp("lib", "2" * 32), sp("app", "3" * 32), sp("other", "4" * 32)
    infos = {
        glibc: info(glibc, sigs=("cache.nixos.org-1:x",)),
        lib: info(lib, (glibc,)),
        app: info(app, (lib, app)),
        other: info(other),
    }
    assert closure_of(app, infos) == sorted([app, lib, glibc])
    built = build_gcinfo(app, infos, {glibc})
    assert sorted(m.hash_part for m in built.members) == ["2" * 32, "3" * 32]


def test_dereference_moves_only_gone_unpinned_gcinfos_of_this_host() -> None:
    cfg = parse_config(
        {"hostname": "h", "s3": {"bucket": "bkt"}, "signing": {"secret_key_file": "/k"}, "roots": {"keep": ["*pin*"]}}
    )
    pub = Publisher(cfg)
    live, gone, pinned = sp("live", "1" * 32), sp("gone", "2" * 32), sp("pin-me", "3" * 32)
    remote = [f"gcroots/h/{layout.gcinfo_name(p)}" for p in (live, gone, pinned)] + ["gcroots/h/odd.gcinfo.gz"]
    assert pub.gone(remote, [live]) == [f"gcroots/h/{layout.gcinfo_name(gone)}"]


def test_scan_follows_indirect_links_profiles_and_survives_loops(tmp_path: Path) -> None:
    store = tmp_path / "store"
    (store / f"{H}-pkg").mkdir(parents=True)
    gc, profiles = tmp_path / "gc", tmp_path / "profiles"
    (gc / "auto").mkdir(parents=True)
    profiles.mkdir()
    (tmp_path / "result").symlink_to(store / f"{H}-pkg" / "bin")
    (gc / "auto" / "a").symlink_to(tmp_path / "result")
    (profiles / "p-1-link").symlink_to(store / f"{H}-pkg")
    (profiles / "p").symlink_to("p-1-link")
    (gc / "profiles").symlink_to(profiles)
    (gc / "self").symlink_to(gc)
    found = scan([gc], str(store))
    root = found.roots[f"{store}/{H}-pkg"]
    assert (os.fspath(gc / "auto" / "a"), os.fspath(tmp_path / "result")) in root.chains
    assert (os.fspath(profiles / "p"), os.fspath(profiles / "p-1-link")) in root.chains
    assert found.problems == [] and found.unreadable == []
    assert {os.fspath(gc), os.fspath(gc / "auto"), os.fspath(profiles)} <= found.dirs

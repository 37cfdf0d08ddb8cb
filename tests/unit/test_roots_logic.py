"""Pure parts of GC roots: selection, pinning, gcinfo format, closures, what dereference moves."""

from __future__ import annotations

import errno
import gzip
import os
from pathlib import Path

import pytest

from nixcache.bucket import layout
from nixcache.config import parse_config
from nixcache.formats import gcinfo
from nixcache.local.roots import Memory, Root, Scan, Unresolved, resolve, scan, select
from nixcache.local.store import PathInfo, parse_roots
from nixcache.ops.publish import Publisher, build_gcinfo, closure_of, is_kept

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


def test_scan_reports_what_it_cannot_follow_as_unresolved_not_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Unprivileged, a link into a 0700 home fails with EACCES, a loop with ELOOP, a removed
    out-link with ENOENT: none of them is junk, all are left to ``resolve``."""
    store = tmp_path / "store"
    (store / f"{H}-pkg").mkdir(parents=True)
    gc, home = tmp_path / "gc", tmp_path / "home" / "alice"
    gc.mkdir()
    home.mkdir(parents=True)
    (home / "result").symlink_to(store / f"{H}-pkg")
    (gc / "alice").symlink_to(home / "result")
    (gc / "gone").symlink_to(tmp_path / "removed-result")
    (gc / "loop").symlink_to(gc / "loop")
    real_lstat = os.lstat

    def lstat(path: str | os.PathLike[str], *a: object, **kw: object) -> os.stat_result:
        if os.fspath(path).startswith(os.fspath(home)):  # as the DynamicUser sees a 0700 home
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_lstat(path)

    monkeypatch.setattr(os, "lstat", lstat)
    found = scan([gc], str(store))
    assert found.roots == {} and found.problems == [] and not found.complete
    by_link = {u.chain[0]: u for u in found.unresolved}
    assert by_link[os.fspath(gc / "alice")].errno == errno.EACCES
    assert by_link[os.fspath(gc / "alice")].target == os.fspath(home / "result")
    assert by_link[os.fspath(gc / "gone")].errno == errno.ENOENT
    assert by_link[os.fspath(gc / "loop")].errno == errno.ELOOP


def _unresolved(link: str, target: str, err: int) -> Unresolved:
    return Unresolved((link,), target, err)


def test_resolve_takes_nix_listing_then_memory_and_never_calls_unknown_gone() -> None:
    pkg, old = sp("pkg", "1" * 32), "/"  # "/" exists: a remembered store path still present
    listing = parse_roots(
        f"/home/alice/result -> {pkg}\n{{censored}} -> {sp('x', '2' * 32)}\n/proc/1/maps -> {sp('y', '3' * 32)}\n",
        "cannot read potential root '/mnt/broken/result'\n",
    )
    assert listing.links["/home/alice/result"] == pkg and listing.unreadable == {"/mnt/broken/result"}
    cases = [
        _unresolved("/gc/auto/a", "/home/alice/result", errno.EACCES),  # Nix lists it: a root
        _unresolved("/gc/auto/b", "/tmp/removed/result", errno.ENOENT),  # Nix agrees it dangles: gone
        _unresolved("/gc/auto/c", "/mnt/broken/result", errno.ENOENT),  # Nix could not read it either
        _unresolved("/gc/auto/d", "/home/bob/loop", errno.ELOOP),  # not listed; remembered
        _unresolved("/gc/auto/e", "/home/carol/x", errno.EACCES),  # not listed; never known
    ]
    result = resolve(Scan(unresolved=list(cases)), listing, {"/gc/auto/d": old, "/gc/auto/b": old})
    assert result.roots[pkg].chains == (("/gc/auto/a", "/home/alice/result"),)
    assert result.roots[old].chains == (("/gc/auto/d", "/home/bob/loop"),)
    assert len(result.held) == 1 and "/gc/auto/d" in result.held[0]
    assert [p.split(":")[0] for p in result.problems] == ["/gc/auto/b"], "only what Nix shows dangling is gone"
    assert sorted(u.split(":")[0] for u in result.unreadable) == ["/gc/auto/c", "/gc/auto/e"]
    assert not result.complete, "an unknown link with no known store path: dereference must wait"

    # Nix unavailable (nix-daemon restarting): nothing is gone, the remembered ones are held,
    # and nothing may be dereferenced (a held link may lead elsewhere now, to a root Nix would list).
    offline = resolve(Scan(unresolved=list(cases)), None, {"/gc/auto/b": old})
    assert offline.problems == [] and list(offline.roots) == [old] and len(offline.held) == 1
    assert len(offline.unreadable) == 5 and not offline.complete


def test_memory_persists_the_last_target_of_each_entry_and_forgets_removed_ones(tmp_path: Path) -> None:
    pkg = sp("pkg", "1" * 32)
    memory = Memory(tmp_path)
    memory.update(Scan(roots={pkg: Root(pkg, (("/gc/auto/a", "/home/a/result"), ("/gc/p",)))}))
    assert Memory(tmp_path).known == {"/gc/auto/a": pkg, "/gc/p": pkg}
    memory.update(Scan(roots={pkg: Root(pkg, (("/gc/p",),))}))
    assert Memory(tmp_path).known == {"/gc/p": pkg}
    (tmp_path / "roots-known.json").write_text("[garbage")
    assert Memory(tmp_path).known == {}, "a corrupt file is forgotten, not fatal"
    read_only = Memory(tmp_path, write=False)
    read_only.update(Scan(roots={pkg: Root(pkg, (("/gc/q",),))}))
    assert (tmp_path / "roots-known.json").read_text() == "[garbage"


def test_a_regular_file_named_after_a_store_path_is_a_root_as_for_nix(tmp_path: Path) -> None:
    store = tmp_path / "store"
    (store / f"{H}-pkg").mkdir(parents=True)
    gc = tmp_path / "gc"
    gc.mkdir()
    (gc / f"{H}-pkg").write_text("")  # Nix's collector keeps /store/<name> alive for this file
    (gc / "notes.txt").write_text("junk")
    found = scan([gc], str(store))
    assert list(found.roots) == [f"{store}/{H}-pkg"] and found.complete
    assert found.problems == [f"{gc / 'notes.txt'}: not a symlink"]

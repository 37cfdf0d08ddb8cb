"""GC roots: watch, publish gcinfos, dereference, trash — real Nix, real SeaweedFS."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

from nixcache.bucket.layout import gcinfo_name
from nixcache.formats import gcinfo
from tests.harness import (
    Bucket,
    Daemon,
    base_settings,
    hash_part,
    nix_build,
    run_cli,
    wait_until,
    write_config,
)

HOST = "gcroots/testhost/"
TRASH = "gctrash/testhost/"


def config_for(tmp: Path, bucket: Bucket, key: tuple[Path, str], **sections: dict[str, Any]) -> Path:
    settings = base_settings(tmp, bucket, key[0])
    for section, values in sections.items():
        if isinstance(values, dict):
            settings.setdefault(section, {}).update(values)
        else:
            settings[section] = values
    return write_config(tmp / "config.toml", settings)


def add_indirect_root(gcroots: Path, link: Path) -> None:
    """What Nix does for `nix-build -o LINK`: an `auto/` entry pointing at the out-link."""
    (gcroots / "auto").mkdir(parents=True, exist_ok=True)
    (gcroots / "auto" / uuid.uuid4().hex[:12]).symlink_to(link)


def read_gcinfo(bucket: Bucket, key: str) -> gcinfo.Gcinfo:
    data = bucket.get(key)
    assert data is not None, key
    return gcinfo.parse(data, key)


def test_nix_build_out_link_is_published_with_exactly_its_closure(
    tmp_path: Path, bucket: Bucket, signing_key: tuple[Path, str]
) -> None:
    # The real gcroots dir: nix-build registers its out-link there (auto/…) itself. Only this
    # test's links are published: `include` selects them by the out-link's path.
    config = config_for(
        tmp_path, bucket, signing_key,
        gcroots_dir="/nix/var/nix/gcroots", roots={"include": [f"{tmp_path}/*"], "debounce": 0.2},
    )  # fmt: skip
    daemon = Daemon(config, tmp_path / "daemon.log").start()
    closure = nix_build(tmp_path, out="result")
    top = os.path.realpath(tmp_path / "result")
    key = HOST + gcinfo_name(top)
    wait_until(lambda: bucket.get(key), 20, "gcinfo of the new root")
    info = read_gcinfo(bucket, key)
    assert info.root == top
    assert sorted(m.hash_part for m in info.members) == sorted(hash_part(p) for p in closure)
    for m in info.members:
        assert bucket.get(m.hash_part + ".narinfo") is not None
    head = bucket.client.head_object(Bucket=bucket.name, Key=key)
    assert int(head["Metadata"]["closuresize"]) == info.nar_size > 0
    assert head["Metadata"]["paths"] == "3"
    assert [k for k in bucket.gcinfos(HOST)] == [key], "only this test's root is published"
    assert daemon.stop() == 0


def test_profile_generations_dereference_dry_run_trash_and_untrash(
    tmp_path: Path, bucket: Bucket, signing_key: tuple[Path, str]
) -> None:
    gcroots, profiles = tmp_path / "gcroots", tmp_path / "profiles"
    profiles.mkdir()
    config = config_for(tmp_path, bucket, signing_key)
    (gcroots / "profiles").symlink_to(profiles)  # as on NixOS: gcroots/profiles → profiles dir
    generations = []
    for n in range(3):
        top = nix_build(tmp_path, out=f"gen{n}")[-1]
        subprocess.run(["nix-env", "-p", str(profiles / "p"), "--set", top], check=True, capture_output=True)
        generations.append(top)
        (tmp_path / f"gen{n}").unlink()
    closure = nix_build(tmp_path, out="result")
    add_indirect_root(gcroots, tmp_path / "result")
    result_root = closure[-1]

    daemon = Daemon(config, tmp_path / "daemon.log").start()
    keys = {HOST + gcinfo_name(p) for p in [*generations, result_root]}
    wait_until(lambda: set(bucket.gcinfos(HOST)) == keys, 20, "a gcinfo per generation and the out-link")

    subprocess.run(["nix-env", "-p", str(profiles / "p"), "--delete-generations", "1", "2"], check=True)
    (tmp_path / "result").unlink()
    gone = {HOST + gcinfo_name(p) for p in [generations[0], generations[1], result_root]}

    dry = run_cli(config, "dereference", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert {ln.split()[2] for ln in dry.stdout.splitlines() if ln.startswith("would move")} == gone
    assert set(bucket.gcinfos(HOST)) == keys, "--dry-run moved something"

    status = run_cli(config, "roots")
    assert status.returncode == 0, status.stderr
    assert sum(ln.startswith("gone") for ln in status.stdout.splitlines()) == 3
    assert sum(ln.startswith("published") for ln in status.stdout.splitlines()) == 1

    done = run_cli(config, "dereference")
    assert done.returncode == 0, done.stderr
    assert set(bucket.gcinfos(HOST)) == keys - gone
    assert set(bucket.keys(TRASH)) == {TRASH + k[len(HOST) :] for k in gone}
    again = run_cli(config, "dereference")
    assert "0 gcinfo(s) moved" in again.stdout and "'ListObjectsV2': 1}" in again.stdout, again.stdout

    # By hand: untrash one, trash the live one (by its store path).
    name = gcinfo_name(result_root)
    assert run_cli(config, "untrash", name).returncode == 0
    assert HOST + name in bucket.gcinfos(HOST)
    assert run_cli(config, "trash", generations[2]).returncode == 0
    assert TRASH + gcinfo_name(generations[2]) in bucket.keys(TRASH)
    assert daemon.stop() == 0


def test_two_hosts_share_a_bucket_and_only_touch_their_own_folder(
    tmp_path: Path, bucket: Bucket, signing_key: tuple[Path, str]
) -> None:
    daemons, tops = {}, {}
    for host in ("alpha", "beta"):
        tmp = tmp_path / host
        tmp.mkdir()
        settings = base_settings(tmp, bucket, signing_key[0])
        settings["hostname"] = host
        settings["gc"] = {"dereference_interval": 1}
        config = write_config(tmp / "config.toml", settings)
        tops[host] = nix_build(tmp)[-1]
        (tmp / "gcroots" / "result").symlink_to(tops[host])
        daemons[host] = Daemon(config, tmp / "daemon.log").start()
    for host in daemons:
        wait_until(lambda h=host: bucket.gcinfos(f"gcroots/{h}/"), 20, f"{host} published")
    (tmp_path / "alpha" / "gcroots" / "result").unlink()
    wait_until(lambda: bucket.keys("gctrash/alpha/"), 20, "alpha trashed its gone root")
    time.sleep(2)  # several more dereference cycles of both
    assert bucket.gcinfos("gcroots/alpha/") == []
    assert bucket.gcinfos("gcroots/beta/") == [f"gcroots/beta/{gcinfo_name(tops['beta'])}"]
    assert bucket.keys("gctrash/beta/") == []
    for d in daemons.values():
        assert d.stop() == 0


def test_a_burst_of_100_roots_costs_a_bounded_number_of_requests(
    tmp_path: Path, bucket: Bucket, signing_key: tuple[Path, str]
) -> None:
    files = []
    for i in range(100):
        f = tmp_path / f"root-{uuid.uuid4().hex[:8]}-{i}"
        f.write_text(f"root {i} {uuid.uuid4()}\n")
        files.append(str(f))
    paths = subprocess.run(["nix-store", "--add", *files], check=True, capture_output=True, text=True).stdout.split()
    config = config_for(tmp_path, bucket, signing_key, roots={"debounce": 1.0})
    daemon = Daemon(config, tmp_path / "daemon.log").start()
    daemon.wait_event("roots.published", 10)  # the initial (empty) cycle
    for i, p in enumerate(paths):
        (tmp_path / "gcroots" / f"r{i}").symlink_to(p)
    wait_until(lambda: len(bucket.gcinfos(HOST)) == 100, 30, "all 100 gcinfos")
    wait_until(lambda: sum(e["published"] for e in daemon.events("roots.published")) == 100, 30, "the cycles' logs")
    cycles = [e for e in daemon.events("roots.published") if e["published"]]
    requests = sum(sum(e["requests"].values()) for e in cycles)
    # Per new root: its NAR, its narinfo, its gcinfo (3 PUTs). Constant on top: one presence
    # check for all (a LIST), nix-cache-info, the deletion records checked before and after the
    # gcinfos (2 LISTs). The burst is debounced into at most 2 cycles.
    assert len(cycles) <= 2, cycles
    assert requests <= 3 * 100 + 2 * 5, [e["requests"] for e in cycles]
    assert daemon.stop() == 0


def test_junk_in_the_roots_dir_is_logged_and_skipped(
    tmp_path: Path, bucket: Bucket, signing_key: tuple[Path, str]
) -> None:
    gcroots = tmp_path / "gcroots"
    config = config_for(tmp_path, bucket, signing_key)
    (gcroots / "dangling").symlink_to(tmp_path / "nothing-here")
    (gcroots / "outside").symlink_to("/etc/hostname")
    (gcroots / "loop-a").symlink_to(gcroots / "loop-b")
    (gcroots / "loop-b").symlink_to(gcroots / "loop-a")
    (gcroots / "plain-file").write_text("not a link\n")
    (gcroots / "gone-from-store").symlink_to("/nix/store/" + "0" * 32 + "-never-existed")
    (gcroots / "dir-loop").mkdir()
    (gcroots / "dir-loop" / "up").symlink_to(gcroots)
    top = nix_build(tmp_path)[-1]
    (gcroots / "good").symlink_to(top)
    daemon = Daemon(config, tmp_path / "daemon.log").start()
    wait_until(lambda: bucket.gcinfos(HOST), 20, "the good root published")
    assert bucket.gcinfos(HOST) == [HOST + gcinfo_name(top)]
    (gcroots / "good-again").symlink_to(top)  # an event: one more scan, which must not log again
    daemon.wait_event("roots.published", 20, count=2)
    problems = " | ".join(e["problem"] for e in daemon.events("roots.skipped"))
    for expected in ("dangling", "outside the store", "not a symlink", "not in the store"):
        assert expected in problems, problems
    # dangling, outside, plain-file, gone-from-store: each logged once, not per rescan
    assert len(daemon.events("roots.skipped")) == 4, problems
    # A loop is not junk but unknown (it may hide a root; Nix does not list it): logged once
    # each, and nothing is dereferenced while it is there.
    unknown = [e["problem"] for e in daemon.events("roots.unknown")]
    assert len(unknown) == 2 and all("Too many levels of symbolic links" in u for u in unknown), unknown
    assert daemon.alive()
    assert daemon.stop() == 0


def test_disabled_dereference_keep_and_exclude(tmp_path: Path, bucket: Bucket, signing_key: tuple[Path, str]) -> None:
    gcroots = tmp_path / "gcroots"
    config = config_for(
        tmp_path, bucket, signing_key,
        roots={"debounce": 0.2, "keep": ["*-pinned-*"], "exclude": ["*nixos-rebuild*", "*/skip-me"]},
        gc={"dereference": False, "dereference_interval": 1},
    )  # fmt: skip
    kept = subprocess.run(["nix-store", "--add", _file(tmp_path, "x-pinned-1")], check=True,
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    plain = subprocess.run(["nix-store", "--add", _file(tmp_path, "plain-1")], check=True,
                           capture_output=True, text=True).stdout.strip()  # fmt: skip
    excluded = subprocess.run(["nix-store", "--add", _file(tmp_path, "excluded-1")], check=True,
                              capture_output=True, text=True).stdout.strip()  # fmt: skip
    (gcroots / "kept").symlink_to(kept)
    (gcroots / "plain").symlink_to(plain)
    (gcroots / "skip-me").symlink_to(excluded)
    daemon = Daemon(config, tmp_path / "daemon.log").start()
    expected = {HOST + gcinfo_name(kept), HOST + gcinfo_name(plain)}
    wait_until(lambda: set(bucket.gcinfos(HOST)) == expected, 20, "kept and plain published, excluded not")
    (gcroots / "kept").unlink()
    (gcroots / "plain").unlink()
    time.sleep(3)  # dereference is disabled: nothing moves however long we wait
    assert set(bucket.gcinfos(HOST)) == expected and bucket.keys(TRASH) == []
    moved = run_cli(config, "dereference")
    assert moved.returncode == 0, moved.stderr
    assert set(bucket.gcinfos(HOST)) == {HOST + gcinfo_name(kept)}, "keep pins the root; plain is trashed"
    assert bucket.get(hash_part(excluded) + ".narinfo") is None, "an excluded root is never pushed"
    assert daemon.stop() == 0


def _file(tmp: Path, name: str) -> str:
    f = tmp / name
    f.write_text(f"{name} {uuid.uuid4()}\n")
    return str(f)


def test_restart_republishes_nothing_unchanged(tmp_path: Path, bucket: Bucket, signing_key: tuple[Path, str]) -> None:
    config = config_for(tmp_path, bucket, signing_key)
    for n in range(3):
        (tmp_path / "gcroots" / f"r{n}").symlink_to(nix_build(tmp_path, out=f"o{n}")[-1])
    daemon = Daemon(config, tmp_path / "daemon.log").start()
    wait_until(lambda: len(bucket.gcinfos(HOST)) == 3, 20, "3 gcinfos")
    assert daemon.stop() == 0
    daemon.start()
    first = daemon.wait_event("roots.published", 20)[0]
    assert first["unchanged"] == 3 and first["published"] == 0
    assert first["requests"] == {"ListObjectsV2": 1}, first["requests"]
    assert daemon.stop() == 0

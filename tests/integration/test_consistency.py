"""Regression tests for sequences that leave the bucket broken (the consistency issue, sequences
1-8): real Nix, real SeaweedFS, the CLI and the daemon as users run them, ``grace_period = 0``.

Each test ends by checking the bucket as a client sees it (:func:`bucket_problems`):
``nixcache verify`` exits 0, no narinfo names a missing NAR, every narinfo's References are in
the bucket, and a real Nix client substitutes the paths still needed, signatures required.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nixcache.bucket.layout import GC_LEASE, gcinfo_name
from tests.harness import (
    NIX,
    Bucket,
    Daemon,
    build_pair,
    closure_of,
    dangling_narinfos,
    hash_part,
    nix_copy_from,
    run_cli,
    wait_until,
    write_config,
)
from tests.integration.test_gc import Host, beta_drops_two, narinfos, slow_link
from tests.stripproxy import StripProxy

Key = tuple[Path, str]


# ---- checks --------------------------------------------------------------------------------------


def narinfo_fields(text: bytes) -> dict[str, str]:
    fields = {}
    for line in text.decode().splitlines():
        name, sep, value = line.partition(":")
        if sep:
            fields[name] = value.strip()
    return fields


def missing_references(bucket: Bucket) -> list[str]:
    """``<narinfo>: <reference>`` for every reference that has no narinfo in the bucket."""
    keys = set(bucket.keys())
    out = []
    for key in sorted(k for k in keys if k.endswith(".narinfo") and "/" not in k):
        text = bucket.get(key)
        if text is None:
            continue
        for ref in narinfo_fields(text).get("References", "").split():
            if f"{hash_part(ref)}.narinfo" not in keys:
                out.append(f"{key}: {ref}")
    return out


def bucket_problems(bucket: Bucket, host: Host, public_key: str, needed: list[str], tmp: Path) -> list[str]:
    """Everything wrong with the bucket, from the four points of view (empty: whole)."""
    problems = []
    verify = run_cli(host.config, "verify")
    if verify.returncode != 0:
        problems.append(f"nixcache verify exited {verify.returncode}: {verify.stdout.strip()} {verify.stderr.strip()}")
    problems += [f"dangling narinfo (NAR missing): {k}" for k in dangling_narinfos(bucket)]
    problems += [f"reference missing: {r}" for r in missing_references(bucket)]
    if needed:
        copied = nix_copy_from(bucket, needed, tmp / f"client-{uuid.uuid4().hex[:8]}", public_key)
        if copied.returncode != 0:
            problems.append(f"nix copy --from the bucket of {needed} failed: {copied.stderr.strip()[-1500:]}")
    return problems


def assert_whole(bucket: Bucket, host: Host, public_key: str, needed: list[str], tmp: Path) -> None:
    problems = bucket_problems(bucket, host, public_key, needed, tmp)
    assert problems == [], "the bucket is broken:\n" + "\n".join(problems)


# ---- fixtures for the sequences ----------------------------------------------------------------------


def add_text(tmp: Path, name: str, content: str | None = None) -> str:
    """A store path (nix-store --add) holding ``content`` (unique by default)."""
    file = tmp / name
    file.write_text(content if content is not None else f"{name} {uuid.uuid4()}\n")
    return subprocess.run(["nix-store", "--add", str(file)], check=True, capture_output=True, text=True).stdout.strip()


def nix_copy_into(bucket: Bucket, path: str, tmp: Path, secret_key: Path) -> str:
    """Write the closure of ``path`` into the bucket as a real Nix client does; return the key of
    ``path``'s NAR, which Nix names by the hash of the compressed file (xz), not by the NAR hash.

    ``nix copy --to http://…`` needs anonymous write, which the SeaweedFS fixture does not allow
    (only Read and List), and this Nix (Debian 2.8) has no S3 store. So Nix writes a file://
    binary cache (the same BinaryCacheStore code and bytes) and its objects are PUT unchanged."""
    dest = tmp / f"nix-copy-{uuid.uuid4().hex[:8]}"
    copied = subprocess.run([*NIX, "copy", "--to", f"file://{dest}?secret-key={secret_key}", path],
                            capture_output=True, text=True)  # fmt: skip
    assert copied.returncode == 0, copied.stderr
    files = sorted(f for f in dest.rglob("*") if f.is_file() and f.name != "nix-cache-info")
    # NARs first, then narinfos: never a narinfo without its NAR, as Nix itself uploads.
    for f in sorted(files, key=lambda f: f.suffix == ".narinfo"):
        key = f.relative_to(dest).as_posix()
        kind = "text/x-nix-narinfo" if key.endswith(".narinfo") else "application/x-nix-nar"
        bucket.client.put_object(Bucket=bucket.name, Key=key, Body=f.read_bytes(), ContentType=kind)
    url = narinfo_fields((dest / f"{hash_part(path)}.narinfo").read_bytes())["URL"]
    assert url.startswith("nar/") and url.endswith(".nar.xz"), url
    return url


def same_content_pair(tmp: Path) -> tuple[str, str]:
    """Two store paths with identical contents and different names: one NAR for both."""
    content = f"same bytes {uuid.uuid4()}\n"
    return add_text(tmp, "copy-a", content), add_text(tmp, "copy-b", content)


def send_to_daemon(host: Host, *paths: str) -> None:
    """What the post-build hook does: one path a line into the daemon's FIFO."""
    with open(host.dir / "run" / "hook.fifo", "w") as fifo:
        fifo.write("".join(p + "\n" for p in paths))


def wait_for(
    daemon: Daemon, name: str, before: int, timeout: float, match: Callable[[dict[str, Any]], bool] = bool
) -> dict[str, Any]:
    """The first event ``name`` matching ``match`` after the ``before`` matching ones already seen."""

    def found() -> dict[str, Any] | None:
        assert daemon.process is not None
        if daemon.process.poll() is not None:
            raise AssertionError(f"daemon exited: {daemon.log_path.read_text()[-3000:]}")
        events = [e for e in daemon.events(name) if match(e)]
        return events[before] if len(events) > before else None

    return wait_until(found, timeout, f"event {name} #{before + 1}")  # type: ignore[no-any-return]


def published(event: dict[str, Any]) -> bool:
    """A `roots.published` round that wrote at least one gcinfo."""
    return int(event["published"]) > 0


def count(daemon: Daemon, name: str, match: Callable[[dict[str, Any]], bool] = bool) -> int:
    return len([e for e in daemon.events(name) if match(e)])


def same_hostname(tmp: Path, bucket: Bucket, key: Path, dirname: str, machine_id: str) -> Host:
    """A host called "nixos" with its own state, gcroots and machine id file."""
    host = Host(tmp, bucket, key, dirname)
    id_file = host.dir / "machine-id"
    id_file.write_text(machine_id + "\n")
    host.settings["hostname"] = "nixos"
    host.settings["machine_id_file"] = str(id_file)
    host.config = write_config(host.config, host.settings)
    return host


# ---- 1. a NAR shared with a path nobody rooted ------------------------------------------------------


def test_shared_nar_of_an_unrooted_path_survives_the_collection_of_its_twin(
    tmp_path: Path, bucket: Bucket, signing_key: Key
) -> None:
    """Sequence 1: a and b have identical contents (one NAR). alpha roots and publishes a; beta
    only pushes b. alpha drops a and collects: the shared NAR must not go while b's narinfo
    names it. Then beta roots b and publishes: the bucket is whole and b substitutes."""
    a, b = same_content_pair(tmp_path)
    alpha, beta = Host(tmp_path, bucket, signing_key[0], "alpha"), Host(tmp_path, bucket, signing_key[0], "beta")
    alpha.root("a", a)
    alpha.run("publish")
    beta.run("push", b)
    assert len(bucket.keys("nar/")) == 1 and bucket.has_narinfo(a) and bucket.has_narinfo(b)
    alpha.unroot("a")
    alpha.run("dereference")
    alpha.run("gc")
    after_gc = [f"after alpha's gc, dangling narinfo: {k}" for k in dangling_narinfos(bucket)]
    beta.root("b", b)
    beta.run("publish")
    problems = bucket_problems(bucket, beta, signing_key[1], [b], tmp_path) + after_gc
    assert problems == [], "the bucket is broken:\n" + "\n".join(problems)


# ---- 2. a path nobody rooted that references a collected one -----------------------------------------


def test_an_unrooted_referrer_keeps_its_references(tmp_path: Path, bucket: Bucket, signing_key: Key) -> None:
    """Sequence 2: alpha roots `one` and pushes `two` (never rooted); both reference `shared`.
    alpha drops `one` and collects: `two`'s narinfo must not be left referencing a deleted path,
    and a client must substitute `two`."""
    one, two, _shared = build_pair(tmp_path)
    alpha = Host(tmp_path, bucket, signing_key[0], "alpha")
    alpha.root("one", one)
    alpha.run("publish")
    alpha.run("push", two)
    assert all(bucket.has_narinfo(p) for p in closure_of(two))
    alpha.unroot("one")
    alpha.run("dereference")
    alpha.run("gc")
    assert not bucket.has_narinfo(one), "setup: the collection ran"
    assert_whole(bucket, alpha, signing_key[1], [two], tmp_path)


# ---- 3. the daemon's presence cache after a collection --------------------------------------------


def test_the_daemon_republishes_a_root_its_own_collection_removed(
    tmp_path: Path, bucket: Bucket, signing_key: Key
) -> None:
    """Sequence 3 (one host): the daemon publishes a root; its link is removed; the daemon
    dereferences and collects it; the link comes back (same target). The re-publish must push
    the closure again — its in-memory presence cache still says "present"."""
    one, _two, _shared = build_pair(tmp_path)
    alpha = Host(tmp_path, bucket, signing_key[0], "alpha", collect_interval=1, dereference_interval=1)
    alpha.root("one", one)
    daemon = Daemon(alpha.config, tmp_path / "daemon.log").start()
    wait_for(daemon, "roots.published", 0, 20, published)
    assert all(bucket.has_narinfo(p) for p in closure_of(one))

    alpha.unroot("one")
    wait_for(daemon, "gc.done", 0, 30, lambda e: e["deleted"] > 0)
    assert not any(bucket.has_narinfo(p) for p in closure_of(one)), "setup: the daemon collected the closure"

    alpha.root("one", one)
    wait_for(daemon, "roots.published", 1, 30, published)
    wait_until(lambda: bucket.keys(f"gcroots/alpha/{gcinfo_name(one)}"), 10, "the gcinfo published again")
    assert_whole(bucket, alpha, signing_key[1], [one], tmp_path)
    assert daemon.stop() == 0


def test_the_daemon_pushes_after_another_host_collected_what_it_believed_present(
    tmp_path: Path, bucket: Bucket, signing_key: Key
) -> None:
    """Sequence 3 (two hosts): alpha's daemon pushes `one` (all already present: it now believes
    the closure present). beta, whose root `one` was, drops it and collects it away. Then alpha's
    daemon pushes `two` (which references `shared`) and roots `one`: once it reports the push and
    the publish done, the bucket must be whole."""
    one, two, _shared = build_pair(tmp_path)
    beta = Host(tmp_path, bucket, signing_key[0], "beta")
    beta.root("one", one)
    beta.run("publish")
    alpha = Host(tmp_path, bucket, signing_key[0], "alpha", collect=False)
    daemon = Daemon(alpha.config, tmp_path / "daemon.log").start()
    send_to_daemon(alpha, one)
    done = wait_for(daemon, "push.done", 0, 20, lambda e: one in e["paths"])
    assert done["already_present"] == len(closure_of(one)), done

    beta.unroot("one")
    beta.run("dereference")
    beta.run("gc")
    assert not any(bucket.has_narinfo(p) for p in closure_of(one)), "setup: beta collected the closure"

    before = count(daemon, "roots.published", published)
    send_to_daemon(alpha, two)
    alpha.root("one", one)
    wait_for(daemon, "push.done", 0, 20, lambda e: two in e["paths"])
    wait_for(daemon, "roots.published", before, 20, published)
    assert_whole(bucket, alpha, signing_key[1], [one, two], tmp_path)
    assert daemon.stop() == 0


# ---- 4. residual and NARs named by their file hash ---------------------------------------------------


def test_residual_keeps_the_nar_of_a_live_path_written_by_nix_copy(
    tmp_path: Path, bucket: Bucket, signing_key: Key
) -> None:
    """Sequence 4, first case: `nix copy` wrote a path (NAR named nar/<fileHash>.nar.xz); alpha
    roots it and publishes (the path is present: not pushed again). `residual --older-than 0s`
    must not delete that live path's NAR."""
    alpha = Host(tmp_path, bucket, signing_key[0], "alpha")
    copied = add_text(tmp_path, "copied")
    nar = nix_copy_into(bucket, copied, tmp_path, signing_key[0])
    alpha.root("copied", copied)
    assert "published 1," in alpha.run("publish").stdout
    stray = add_text(tmp_path, "stray")
    alpha.run("push", stray)
    alpha.run("residual", "--older-than", "0s")
    assert not bucket.has_narinfo(stray), "setup: residual ran and deleted what no gcinfo lists"
    problems = bucket_problems(bucket, alpha, signing_key[1], [copied], tmp_path)
    if bucket.get(nar) is None:
        problems.append(f"the live path's NAR {nar} was deleted")
    assert problems == [], "the bucket is broken:\n" + "\n".join(problems)


def test_residual_keeps_a_nix_copied_path_a_young_narinfo_references(
    tmp_path: Path, bucket: Bucket, signing_key: Key
) -> None:
    """Sequence 4, second case: `shared`, written by `nix copy` (NAR named by its file hash),
    is in no gcinfo but referenced by `two`, pushed later and younger than --older-than. residual
    must keep `shared`'s narinfo and its NAR."""
    _one, two, shared = build_pair(tmp_path)
    alpha = Host(tmp_path, bucket, signing_key[0], "alpha")
    nar = nix_copy_into(bucket, shared, tmp_path, signing_key[0])
    stray = add_text(tmp_path, "stray")
    alpha.run("push", stray)
    time.sleep(4)  # shared and stray are older than 3s when residual runs; two is younger
    alpha.run("push", two)
    alpha.run("residual", "--older-than", "3s")
    assert not bucket.has_narinfo(stray), "setup: residual ran and deleted the old stray path"
    assert bucket.has_narinfo(two), "setup: two is younger than 3s"
    problems = bucket_problems(bucket, alpha, signing_key[1], [two], tmp_path)
    if not bucket.has_narinfo(shared):
        problems.append(f"{hash_part(shared)}.narinfo deleted while {hash_part(two)}.narinfo references it")
    if bucket.get(nar) is None:
        problems.append(f"shared's NAR {nar} was deleted")
    assert problems == [], "the bucket is broken:\n" + "\n".join(problems)


# ---- 5. residual and references ------------------------------------------------------------------------


def test_residual_does_not_delete_what_a_young_narinfo_references(
    tmp_path: Path, bucket: Bucket, signing_key: Key
) -> None:
    """Sequence 5: `shared` is pushed alone, `two` (which references it) later; neither rooted.
    `residual --older-than 3s` when shared is older and two younger: shared's narinfo must stay,
    or two's narinfo references a missing path."""
    _one, two, shared = build_pair(tmp_path)
    alpha = Host(tmp_path, bucket, signing_key[0], "alpha")
    stray = add_text(tmp_path, "stray")
    alpha.run("push", shared, stray)
    time.sleep(4)
    alpha.run("push", two)
    alpha.run("residual", "--older-than", "3s")
    assert not bucket.has_narinfo(stray), "setup: residual ran and deleted the old stray path"
    assert bucket.has_narinfo(two), "setup: two is younger than 3s"
    problems = bucket_problems(bucket, alpha, signing_key[1], [two], tmp_path)
    if not bucket.has_narinfo(shared):
        problems.append(f"{hash_part(shared)}.narinfo deleted while {hash_part(two)}.narinfo references it")
    assert problems == [], "the bucket is broken:\n" + "\n".join(problems)


# ---- 6. a collector that outlived its lease -------------------------------------------------------------


def test_a_collector_suspended_past_its_lease_does_not_delete_from_its_stale_plan(
    tmp_path: Path, bucket: Bucket, signing_key: Key
) -> None:
    """Sequence 6: alpha collects beta's trash through a slow link (400 ms a request) with
    lease_ttl = 2 s and is stopped (SIGSTOP) once it holds the lease, having listed the live
    gcinfos. Past the ttl, beta collects (taking the stale lease over), then roots `two` again
    and publishes it. Resumed, alpha must not delete `two`'s closure from its stale plan: it exits
    non-zero or says it lost its lease, and the bucket stays whole.

    Deletion is one DeleteObjects request per phase for this few paths, so alpha is stopped
    before it deletes, not between batches: its gcinfo cache is warmed first, so once it holds
    the lease it makes only a LIST of gcroots/ and HEADs (≈ 800 ms) before deleting."""
    alpha, beta, one, two, _shared = beta_drops_two(tmp_path, bucket, signing_key)
    only_two = sorted(set(closure_of(two)) - set(closure_of(one)))
    alpha.run("gc", "--dry-run")  # fills alpha's gcinfo cache (same state_dir as the variant below)
    port, proxy = slow_link(bucket, 400)
    config = alpha.variant(f"http://127.0.0.1:{port}", lease_ttl=2)
    out, err = tmp_path / "alpha-gc.out", tmp_path / "alpha-gc.err"
    gc: subprocess.Popen[bytes] | None = None
    try:
        with out.open("w") as stdout, err.open("w") as stderr:
            gc = subprocess.Popen([sys.executable, "-m", "nixcache.cli", "gc", "--config", str(config)],
                                  stdout=stdout, stderr=stderr)  # fmt: skip
        wait_until(lambda: bucket.get(GC_LEASE), 30, "alpha's lease", interval=0.02)
        os.kill(gc.pid, signal.SIGSTOP)
        assert all(bucket.has_narinfo(p) for p in only_two), "setup: alpha was stopped before deleting"
        lease = json.loads(bucket.get(GC_LEASE) or b"{}")
        assert str(lease.get("holder", "")).startswith("alpha:"), lease
        time.sleep(3)  # past alpha's lease (2 s)
        taken = beta.run("gc")
        assert "lease_taken_over" in taken.stderr, taken.stderr
        assert not any(bucket.has_narinfo(p) for p in only_two), "setup: beta collected two's closure"
        beta.root("two", two)
        beta.run("publish")
        assert all(bucket.has_narinfo(p) for p in closure_of(two)), "setup: two pushed and published again"
        os.kill(gc.pid, signal.SIGCONT)
        returncode = gc.wait(timeout=60)
    finally:
        if gc is not None and gc.poll() is None:
            os.kill(gc.pid, signal.SIGCONT)
            gc.kill()
            gc.wait()
        proxy.terminate()
        proxy.wait()
    said = out.read_text() + err.read_text()
    problems = bucket_problems(bucket, beta, signing_key[1], [one, two], tmp_path)
    if returncode == 0 and "lease" not in said:
        problems.append(f"alpha's collection exited 0 and said nothing about its lease: {said[-2000:]}")
    assert problems == [], "the bucket is broken:\n" + "\n".join(problems)


# ---- 7. two machines with the same hostname ------------------------------------------------------------


def test_a_second_machine_with_the_same_hostname_is_refused(tmp_path: Path, bucket: Bucket, signing_key: Key) -> None:
    """Sequence 7: machines A and B are both called "nixos" (different machine_id_file). A
    publishes; B's publish and dereference fail (exit 1, naming the claim on gcroots/nixos/) and leave
    A's gcinfos alone
    (B would otherwise trash them: they are not B's roots). A goes on working."""
    one, two, _shared = build_pair(tmp_path)
    a = same_hostname(tmp_path, bucket, signing_key[0], "nixos-a", "a" * 32)
    b = same_hostname(tmp_path, bucket, signing_key[0], "nixos-b", "b" * 32)
    a.root("one", one)
    b.root("two", two)
    a.run("publish")
    folder = bucket.gcinfos("gcroots/")
    assert folder == [f"gcroots/nixos/{gcinfo_name(one)}"], folder
    for command in ("publish", "dereference"):
        r = run_cli(b.config, command)
        assert r.returncode == 1 and "claim" in r.stderr, f"B's {command}: {r.returncode} {r.stdout} {r.stderr}"
        assert bucket.gcinfos("gcroots/") == folder, f"after B's {command}"
        assert bucket.gcinfos("gctrash/") == [], f"after B's {command}"
    a.run("publish")
    a.run("dereference")
    assert bucket.gcinfos("gcroots/") == folder and bucket.gcinfos("gctrash/") == []
    assert_whole(bucket, a, signing_key[1], [one], tmp_path)


def test_a_claim_naming_no_machine_is_repaired_not_taken_for_another_machine(
    tmp_path: Path, bucket: Bucket, signing_key: Key
) -> None:
    """A claim cut short (a daemon killed -9 mid-PUT through a faulty network left an empty
    `.claim`) names no machine: it must not lock the host out of its own folder for good
    (found by test_faults' kill -9 test). The host takes it over (conditionally on its ETag),
    publishes, and a second machine with the same hostname is still refused afterwards."""
    one, two, _shared = build_pair(tmp_path)
    a = same_hostname(tmp_path, bucket, signing_key[0], "nixos-a", "a" * 32)
    b = same_hostname(tmp_path, bucket, signing_key[0], "nixos-b", "b" * 32)
    a.root("one", one)
    for corrupt in (b"", b"{not json", b'{"hostname": "nixos"}'):
        bucket.client.put_object(Bucket=bucket.name, Key="gcroots/nixos/.claim", Body=corrupt)
        a.run("publish")
        assert bucket.gcinfos("gcroots/") == [f"gcroots/nixos/{gcinfo_name(one)}"]
        claim = bucket.get("gcroots/nixos/.claim")
        assert claim is not None and b"a" * 32 in claim, claim
    b.root("two", two)
    r = run_cli(b.config, "publish")
    assert r.returncode == 1 and "claimed by another machine (machine id aaaaaaaaaaaa" in r.stderr, r.stderr


# ---- 8. a provider that ignores conditional writes --------------------------------------------------


def test_the_strip_proxy_stands_in_for_a_provider_ignoring_conditional_writes(bucket: Bucket) -> None:
    """Sequence 8, the proxy itself: directly, SeaweedFS refuses a conditional PUT on an existing
    key (412); through the proxy the same request succeeds (200), as on such a provider."""
    import botocore.exceptions

    direct = bucket.client
    direct.put_object(Bucket=bucket.name, Key="probe", Body=b"first")
    for condition in ({"IfNoneMatch": "*"}, {"IfMatch": '"0123456789abcdef0123456789abcdef"'}):
        try:
            direct.put_object(Bucket=bucket.name, Key="probe", Body=b"second", **condition)
            raise AssertionError(f"SeaweedFS accepted a PUT with a failing {condition}")
        except botocore.exceptions.ClientError as e:
            assert e.response["ResponseMetadata"]["HTTPStatusCode"] == 412, e.response
    with StripProxy.for_endpoint(bucket.endpoint) as proxy:
        through = Bucket(proxy.endpoint, bucket.name).client
        for n, condition in enumerate(({"IfNoneMatch": "*"}, {"IfMatch": '"0123456789abcdef0123456789abcdef"'})):
            resp = through.put_object(Bucket=bucket.name, Key="probe", Body=f"through {n}".encode(), **condition)
            assert resp["ResponseMetadata"]["HTTPStatusCode"] == 200
            assert bucket.get("probe") == f"through {n}".encode()
        assert proxy.stripped == {"if-none-match": 1, "if-match": 1}


def test_gc_refuses_to_collect_where_conditional_writes_are_ignored(
    tmp_path: Path, bucket: Bucket, signing_key: Key
) -> None:
    """Sequence 8: through a provider that ignores If-None-Match/If-Match the lease excludes
    nobody, so `nixcache gc` refuses (exit 1, "conditional") and deletes nothing."""
    alpha, _beta, _one, _two, _ = beta_drops_two(tmp_path, bucket, signing_key)
    before = set(bucket.keys())
    with StripProxy.for_endpoint(bucket.endpoint) as proxy:
        r = run_cli(alpha.variant(proxy.endpoint), "gc")
    assert r.returncode == 1 and "conditional" in r.stderr, f"{r.returncode}: {r.stdout} {r.stderr}"
    assert before - set(bucket.keys()) == set(), "nothing deleted"
    assert bucket.get(GC_LEASE) is None, "no lease left behind to block other collectors"


def test_gc_collects_where_conditional_writes_are_ignored_when_it_is_the_sole_collector(
    tmp_path: Path, bucket: Bucket, signing_key: Key
) -> None:
    """Sequence 8: with `gc.sole_collector = true` the same collection through the proxy runs."""
    alpha, _beta, one, two, _ = beta_drops_two(tmp_path, bucket, signing_key)
    with StripProxy.for_endpoint(bucket.endpoint) as proxy:
        r = run_cli(alpha.variant(proxy.endpoint, sole_collector=True), "gc")
    assert r.returncode == 0, r.stdout + r.stderr
    assert narinfos(bucket) == {hash_part(p) for p in closure_of(one)}
    assert not bucket.has_narinfo(two) and bucket.keys("gctrash/") == []
    assert_whole(bucket, alpha, signing_key[1], [one], tmp_path)

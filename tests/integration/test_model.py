"""Model-based test of the promise "the bucket stays whole under every sequence of operations
by any number of hosts" — Hypothesis drives real hosts against one real SeaweedFS bucket.

Three hosts (``host0``, ``host1``, ``host2``: own config, hostname, state dir and gcroots dir,
``grace_period = 0``) share one fresh bucket per example. Every rule runs the real thing:

- ``push(host, path)``: ``nixcache push PATH`` (an unrooted push)
- ``legacy_push(path)``: what the original tool (``nix copy --to s3://…``) writes into a shared
  bucket: real ``nix copy`` output (NARs named by the *compressed* file's hash, xz), uploaded
  path by path, references first, skipping narinfos already there — this Nix has no S3 support,
  so it copies to ``file://`` and the objects are put as ``nix copy`` would
- ``root(host, name, path, publish)``: a symlink in the host's gcroots dir (replacing one of
  that name), then, if ``publish``, ``publish(host)``; ``unroot(root, then)`` removes one made
  by an earlier ``root``, then, as ``then`` says, ``dereference(host)`` and ``collect(host)``.
  Every example starts with ``initial_root(host, path)``: a root, published. (These shortcuts
  let Hypothesis reach the collection of something in a few steps: with the rules alone, few
  random sequences did.)
- ``publish(host)``, for a host with a root not published yet; ``dereference(host)``, for a host
  whose ``gcroots/<host>/`` holds a gcinfo of a path it no longer roots (both draw the host among
  those, printed as ``Draw 1 (host): N``); ``collect(host)`` (``nixcache gc``) when
  ``gctrash/`` is not empty; ``residual(host)`` (``nixcache residual --older-than 0s``) when
  there is a narinfo. (The preconditions only spare steps that would do nothing.)
- the daemon of ``host0`` (``nixcache serve``, collect and dereference every second):
  ``daemon_start``, ``daemon_tick(reload)`` (let it catch up; ``reload``: SIGHUP it first with
  ``upload.compression`` switched between zstd and xz), ``daemon_stop(how)`` (SIGTERM: it must
  exit 0; or SIGKILL, at once or after letting it run 0.05 s or 0.3 s)

The daemon takes turns. It is frozen (SIGSTOP) between steps and runs only inside its own steps
(start and tick; stop lets it run first), each of which waits until it has
caught up — its ``gcroots/host0/`` holds exactly the gcinfos of host0's current roots — and has
finished a whole collection that began after that, then freezes it again, at a quiet point.
So the invariants are checked on a quiescent bucket, and no collection of the daemon overlaps a
push of another host: a race would make examples unreproducible for Hypothesis. Overlaps (a
path found present, then collected before the narinfo or gcinfo relying on it is written:
docs/gc.md rule 9) are forced deterministically in test_consistency.py and
test_adversarial*.py. While the daemon runs, ``publish(0)`` and ``dereference(0)`` do not run the CLI next
to it: they are a daemon tick (the daemon publishes and dereferences by itself); ``push``,
``collect`` and ``residual`` of host0 still use the CLI (the frozen daemon holds no lease).

Model: each host's roots (name → path), the roots that are published (rooted without a break
since a publish of that host succeeded, or since a daemon tick), and what was pushed.

Invariants, after every step:

(a) ``nixcache verify`` exits 0: every narinfo has its NAR and its references, every live gcinfo
    its members (run only when the bucket changed since the last check: LIST keys and ETags);
(b) for every published root: its gcinfo is in ``gcroots/<host>/`` and every path of its closure
    (``nix-store -qR``) has a narinfo;

and at the end of every example whose steps all passed, (c) a real Nix client substitutes every
published root's closure over HTTP, signatures required, into a fresh store.

A CLI command must exit 0, except exit 1 with one of the documented skips (``lease held by``,
``claimed``); any other failure prints its output.

CI runs 4 examples of up to 10 steps (about a minute). A long run: 300 examples of up to 20
steps, no pytest timeout, failures kept in a database (running it again replays them first),
shrinking for up to an hour instead of Hypothesis's 5 minutes; follow it in the transcript:

    NIXCACHE_MODEL_EXAMPLES=300 NIXCACHE_MODEL_STEPS=20 NIXCACHE_MODEL_DB=/tmp/model-db \\
    NIXCACHE_MODEL_SHRINK_SECONDS=3600 python -m pytest -q tests/integration/test_model.py \\
        -x -p no:cacheprovider --basetemp=/tmp/model
    tail -f /tmp/model/test_the_bucket_stays_whole_un0/model-transcript.log

Every step runs real processes, so a long failing example is slow to shrink: 6 to 8 steps
(NIXCACHE_MODEL_STEPS) find the known bugs as well, and shrank each here in 20 to 35 minutes.
``--hypothesis-seed=N`` replays a run.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import hypothesis.internal.conjecture.engine
import pytest
from hypothesis import HealthCheck, Phase, note, settings, target
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from hypothesis.database import DirectoryBasedExampleDatabase
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    consumes,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

from nixcache.bucket.layout import gcinfo_name, hash_part
from nixcache.bucket.seaweed import SeaweedFS
from tests.conftest import _drop
from tests.harness import (
    NIX,
    Bucket,
    Daemon,
    base_settings,
    build_pair,
    closure_of,
    new_bucket,
    nix_build,
    nix_copy_from,
    run_cli,
    wait_until,
    write_config,
)

N_HOSTS = 3
DAEMON_HOST = 0
ROOT_NAMES = ("r1", "r2")
POOL_LABELS = ("one", "two", "shared", "app", "tool", "lib", "a1", "a2", "b1", "b2")
"""one/two: roots sharing ``shared`` (build_pair); app → tool → lib (nix_build); a1/a2 and
b1/b2: different names, identical contents, so one NAR each pair."""
DOCUMENTED_SKIPS = ("lease held by", "claimed")
CRASH_EVENTS = ("roots.crashed", "dereference.crashed", "gc.crashed", "push.crashed")
LEASE_TTL = 3  # seconds: a lease left by a killed daemon expires within the example
CATCH_UP_TIMEOUT = 30.0

EXAMPLES = int(os.environ.get("NIXCACHE_MODEL_EXAMPLES", "0"))
if "NIXCACHE_MODEL_SHRINK_SECONDS" in os.environ:  # Hypothesis stops shrinking after 5 minutes
    hypothesis.internal.conjecture.engine.MAX_SHRINKING_SECONDS = int(os.environ["NIXCACHE_MODEL_SHRINK_SECONDS"])
STEPS = int(os.environ.get("NIXCACHE_MODEL_STEPS", "10"))
MODEL_SETTINGS = settings(
    max_examples=EXAMPLES or 4,
    stateful_step_count=STEPS,
    deadline=None,
    # Nothing written into the working tree; a long run may keep its failures elsewhere, so
    # that running it again replays them first.
    database=DirectoryBasedExampleDatabase(os.environ["NIXCACHE_MODEL_DB"])
    if "NIXCACHE_MODEL_DB" in os.environ
    else None,
    suppress_health_check=list(HealthCheck),
    phases=[p for p in Phase if p != Phase.explain],  # explaining replays many slow examples
)


@dataclass(frozen=True)
class Pool:
    """The store paths the rules draw from, built once per session with real Nix."""

    paths: dict[str, str]
    """label → store path"""
    closures: dict[str, frozenset[str]]
    """store path → its closure, for every path in the closure of a pool path"""

    def closure(self, label: str) -> frozenset[str]:
        return self.closures[self.paths[label]]


@pytest.fixture(scope="session")
def pool(tmp_path_factory: pytest.TempPathFactory) -> Pool:
    tmp = tmp_path_factory.mktemp("model-pool")
    one, two, shared = build_pair(tmp)
    built = nix_build(tmp)
    by_name = {p.rsplit("-", 1)[1]: p for p in built}
    paths = {"one": one, "two": two, "shared": shared, "app": by_name["app"], "tool": by_name["tool"],
             "lib": by_name["lib"]}  # fmt: skip
    for pair in ("a", "b"):
        content = f"identical contents {pair} {os.urandom(8).hex()}\n"
        files = []
        for n in (1, 2):
            (tmp / f"twin-{pair}{n}").write_text(content)
            files.append(str(tmp / f"twin-{pair}{n}"))
        added = subprocess.run(["nix-store", "--add", *files], check=True, capture_output=True, text=True)
        paths[f"{pair}1"], paths[f"{pair}2"] = added.stdout.split()
    assert set(paths) == set(POOL_LABELS)
    members = {p for label in POOL_LABELS for p in closure_of(paths[label])}
    return Pool(paths, {p: frozenset(closure_of(p)) for p in members})


@dataclass
class World:
    """What every example shares: the server, the signing key, the pool, a scratch dir."""

    endpoint: str
    key: tuple[Path, str]
    pool: Pool
    tmp: Path
    counter: itertools.count[int] = field(default_factory=itertools.count)

    def transcript(self, line: str) -> None:
        with (self.tmp / "model-transcript.log").open("a") as f:
            f.write(line + "\n")


class Host:
    """One host's config, state and gcroots dirs (as test_gc.Host); commands run through the CLI."""

    def __init__(self, tmp: Path, bucket: Bucket, key: Path, name: str) -> None:
        self.name = name
        self.dir = tmp / name
        self.dir.mkdir()
        self.settings = base_settings(self.dir, bucket, key)
        self.settings["hostname"] = name
        # The intervals matter only to the daemon (host0): it collects and dereferences by itself.
        self.settings["gc"] = {"grace_period": 0, "lease_ttl": LEASE_TTL, "collect_interval": 1,
                               "dereference_interval": 1}  # fmt: skip
        self.settings["roots"] = {"debounce": 0.2, "rescan_interval": 3600}
        self.config = write_config(self.dir / "config.toml", self.settings)
        self.gcroots = self.dir / "gcroots"

    def rewrite_config(self) -> None:
        write_config(self.config, self.settings)

    def root(self, name: str, path: str) -> None:
        """Point gcroots/<name> at ``path``, replacing it atomically if it exists."""
        tmp = self.dir / f".{name}.new"
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(path)
        os.replace(tmp, self.gcroots / name)

    def unroot(self, name: str) -> None:
        (self.gcroots / name).unlink()


@dataclass(frozen=True)
class RootRef:
    """What ``root`` returns into the ``rooted`` bundle, for ``unroot`` to take."""

    host: int
    name: str


def event_time(ev: dict[str, Any]) -> float:
    return datetime.fromisoformat(str(ev["timestamp"])).timestamp()


class BucketMachine(RuleBasedStateMachine):
    def __init__(self, world: World) -> None:
        super().__init__()
        self.world = world
        self.pool = world.pool
        self.n = next(world.counter)
        self.dir = world.tmp / f"example-{self.n}"
        self.dir.mkdir()
        self.bucket = new_bucket(world.endpoint)
        self.s3 = self.bucket.client
        self.hosts = [Host(self.dir, self.bucket, world.key[0], f"host{h}") for h in range(N_HOSTS)]
        self.roots: list[dict[str, str]] = [{} for _ in range(N_HOSTS)]
        """host → root name → pool label"""
        self.published: list[set[str]] = [set() for _ in range(N_HOSTS)]
        """host → labels rooted without a break since a publish of that host succeeded"""
        self.pushed: set[str] = set()
        self.daemon: Daemon | None = None
        self.daemon_log = self.dir / "daemon.log"
        self.verified: dict[str, str] = {}
        """the bucket (key → ETag) the last time `nixcache verify` passed on it"""
        self.objects: dict[str, str] = {}
        """the bucket (key → ETag) after the last step: what the preconditions look at"""
        self.gcinfo_labels = {gcinfo_name(p): label for label, p in self.pool.paths.items()}
        self.steps_ok = True
        self.legacy_dirs = itertools.count()
        self.collected = 0
        """dead paths collected: what Hypothesis's targeting phase tries to increase"""
        self.started = time.monotonic()
        world.transcript(f"--- example {self.n}: bucket {self.bucket.name}")

    # ---- helpers -----------------------------------------------------------------------------

    def step(self, text: str) -> None:
        self.steps_ok = False  # set again by the invariant once the step has been checked
        self.world.transcript(text)

    def path(self, label: str) -> str:
        return self.pool.paths[label]

    def listing(self) -> dict[str, str]:
        out: dict[str, str] = {}
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket.name):
            out.update({o["Key"]: o["ETag"] for o in page.get("Contents", [])})
        return out

    def cli(self, host: int, *args: str) -> bool:
        """Run ``nixcache ARGS`` as ``host``: True on exit 0, False on a documented skip."""
        r = run_cli(self.hosts[host].config, *args)
        output = r.stdout + r.stderr
        self.collected += sum(int(n) for n in re.findall(r"(\d+) dead paths", r.stdout))
        self.world.transcript(f"    host{host}: nixcache {' '.join(args)} → {r.returncode}\n" + _indent(output))
        if r.returncode == 0:
            skipped = next((ln for ln in r.stdout.splitlines() if ln.startswith("skipped:")), None)
            if skipped:
                note(f"host{host} {args[0]}: {skipped}")
            return True
        if r.returncode == 1 and any(s in output for s in DOCUMENTED_SKIPS):
            note(f"host{host} {args[0]} skipped: {output.strip()[-300:]}")
            return False
        raise AssertionError(f"host{host}: nixcache {' '.join(args)} exited {r.returncode}:\n{output}")

    def root_paths(self, host: int) -> set[str]:
        return set(self.roots[host].values())

    def roots_changed(self, host: int) -> None:
        self.published[host] &= self.root_paths(host)

    def daemon_running(self) -> bool:
        return self.daemon is not None

    def unpublished_hosts(self) -> list[int]:
        """Hosts with a root not published since it was made."""
        return [h for h in range(N_HOSTS) if self.root_paths(h) - self.published[h]]

    def hosts_to_dereference(self) -> list[int]:
        """Hosts with a gcinfo in ``gcroots/<host>/`` for a path they no longer root."""
        out = []
        for h in range(N_HOSTS):
            folder = f"gcroots/host{h}/"
            gcinfos = {k[len(folder) :] for k in self.objects if k.startswith(folder) and k.endswith(".gcinfo.gz")}
            if {self.gcinfo_labels.get(g) for g in gcinfos} - self.root_paths(h):
                out.append(h)
        return out

    def trash_to_collect(self) -> bool:
        return any(k.startswith("gctrash/") for k in self.objects)

    def narinfos_in_bucket(self) -> bool:
        return any(k.endswith(".narinfo") for k in self.objects)

    # ---- the daemon --------------------------------------------------------------------------

    def daemon_events(self, since: int) -> list[dict[str, Any]]:
        out = []
        with self.daemon_log.open("rb") as f:
            f.seek(since)
            for raw in f:
                try:
                    out.append(json.loads(raw))
                except ValueError:
                    continue
        return out

    def daemon_failure(self, why: str) -> AssertionError:
        tail = self.daemon_log.read_text()[-4000:] if self.daemon_log.exists() else ""
        return AssertionError(f"daemon (host0): {why}\n{tail}")

    def catch_up(self, since: int) -> None:
        """Let the running daemon catch up — publish and dereference host0's current roots, then
        a whole collection — and freeze it (SIGSTOP) at that quiet point."""
        daemon = self.daemon
        assert daemon is not None and daemon.process is not None
        folder = "gcroots/host0/"
        expected = {gcinfo_name(self.path(label)) for label in self.root_paths(DAEMON_HOST)}

        def check_alive() -> None:
            assert daemon.process is not None
            if daemon.process.poll() is not None:
                raise self.daemon_failure(f"exited with {daemon.process.returncode}")
            crashed = [e for e in self.daemon_events(since) if e.get("event") in CRASH_EVENTS]
            if crashed:
                raise self.daemon_failure(f"crashed: {crashed[0]}")

        def caught_up() -> bool:
            check_alive()
            keys = {k[len(folder) :] for k in self.bucket.keys(folder) if k.endswith(".gcinfo.gz")}
            return keys == expected

        try:
            wait_until(caught_up, CATCH_UP_TIMEOUT, "the daemon to publish/dereference host0's roots", 0.05)
        except AssertionError as e:
            raise self.daemon_failure(f"{e}; expected {sorted(expected)}") from None
        t_caught = time.time()

        def collected() -> bool:
            check_alive()
            return any(
                e.get("event") == "gc.done" and event_time(e) - float(e.get("seconds", 0)) > t_caught
                for e in self.daemon_events(since)
            )

        try:
            wait_until(collected, CATCH_UP_TIMEOUT, "a whole collection by the daemon", 0.02)
        except AssertionError as e:
            raise self.daemon_failure(str(e)) from None
        daemon.signal(signal.SIGSTOP)
        self.published[DAEMON_HOST] = self.root_paths(DAEMON_HOST)
        done = [e for e in self.daemon_events(since) if e.get("event") in ("gc.done", "dereference.done")]
        self.collected += sum(int(e.get("dead_paths") or 0) for e in done if e["event"] == "gc.done")
        self.world.transcript("    daemon: " + "; ".join(f"{e['event']} {_summary(e)}" for e in done[-4:]))

    def resume(self) -> int:
        """SIGCONT the frozen daemon; returns the log offset from which its new events are."""
        assert self.daemon is not None
        return self.daemon_resume(self.daemon)

    def daemon_resume(self, daemon: Daemon) -> int:
        since = self.daemon_log.stat().st_size
        daemon.signal(signal.SIGCONT)
        return since

    def tick(self) -> None:
        self.catch_up(self.resume())

    # ---- rules -------------------------------------------------------------------------------

    hosts_st = st.integers(0, N_HOSTS - 1)
    labels_st = st.sampled_from(POOL_LABELS)

    @rule(host=hosts_st, path=labels_st)
    def push(self, host: int, path: str) -> None:
        self.step(f"push(host={host}, path={path})")
        if self.cli(host, "push", self.path(path)):
            self.pushed.add(path)

    @rule(path=labels_st)
    def legacy_push(self, path: str) -> None:
        """The original tool's `nix copy --to s3://…` of ``path``'s closure into the bucket."""
        self.step(f"legacy_push(path={path})")
        out = self.dir / f"legacy-{next(self.legacy_dirs)}"
        secret = self.world.key[0]
        r = subprocess.run([*NIX, "copy", "--to", f"file://{out}?compression=xz&secret-key={secret}", self.path(path)],
                           capture_output=True, text=True)  # fmt: skip
        assert r.returncode == 0, r.stderr
        present = set(self.listing())
        put = self.s3.put_object
        if "nix-cache-info" not in present:
            put(Bucket=self.bucket.name, Key="nix-cache-info", Body=(out / "nix-cache-info").read_bytes())
        # references first: a path's closure is larger than each of its references'
        for member in sorted(self.pool.closures[self.path(path)], key=lambda p: len(self.pool.closures[p])):
            key = f"{hash_part(member)}.narinfo"
            if key in present:
                continue  # nix copy skips paths the cache already has
            text = (out / key).read_text()
            url = next(ln.split(": ", 1)[1] for ln in text.splitlines() if ln.startswith("URL: "))
            put(Bucket=self.bucket.name, Key=url, Body=(out / url).read_bytes())
            put(Bucket=self.bucket.name, Key=key, Body=text.encode())
            self.world.transcript(f"    legacy: {key} → {url}")
        self.pushed.add(path)

    rooted = Bundle("rooted")

    def publish_host(self, host: int) -> None:
        self.world.transcript(f"  publish host{host}")
        if host == DAEMON_HOST and self.daemon_running():
            self.tick()  # the daemon publishes by itself: no CLI next to it
        elif self.cli(host, "publish"):
            self.published[host] = self.root_paths(host)

    def dereference_host(self, host: int) -> None:
        self.world.transcript(f"  dereference host{host}")
        if host == DAEMON_HOST and self.daemon_running():
            self.tick()
        else:
            self.cli(host, "dereference")

    @rule(target=rooted, host=hosts_st, name=st.sampled_from(ROOT_NAMES), path=labels_st, publish=st.booleans())
    def root(self, host: int, name: str, path: str, publish: bool) -> RootRef:
        """Point a root at ``path`` (as nix-build -o does); with ``publish``, then publish."""
        self.step(f"root(host={host}, name={name}, path={path}, publish={publish})")
        self.hosts[host].root(name, self.path(path))
        self.roots[host][name] = path
        self.roots_changed(host)
        if publish:
            self.publish_host(host)
        return RootRef(host, name)

    @initialize(target=rooted, host=hosts_st, path=labels_st)
    def initial_root(self, host: int, path: str) -> RootRef:
        """Every example starts with a published root: dropping and collecting it are then a step
        or two away, which random sequences otherwise rarely reach."""
        return self.root(host, ROOT_NAMES[0], path, publish=True)

    @rule(root=consumes(rooted), then=st.sampled_from(["", "dereference", "dereference, collect"]))
    def unroot(self, root: RootRef, then: str) -> None:
        """Remove a root made by ``root``; then, as ``then`` says, dereference its host, and
        collect (its daemon, if running, does both in one tick)."""
        self.step(f"unroot(host={root.host}, name={root.name}, then={then!r})")
        if root.name in self.roots[root.host]:  # not if it was unrooted through another reference
            self.hosts[root.host].unroot(root.name)
            del self.roots[root.host][root.name]
            self.roots_changed(root.host)
        if then:
            self.dereference_host(root.host)
        if then == "dereference, collect" and not (root.host == DAEMON_HOST and self.daemon_running()):
            self.cli(root.host, "gc")

    @precondition(lambda self: self.unpublished_hosts())
    @rule(data=st.data())
    def publish(self, data: st.DataObject) -> None:
        host = data.draw(st.sampled_from(self.unpublished_hosts()), label="host")
        self.step(f"publish(host={host})")
        self.publish_host(host)

    @precondition(lambda self: self.hosts_to_dereference())
    @rule(data=st.data())
    def dereference(self, data: st.DataObject) -> None:
        host = data.draw(st.sampled_from(self.hosts_to_dereference()), label="host")
        self.step(f"dereference(host={host})")
        self.dereference_host(host)

    @precondition(lambda self: self.trash_to_collect())
    @rule(host=hosts_st)
    def collect(self, host: int) -> None:
        self.step(f"collect(host={host})")
        self.cli(host, "gc")

    @precondition(lambda self: self.narinfos_in_bucket())
    @rule(host=hosts_st)
    def residual(self, host: int) -> None:
        self.step(f"residual(host={host})")
        self.cli(host, "residual", "--older-than", "0s")

    @precondition(lambda self: not self.daemon_running())
    @rule()
    def daemon_start(self) -> None:
        self.step("daemon_start()")
        self.daemon = Daemon(self.hosts[DAEMON_HOST].config, self.daemon_log)
        since = self.daemon_log.stat().st_size if self.daemon_log.exists() else 0
        try:
            self.daemon.start()
        except AssertionError as e:
            raise self.daemon_failure(f"did not start: {e}") from None
        self.catch_up(since)

    @precondition(lambda self: self.daemon_running())
    @rule(reload=st.booleans())
    def daemon_tick(self, reload: bool) -> None:
        """Let the daemon run until it has caught up; with ``reload``, first SIGHUP it with
        ``upload.compression`` switched between zstd and xz."""
        self.step(f"daemon_tick(reload={reload})")
        assert self.daemon is not None
        if not reload:
            self.tick()
            return
        host = self.hosts[DAEMON_HOST]
        upload = host.settings["upload"]
        upload["compression"] = "xz" if upload.get("compression", "zstd") == "zstd" else "zstd"
        host.rewrite_config()
        since = self.resume()
        self.daemon.signal(signal.SIGHUP)
        wait_until(lambda: any(e.get("event") == "config.reloaded" for e in self.daemon_events(since)), 20,
                   "config.reloaded")  # fmt: skip
        self.catch_up(since)

    @precondition(lambda self: self.daemon_running())
    @rule(how=st.sampled_from(["SIGTERM", "SIGKILL", "SIGKILL after 0.05s", "SIGKILL after 0.3s"]))
    def daemon_stop(self, how: str) -> None:
        """SIGTERM: the daemon must drain and exit 0. SIGKILL: wherever it is, after letting it
        run a moment (its overdue collection and dereference start at once)."""
        self.step(f"daemon_stop(how={how})")
        assert self.daemon is not None
        daemon, self.daemon = self.daemon, None
        self.daemon_resume(daemon)
        if how == "SIGTERM":
            code = daemon.stop()
            if code != 0:
                raise self.daemon_failure(f"SIGTERM: exit status {code}, expected 0")
            return
        time.sleep(float(how.removeprefix("SIGKILL after ").removesuffix("s")) if "after" in how else 0.0)
        daemon.kill9()

    # ---- invariants --------------------------------------------------------------------------

    @invariant()
    def bucket_is_whole(self) -> None:
        """(a) `nixcache verify` passes, (b) every published root's closure and gcinfo are there."""
        objects = self.objects = self.listing()
        if objects != self.verified:
            r = run_cli(self.hosts[1].config, "verify")
            self.world.transcript("    verify → " + str(r.returncode) + "\n" + _indent(r.stdout + r.stderr))
            if r.returncode != 0:
                fail_verify(r.stdout + r.stderr)
            self.verified = objects
        for host in range(N_HOSTS):
            for label in sorted(self.published[host]):
                gcinfo = f"gcroots/host{host}/{gcinfo_name(self.path(label))}"
                assert gcinfo in objects, f"host{host}'s published root {label}: {gcinfo} is gone"
                missing = sorted(p for p in self.pool.closure(label) if f"{hash_part(p)}.narinfo" not in objects)
                assert not missing, f"host{host}'s published root {label}: no narinfo for {missing}"
        self.steps_ok = True

    def teardown(self) -> None:
        """(c) a real Nix client substitutes every published root's closure — if every step passed
        (otherwise that failure is the one to report) — then the daemon and the bucket go."""
        if currently_in_test_context():
            target(float(self.collected), label="dead paths collected")
        try:
            wanted = sorted({self.path(label) for labels in self.published for label in labels})
            if self.steps_ok and wanted:
                dest = self.dir / "client"
                r = nix_copy_from(self.bucket, wanted, dest, self.world.key[1])
                self.world.transcript(f"    nix copy --from the bucket of {len(wanted)} roots → {r.returncode}")
                assert r.returncode == 0, f"a Nix client cannot substitute the published roots:\n{r.stderr}"
        finally:
            if self.daemon is not None and self.daemon.alive():
                self.daemon.kill9()
            _drop(self.bucket)
            self.world.transcript(f"    ({time.monotonic() - self.started:.1f}s)")


def fail_verify(output: str) -> None:
    """Raise for a failed `nixcache verify`, from one line per kind of problem: Hypothesis tells
    failures apart by where they are raised, so it shrinks and reports each kind on its own."""
    message = f"nixcache verify failed:\n{output}"
    assert ": NAR " not in output, message  # a narinfo whose NAR is gone
    assert "is not in the bucket" not in output, message  # a narinfo whose reference is gone
    assert "member(s) missing" not in output, message  # a live gcinfo whose member is gone
    raise AssertionError(message)


def _indent(text: str) -> str:
    return "".join(f"      {line}\n" for line in text.strip().splitlines()[-30:])


def _summary(ev: dict[str, Any]) -> str:
    keys = ("dead_paths", "deleted", "kept_shared_nar", "skipped", "trashed")
    return json.dumps({k: ev[k] for k in keys if ev.get(k)})


@pytest.mark.timeout(0 if EXAMPLES else 1200)  # a failure shrinks for up to 5 minutes more
def test_the_bucket_stays_whole_under_any_sequence_of_operations(
    seaweedfs: SeaweedFS, signing_key: tuple[Path, str], pool: Pool, tmp_path: Path
) -> None:
    world = World(seaweedfs.endpoint, signing_key, pool, tmp_path)
    run_state_machine_as_test(lambda: BucketMachine(world), settings=MODEL_SETTINGS)

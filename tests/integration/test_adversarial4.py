"""Adversarial sequences, fourth pass: the commits 0ade3de, f3d8e86, dc11f91 (batches retried in
halves with S3 errors counted toward an outage pause; the stdlib-only `nixcache status`).

Each test forces one sequence (the daemon's `Service` driven in-process against real SeaweedFS
and real Nix, or a pure unit test) and asserts an invariant on what survives it.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from nixcache.bucket import layout
from nixcache.bucket.s3 import S3
from nixcache.cli import status as statuscmd
from nixcache.config import load_config
from nixcache.daemon.service import Bucket as ServiceBucket
from nixcache.daemon.service import Service
from nixcache.errors import S3Error
from nixcache.local.journal import Journal
from tests.harness import Bucket, write_config
from tests.integration.test_adversarial2 import close, run, variant
from tests.integration.test_consistency import add_text
from tests.integration.test_gc import Host

Key = tuple[Path, str]


# ---- 1. one path's S3 error, counted once per halving level, pauses its whole batch forever ------------


def test_one_path_failing_with_an_s3_error_pauses_its_batch_before_any_other_path_is_tried(
    tmp_path: Path, bucket: Bucket, signing_key: Key, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Eight paths are pending, `bad` first; the bucket is reachable, but writing `bad`'s
    narinfo is refused with an S3 error of its own (a per-key AccessDenied / object lock / a
    NAR above the provider's object size: `_process` already counts any S3Error toward the
    outage, as the pre-0ade3de code did). One worker takes the eight as one batch:
    push([bad, g1..g7]) fails with S3Error → `_outage` (1); the first half [bad, g1, g2, g3]
    fails → (2); [bad, g1] fails → (3) = OUTAGE_AFTER: `resume_at` is set, and every later
    `_process_batch` call of this recursion hands its half back untried (`_paused`). No path
    of the batch was ever pushed alone, so no success reset the counter and `bad` was never
    marked failed: `release` puts all eight back first in line (due -inf, same order). And
    since nothing succeeded, `outage_failures` is never reset: after `retry_interval` the
    feeder hands over the very same batch, its first push fails, `_outage` counts a 4th
    failure in a row and pauses again at once — one failed push of the whole batch per
    interval, forever (the log shows exactly that). g1..g7 (their NARs and narinfos even
    written by the first push) never have their journal entries removed although bucket and
    Nix are reachable (I3; the whole daemon is also paused, every interval, for one path's
    own trouble). Before the commit the batch was retried one path at a time: g1 succeeded,
    reset the counter, and only `bad` waited. Other batches get through only in the moments
    between pauses; with one worker, never. Responsible: service.py
    `_process_batch`, `if isinstance(error, S3Error): self._outage(error)` (one failure of one
    path counted once per halving level, log2(batch) times in a row)."""
    host = Host(tmp_path, bucket, signing_key[0], "alpha")
    config = variant(host, "fast", upload={"workers": 1, "retry_interval": 1})
    bad = add_text(tmp_path, "bad")
    good = [add_text(tmp_path, f"good{i}") for i in range(7)]
    real_put = S3.put

    async def put(self: S3, key: str, body: bytes, *args: Any, **kwargs: Any) -> None:
        if key == layout.narinfo_key(bad):
            raise S3Error(f"s3://{self.bucket}/{key}: AccessDenied (this key only)")
        await real_put(self, key, body, *args, **kwargs)

    monkeypatch.setattr(S3, "put", put)
    cfg, cfg_file = load_config(config)

    async def go() -> None:
        svc = Service(cfg, cfg_file)
        svc.bucket = await ServiceBucket(cfg).open()
        await svc._intake([bad, *good], "fifo")
        feeder = asyncio.create_task(svc._feed_loop())
        svc._spawn_workers()
        try:
            for _ in range(200):  # twenty retry intervals
                if not set(good) & set(Journal(cfg.state_dir).pending()):
                    break
                await asyncio.sleep(0.1)
        finally:
            svc.stopping.set()
            feeder.cancel()
            await asyncio.gather(feeder, return_exceptions=True)
            await close(svc)

    run(go())
    left = set(good) & set(Journal(cfg.state_dir).pending())
    assert not left, (
        f"{len(left)} of 7 paths never uploaded in twenty retry intervals with the bucket reachable "
        f"(in the bucket: {sorted(p for p in good if bucket.has_narinfo(p))})"
    )


# ---- 2. `nixcache status` and the daemon disagree on where the control socket is ------------------------


@pytest.mark.parametrize("suffix", ["/", "/."])
def test_status_looks_for_the_socket_inside_a_fifo_written_with_a_trailing_slash(tmp_path: Path, suffix: str) -> None:
    """`fifo = "/run/x/hook.fifo/"` (or `…/hook.fifo/.`) is accepted by the full loader:
    pydantic's Path normalises it to `/run/x/hook.fifo`, the daemon makes its FIFO there and
    listens on `cfg.fifo.parent / "control.sock"` = `/run/x/control.sock` (service.py). The
    stdlib fast path takes `os.path.dirname` of the raw string, which for a trailing `/` or
    `/.` is the FIFO itself: it connects to `/run/x/hook.fifo/control.sock` and reports the
    daemon as not running (I4). Responsible: statuscmd.py `control_socket`
    (`os.path.dirname(fifo …)` on the unnormalised string)."""
    fifo = str(tmp_path / "run" / "hook.fifo") + suffix
    settings = {
        "fifo": fifo,
        "s3": {"bucket": "some-bucket"},
        "signing": {"secret_key_file": str(tmp_path / "key.sec")},
    }
    config = write_config(tmp_path / "config.toml", settings)
    cfg, _ = load_config(config)  # the full loader accepts it
    daemon_socket = str(cfg.fifo.parent / "control.sock")  # where Service.run listens
    assert statuscmd.control_socket(str(config)) == daemon_socket


# ---- 3. two dereferences of one host at once (the daemon's and `nixcache dereference`) -----------------


def test_a_dereference_that_finds_its_gcinfo_already_trashed_by_another_succeeds(
    tmp_path: Path, bucket: Bucket, signing_key: Key, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The daemon's dereference cycle and a `nixcache dereference` run by hand both list the
    host's folder, both find the gone root's gcinfo, and the daemon moves it first: the hand-run
    one's copy then finds no source. It failed with "NoSuchKey (HTTP 404)" and exit 1 although
    what it was asked for was done (seen in tests/integration/test_multiuser.py, 1 run in ~10).
    The gcinfo is in the trash once; the second dereference says it moved nothing."""
    from nixcache.ops.publish import Publisher

    host = Host(tmp_path, bucket, signing_key[0], "alpha")
    path = add_text(tmp_path, "raced")
    host.root("app", path)
    host.run("publish")
    host.unroot("app")
    real_list = Publisher.list_remote

    async def listed_then_overtaken(self: Publisher, s3: S3, claim: bool = True) -> dict[str, str]:
        remote = await real_list(self, s3, claim=claim)
        monkeypatch.setattr(Publisher, "list_remote", real_list)
        host.run("dereference")  # the other dereference, between this one's LIST and its move
        return remote

    monkeypatch.setattr(Publisher, "list_remote", listed_then_overtaken)
    from nixcache.ops import roots as ops

    result = run(ops.dereference(load_config(host.config)[0], False))
    assert result.moved == [], "this dereference moved nothing: the other one had"
    assert bucket.keys(layout.TRASH_PREFIX) == [layout.trash_folder("alpha") + layout.gcinfo_name(path)]
    assert bucket.gcinfos(layout.roots_folder("alpha")) == []

"""The pending journal and the spool: what a crash leaves behind is cleaned, nothing else."""

from __future__ import annotations

import os
import time
from pathlib import Path

from nixcache.local.journal import STALE_SPOOL_TMP, Journal

P = "/nix/store/" + "0" * 32 + "-x"


def test_entries_survive_a_restart_and_a_crashed_write_leaves_nothing(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    assert j.add(P) and not j.add(P)
    (tmp_path / "pending" / ".1111-y.4242.tmp").write_text("half")  # kill -9 inside write_atomic
    again = Journal(tmp_path)
    assert again.pending() == [P]
    assert sorted(p.name for p in (tmp_path / "pending").iterdir()) == [P.rsplit("/", 1)[1]]
    again.remove(P)
    assert again.pending() == []


def test_spool_import_skips_unfinished_files_and_drops_abandoned_ones(tmp_path: Path) -> None:
    j = Journal(tmp_path)
    (j.spool_dir / "1-1.paths").write_text(P + "\n")
    (j.spool_dir / ".2-2.paths").write_text("/nix/store/being-written\n")
    old = j.spool_dir / ".3-3.paths"
    old.write_text("/nix/store/abandoned\n")
    past = time.time() - STALE_SPOOL_TMP - 10
    os.utime(old, (past, past))
    seen: list[str] = []
    assert j.import_spool(seen.extend) == 1 and seen == [P]
    assert sorted(p.name for p in j.spool_dir.iterdir()) == [".2-2.paths"]

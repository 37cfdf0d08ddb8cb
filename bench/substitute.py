"""Substitution benchmark: a Nix client reading through the daemon's substituter (a private
bucket's read path) vs `nix copy --from` the same bucket read anonymously, same machine, same run.

    python bench/substitute.py [--size-mb 500] [--paths 220] [--rounds 3] [--workdir /tmp/nixcache-bench]

Builds bench/upload.py's closure (real files of this machine, derivations with references),
pushes it into a SeaweedFS bucket that also allows anonymous reads (so the direct path can be
measured against the same objects), starts `nixcache serve` with `substituter.listen`, and
substitutes the closure into fresh stores (fresh Nix caches) alternately through the daemon
and directly; through the daemon twice, its narinfo cache emptied first (cold), then full
(warm). Reports wall times, the ratios, the daemon's peak RSS (VmHWM), S3 requests per path
through the daemon, and the narinfo GETs of a substitution once its narinfo cache is warm.
Writes bench/out/substitute.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import boto3

sys.path.insert(0, str(Path(__file__).resolve().parent))
from upload import NIX, cpu_seconds, delayed, peak_rss_mb, prepare  # bench/ is not a package

from nixcache.bucket.seaweed import ACCESS_KEY, SECRET_KEY, SeaweedFS, free_port


def daemon_requests(config: Path) -> dict[str, int]:
    done = subprocess.run([sys.executable, "-m", "nixcache.cli", "status", "--json", "--config", str(config)],
                          check=True, capture_output=True, text=True)  # fmt: skip
    return dict(json.loads(done.stdout)["requests"])


def substitute(url: str, top: str, dest: Path, public: str, cache: Path) -> float:
    shutil.rmtree(dest, ignore_errors=True)
    shutil.rmtree(cache, ignore_errors=True)
    env = {**os.environ, "XDG_CACHE_HOME": str(cache)}
    started = time.monotonic()
    subprocess.run([*NIX, "copy", "--from", url, "--to", str(dest), "--option", "require-sigs", "true",
                    "--option", "trusted-public-keys", public, top],
                   check=True, capture_output=True, env=env)  # fmt: skip
    seconds = time.monotonic() - started
    subprocess.run(["chmod", "-R", "u+w", str(dest)], check=False)
    shutil.rmtree(dest, ignore_errors=True)
    return seconds


class Daemon:
    """`nixcache serve` with the substituter on a free port (its own state directory)."""

    def __init__(self, workdir: Path, name: str, settings: str, nar_cache_mb: int) -> None:
        self.port = free_port()
        self.state = workdir / f"substitute-{name}"
        shutil.rmtree(self.state, ignore_errors=True)
        (self.state / "gcroots").mkdir(parents=True)
        self.config = workdir / f"substitute-{name}.toml"
        self.config.write_text(
            f'state_dir = "{self.state}"\nfifo = "{self.state / "run/hook.fifo"}"\n'
            f'gcroots_dir = "{self.state / "gcroots"}"\nprofiles_dir = ""\n{settings}'
            f'[gc]\ncollect = false\n[substituter]\nlisten = "127.0.0.1:{self.port}"\nnar_cache_mb = {nar_cache_mb}\n'
        )
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / f"substitute-{name}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log, "w") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "nixcache.cli", "serve", "--config",
                                             str(self.config)], stderr=log)  # fmt: skip
        deadline = time.monotonic() + 60
        while not (self.state / "run" / "control.sock").exists():
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise SystemExit(f"the daemon did not start (see {self.log})")
            time.sleep(0.2)

    def empty(self, narinfos: bool, nars: bool) -> None:
        """Caches are safe to delete at any time: emptied by hand, as a user may."""
        for pattern, wanted in (("*/*.narinfo", narinfos), ("nars/*", nars)):
            for entry in (self.state / "substituter").glob(pattern) if wanted else []:
                entry.unlink()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=int, default=500)
    ap.add_argument("--paths", type=int, default=220)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "nixcache-bench")
    ap.add_argument("--latency-ms", type=int, default=0,
                    help="one-way delay added to every bucket request, both paths (a remote bucket)")  # fmt: skip
    ap.add_argument("--settle", type=float, default=2.0,
                    help="seconds between substitutions: the daemon finishes writing the NARs it copies "
                         "(fsync) after the client has them; a copy still in progress is not made twice")  # fmt: skip
    args = ap.parse_args()
    workdir: Path = args.workdir
    top, n_paths, nar_bytes = prepare(workdir, args.size_mb, args.paths)

    weed = SeaweedFS(workdir / f"weed-sub-{os.getpid()}")
    weed.start()
    daemons: list[Daemon] = []
    latency = None
    try:
        bucket = f"substitute-{int(time.time())}"
        admin = boto3.client("s3", endpoint_url=weed.endpoint, aws_access_key_id=ACCESS_KEY,
                             aws_secret_access_key=SECRET_KEY, region_name="us-east-1")  # fmt: skip
        admin.create_bucket(Bucket=bucket)
        key = workdir / "key.sec"
        if not key.exists():
            subprocess.run(["nix-store", "--generate-binary-cache-key", "bench-1", str(key), str(key) + ".pub"],
                           check=True)  # fmt: skip
        public = Path(str(key) + ".pub").read_text().strip()
        creds = workdir / "credentials"
        creds.write_text(f"[default]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n")
        endpoint, latency = delayed(weed, args.latency_ms)
        settings = (f'[s3]\nbucket = "{bucket}"\nendpoint = "{endpoint}"\ncredentials_file = "{creds}"\n'
                    f'[signing]\nsecret_key_file = "{key}"\n')  # fmt: skip
        # The default (narinfo cache only), and with the NAR cache on.
        plain = Daemon(workdir, "plain", settings, nar_cache_mb=0)
        nars = Daemon(workdir, "nars", settings, nar_cache_mb=2048)
        daemons = [plain, nars]
        print("pushing…", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "nixcache.cli", "push", "--config", str(plain.config), top],
                       check=True, capture_output=True)  # fmt: skip
        for daemon in daemons:  # fresh daemons: their VmHWM is the substitutions' peak (plus start-up)
            daemon.start()
        direct_url = f"{endpoint}/{bucket}"
        runs = {  # name: (daemon or None for direct, empty its narinfo cache, empty its NAR cache)
            "direct": (None, False, False),
            "cold": (plain, True, False),
            "warm": (plain, False, False),
            "nars_cold": (nars, True, True),
            "nars_warm": (nars, False, False),
        }
        rounds: list[dict[str, Any]] = []
        for r in range(args.rounds):
            times, requests, cpu = {}, {}, {}
            # Alternate who goes first; a warm run follows its cold one (its caches filled).
            order = list(runs) if r % 2 == 0 else ["cold", "warm", "nars_cold", "nars_warm", "direct"]
            for name in order:
                daemon, narinfos, nar_files = runs[name]
                if daemon is not None:
                    daemon.empty(narinfos, nar_files)
                    before, cpu_before = daemon_requests(daemon.config), cpu_seconds(daemon.pid)
                time.sleep(args.settle)
                print(f"round {r + 1}: {name}…", file=sys.stderr)
                url = direct_url if daemon is None else daemon.url
                times[name] = substitute(url, top, workdir / "dest", public, workdir / "client-cache")
                if daemon is not None:
                    after = daemon_requests(daemon.config)
                    requests[name] = {op: n - before.get(op, 0) for op, n in after.items() if n - before.get(op, 0)}
                    cpu[name] = round(cpu_seconds(daemon.pid) - cpu_before, 2)
            rounds.append({**{f"{n}_s": round(t, 2) for n, t in times.items()},
                           **{f"{n}_requests": q for n, q in requests.items()},
                           **{f"{n}_daemon_cpu_s": c for n, c in cpu.items()}})  # fmt: skip

        def ratio(kind: str) -> float:
            return round(statistics.median(r["direct_s"] / r[f"{kind}_s"] for r in rounds), 3)

        result = {
            "paths": n_paths, "nar_mb": round(nar_bytes / 1e6), "rounds": rounds,
            **{f"ratio_direct_over_{kind}": ratio(kind) for kind in runs if kind != "direct"},
            "daemon_peak_rss_mb": {d.state.name: round(peak_rss_mb(d.pid), 1) for d in daemons},
            "requests_per_path_cold": round(statistics.median(sum(r["cold_requests"].values()) for r in rounds)
                                            / n_paths, 2),
            # GETs beyond nix-cache-info and one NAR per path, with the narinfos cached:
            "narinfo_gets_warm": max(r["warm_requests"].get("GetObject", 0) - n_paths - 1 for r in rounds),
            "gets_warm_with_nar_cache": max(r["nars_warm_requests"].get("GetObject", 0) for r in rounds),
        }  # fmt: skip
    finally:
        for daemon in daemons:
            daemon.stop()
        if latency is not None:
            latency.terminate()
            latency.wait(30)
        weed.stop()
        shutil.rmtree(weed.data_dir, ignore_errors=True)  # GBs of volumes per run
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    result["latency_ms"] = args.latency_ms
    (out / f"substitute-{args.latency_ms}ms.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(f"\n| {n_paths} paths, {nar_bytes / 1e6:.0f} MB | wall (median of {args.rounds}) | ratio |\n|---|---|---|")
    print(f"| `nix copy --from` the bucket directly | {statistics.median(r['direct_s'] for r in rounds):.2f} s | 1 |")
    for kind in runs:
        if kind != "direct":
            median = statistics.median(r[f"{kind}_s"] for r in rounds)
            print(f"| through the daemon, {kind} | {median:.2f} s | {result[f'ratio_direct_over_{kind}']} |")
    print(
        f"daemon peak RSS {result['daemon_peak_rss_mb']} MB; S3 requests per path through the daemon (cold): "
        f"{result['requests_per_path_cold']}; narinfo GETs with the cache warm: {result['narinfo_gets_warm']}; "
        f"GETs with both caches warm: {result['gets_warm_with_nar_cache']}"
    )


if __name__ == "__main__":
    main()

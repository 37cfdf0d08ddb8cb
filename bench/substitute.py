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

import boto3

sys.path.insert(0, str(Path(__file__).resolve().parent))
from upload import NIX, delayed, prepare  # bench/ is not a package

from nixcache.bucket.seaweed import ACCESS_KEY, SECRET_KEY, SeaweedFS, free_port


def daemon_requests(config: Path) -> dict[str, int]:
    done = subprocess.run([sys.executable, "-m", "nixcache.cli", "status", "--json", "--config", str(config)],
                          check=True, capture_output=True, text=True)  # fmt: skip
    return dict(json.loads(done.stdout)["requests"])


def peak_rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    return int(next(line for line in status if line.startswith("VmHWM")).split()[1]) / 1024


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=int, default=500)
    ap.add_argument("--paths", type=int, default=220)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "nixcache-bench")
    ap.add_argument("--latency-ms", type=int, default=0,
                    help="one-way delay added to every bucket request, both paths (a remote bucket)")  # fmt: skip
    args = ap.parse_args()
    workdir: Path = args.workdir
    top, n_paths, nar_bytes = prepare(workdir, args.size_mb, args.paths)

    weed = SeaweedFS(workdir / f"weed-sub-{os.getpid()}")
    weed.start()
    daemon = latency = None
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
        port = free_port()
        state = workdir / "substitute-state"
        shutil.rmtree(state, ignore_errors=True)
        config = workdir / "substitute.toml"
        config.write_text(
            f'state_dir = "{state}"\nfifo = "{state / "run/hook.fifo"}"\ngcroots_dir = "{state / "gcroots"}"\n'
            f'profiles_dir = ""\n[s3]\nbucket = "{bucket}"\nendpoint = "{endpoint}"\n'
            f'credentials_file = "{creds}"\n[signing]\nsecret_key_file = "{key}"\n'
            f'[gc]\ncollect = false\n[substituter]\nlisten = "127.0.0.1:{port}"\n'
        )
        (state / "gcroots").mkdir(parents=True)
        print("pushing…", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "nixcache.cli", "push", "--config", str(config), top],
                       check=True, capture_output=True)  # fmt: skip
        # A fresh daemon: its VmHWM is the substitutions' peak (plus its start-up).
        with open(workdir / "substitute-daemon.log", "w") as log:
            daemon = subprocess.Popen([sys.executable, "-m", "nixcache.cli", "serve", "--config", str(config)],
                                      stderr=log)  # fmt: skip
        deadline = time.monotonic() + 60
        while not (state / "run" / "control.sock").exists():
            if time.monotonic() > deadline or daemon.poll() is not None:
                raise SystemExit("the daemon did not start (see substitute-daemon.log)")
            time.sleep(0.2)
        proxy_url, direct_url = f"http://127.0.0.1:{port}", f"{endpoint}/{bucket}"
        cache_dir = state / "substituter"
        rounds = []
        for r in range(args.rounds):
            times, requests = {}, {}
            # Alternate who goes first; the warm run follows the cold one (its narinfos cached).
            for name in ["direct", "cold", "warm"] if r % 2 == 0 else ["cold", "warm", "direct"]:
                if name == "cold":  # the narinfo cache emptied (safe to delete at any time)
                    for entry in cache_dir.glob("*/*.narinfo"):
                        entry.unlink()
                before = daemon_requests(config)
                print(f"round {r + 1}: {name}…", file=sys.stderr)
                url = direct_url if name == "direct" else proxy_url
                times[name] = substitute(url, top, workdir / "dest", public, workdir / "client-cache")
                after = daemon_requests(config)
                requests[name] = {op: n - before.get(op, 0) for op, n in after.items() if n - before.get(op, 0)}
            rounds.append({"direct_s": round(times["direct"], 2), "cold_s": round(times["cold"], 2),
                           "warm_s": round(times["warm"], 2), "cold_requests": requests["cold"],
                           "warm_requests": requests["warm"]})  # fmt: skip

        def ratio(kind: str) -> float:
            return round(statistics.median(r["direct_s"] / r[f"{kind}_s"] for r in rounds), 3)

        result = {
            "paths": n_paths, "nar_mb": round(nar_bytes / 1e6), "rounds": rounds,
            "ratio_direct_over_proxy_cold": ratio("cold"), "ratio_direct_over_proxy_warm": ratio("warm"),
            "daemon_peak_rss_mb": round(peak_rss_mb(daemon.pid), 1),
            "requests_per_path_cold": round(statistics.median(sum(r["cold_requests"].values()) for r in rounds)
                                            / n_paths, 2),
            # GETs beyond nix-cache-info and one NAR per path, with the narinfos cached:
            "narinfo_gets_warm": max(r["warm_requests"].get("GetObject", 0) - n_paths - 1 for r in rounds),
        }  # fmt: skip
    finally:
        for process in (daemon, latency):
            if process is not None:
                process.terminate()
                process.wait(30)
        weed.stop()
    out = Path(__file__).parent / "out"
    out.mkdir(exist_ok=True)
    result["latency_ms"] = args.latency_ms
    (out / f"substitute-{args.latency_ms}ms.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(f"\n| {n_paths} paths, {nar_bytes / 1e6:.0f} MB | wall (median of {args.rounds}) | ratio |\n|---|---|---|")
    print(f"| `nix copy --from` the bucket directly | {statistics.median(r['direct_s'] for r in rounds):.2f} s | 1 |")
    for kind in ("cold", "warm"):
        print(
            f"| through the daemon, narinfo cache {kind} | {statistics.median(r[f'{kind}_s'] for r in rounds):.2f} s "
            f"| {result[f'ratio_direct_over_proxy_{kind}']} |"
        )
    print(
        f"daemon peak RSS {result['daemon_peak_rss_mb']} MB; S3 requests per path through the daemon (cold): "
        f"{result['requests_per_path_cold']}; narinfo GETs with the cache warm: {result['narinfo_gets_warm']}"
    )


if __name__ == "__main__":
    main()

"""Upload benchmark: nixcache vs Nix's own uploader (`nix copy --to http://…`), same machine, same run.

    python bench/upload.py [--size-mb 500] [--paths 220] [--rounds 3] [--workdir /tmp/nixcache-bench]

Builds a closure of real files from this machine (derivations with references), starts a
SeaweedFS on loopback, pushes the closure into one fresh bucket with `nixcache push` and into
another with `nix copy --to 'http://…/BUCKET?compression=zstd'`, and reports wall time, MB/s,
peak RSS and S3 requests per path (from SeaweedFS's own request counters), plus the
post-build hook's latency. Writes bench/out/upload.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3

from nixcache.bucket.seaweed import ACCESS_KEY, SECRET_KEY, SeaweedFS, free_port

ROOT = Path(__file__).resolve().parent.parent
SOURCES = [Path("/usr/lib"), Path("/usr/share"), Path(sys.prefix) / "lib"]
NIX = ["nix", "--extra-experimental-features", "nix-command"]

EXPR = r"""
{ lists }:
let
  n = builtins.length lists;
  group = i: derivation {
    name = "bench-part-${toString i}";
    system = builtins.currentSystem;
    builder = "/bin/sh";
    PATH = "/usr/bin:/bin";
    list = builtins.elemAt lists i;
    # Memoised through `parts`: calling `group` recursively would evaluate exponentially.
    deps = (if i > 0 then [ (builtins.elemAt parts (i - 1)) ] else [ ])
      ++ (if i > 1 then [ (builtins.elemAt parts (i / 2)) ] else [ ]);
    args = [ "-c" ''
      mkdir -p $out
      while IFS= read -r f; do cp --parents -- "$f" $out/ 2>/dev/null || true; done < $list
      for d in $deps; do echo $d >> $out/deps; done
    '' ];
  };
  parts = builtins.genList group n;
in derivation {
  name = "bench-top";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  PATH = "/usr/bin:/bin";
  deps = parts;
  args = [ "-c" "mkdir $out; for d in $deps; do echo $d >> $out/deps; done" ];
}
"""


def pick_files(size: int) -> list[Path]:
    files: list[Path] = []
    total = 0
    for source in SOURCES:
        for dirpath, dirnames, names in os.walk(source):
            dirnames.sort()
            for name in sorted(names):
                p = Path(dirpath, name)
                try:
                    st = p.lstat()
                except OSError:
                    continue
                if not p.is_file() or p.is_symlink() or not os.access(p, os.R_OK) or st.st_size > 64 << 20:
                    continue
                files.append(p)
                total += st.st_size
                if total >= size:
                    return files
    return files


def build_closure(workdir: Path, size: int, n_paths: int) -> str:
    files = pick_files(size)
    per = max(1, len(files) // n_paths)
    lists = []
    for i in range(n_paths):
        chunk = files[i * per : (i + 1) * per] if i < n_paths - 1 else files[i * per :]
        lst = workdir / f"list-{i}.txt"
        lst.write_text("".join(f"{f}\n" for f in chunk))
        lists.append(str(lst))
    expr = workdir / "closure.nix"
    expr.write_text(EXPR)
    args = ["nix-build", str(expr), "--arg", "lists", "[" + " ".join(f'"{x}"' for x in lists) + "]",
            "-o", str(workdir / "result"), "--max-jobs", "4", "--option", "substituters", ""]  # fmt: skip
    return subprocess.run(args, check=True, capture_output=True, text=True).stdout.strip()


def prepare(workdir: Path, size_mb: int, n_paths: int) -> tuple[str, int, int]:
    """The benchmark's closure, built in ``workdir``: (top store path, paths, NAR bytes)."""
    workdir.mkdir(parents=True, exist_ok=True)
    os.environ["NIX_CONFIG"] = "substituters =\nexperimental-features = nix-command\n"
    print("building the closure…", file=sys.stderr)
    top = build_closure(workdir, size_mb << 20, n_paths)
    infos = json.loads(subprocess.run([*NIX, "path-info", "--json", "-r", top], check=True,
                                      capture_output=True, text=True).stdout)  # fmt: skip
    paths, nar_bytes = len(infos), sum(i["narSize"] for i in infos)
    print(f"closure: {paths} paths, {nar_bytes / 1e6:.0f} MB", file=sys.stderr)
    return top, paths, nar_bytes


def delayed(weed: SeaweedFS, latency_ms: int) -> tuple[str, subprocess.Popen[bytes] | None]:
    """The endpoint to use: the server's, or a latency proxy's in front of it (and the proxy)."""
    if not latency_ms:
        return weed.endpoint, None
    port = free_port()
    proxy = subprocess.Popen([sys.executable, str(Path(__file__).with_name("latency_proxy.py")),
                              str(port), str(weed.ports["s3"]), str(latency_ms)])  # fmt: skip
    time.sleep(1)
    return f"http://127.0.0.1:{port}", proxy


def run_measured(args: list[str], env: dict[str, str] | None = None) -> tuple[float, int, str]:
    """(wall seconds, peak RSS in MB of the process and its waited children, stdout)."""
    started = time.monotonic()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    assert proc.stdout is not None
    out = proc.stdout.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{args[0]} failed with {proc.returncode}")
    return time.monotonic() - started, usage.ru_maxrss // 1024, out


def bucket_bytes(s3: object, bucket: str) -> int:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)  # type: ignore[attr-defined]
    return sum(o["Size"] for p in pages for o in p.get("Contents", []))


def hook_latency(workdir: Path, config: Path, runs: int = 40) -> tuple[float, float]:
    """Median and p95 wall time (ms) of the hook script `nixcache hook-script` writes (what
    Nix runs after each build), with a reader on the FIFO as the daemon would be."""
    fifo = workdir / "state" / "fifo"
    fifo.parent.mkdir(parents=True, exist_ok=True)
    if not fifo.exists():
        os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
    hook = workdir / "post-build-hook"
    subprocess.run([sys.executable, "-m", "nixcache.cli", "hook-script", "--config", str(config), str(hook)],
                   check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    drv = next(Path("/nix/store").glob("*-bench-top.drv"))
    env = {**os.environ, "OUT_PATHS": "", "DRV_PATH": str(drv)}
    times = []
    try:
        for _ in range(runs):
            started = time.monotonic()
            subprocess.run([str(hook)], env=env, check=True)
            times.append((time.monotonic() - started) * 1000)
            while True:
                try:
                    os.read(reader, 1 << 16)
                except BlockingIOError:
                    break
    finally:
        os.close(reader)
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.95) - 1]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size-mb", type=int, default=500)
    ap.add_argument("--paths", type=int, default=220)
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "nixcache-bench")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--latency-ms", type=int, default=0,
                    help="one-way delay added to every request by a loopback proxy (a remote bucket)")  # fmt: skip
    ap.add_argument("--compression-level", type=int, default=None,
                    help="zstd level for both tools (default: each tool's default, 3 for both)")  # fmt: skip
    args = ap.parse_args()
    workdir: Path = args.workdir
    top, n_paths, nar_bytes = prepare(workdir, args.size_mb, args.paths)

    weed = SeaweedFS(workdir / f"weed-{os.getpid()}", anonymous_write=True, metrics=True)
    weed.start()
    proxy = None
    try:
        s3 = boto3.client("s3", endpoint_url=weed.endpoint, aws_access_key_id=ACCESS_KEY,
                          aws_secret_access_key=SECRET_KEY, region_name="us-east-1")  # fmt: skip
        key = workdir / "key.sec"
        if not key.exists():
            subprocess.run(["nix-store", "--generate-binary-cache-key", "bench-1", str(key), str(key) + ".pub"],
                           check=True)  # fmt: skip
        creds = workdir / "credentials"
        creds.write_text(f"[default]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n")
        config = workdir / "bench.toml"
        endpoint, proxy = delayed(weed, args.latency_ms)
        rounds = []
        for r in range(args.rounds):
            stamp = f"{int(time.time())}-{r}"
            ours, theirs = f"nixcache-{stamp}", f"nixcopy-{stamp}"
            for b in (ours, theirs):
                s3.create_bucket(Bucket=b)
            config.write_text(
                f'state_dir = "{workdir / "state"}"\nfifo = "{workdir / "state/fifo"}"\n'
                f'[s3]\nbucket = "{ours}"\nendpoint = "{endpoint}"\ncredentials_file = "{creds}"\n'
                f'[signing]\nsecret_key_file = "{key}"\n[upload]\nworkers = {args.workers}\n'
                + (f"compression_level = {args.compression_level}\n" if args.compression_level is not None else "")
            )
            push = [sys.executable, "-m", "nixcache.cli", "push", "--config", str(config), top]
            level = f"&compression-level={args.compression_level}" if args.compression_level is not None else ""
            copy = [*NIX, "copy", "--to", f"{endpoint}/{theirs}?compression=zstd{level}", top]
            # Alternate who goes first, so neither always meets a warmer server.
            runs = {}
            for name in ["nix_copy", "nixcache"] if r % 2 == 0 else ["nixcache", "nix_copy"]:
                print(f"round {r + 1}: {name}…", file=sys.stderr)
                runs[name] = run_measured(push if name == "nixcache" else copy)
            time.sleep(2)  # let the server's counters settle
            ours_req, theirs_req = weed.request_counts(ours), weed.request_counts(theirs)
            again = run_measured(push)
            time.sleep(2)
            rounds.append({
                "nixcache": {"seconds": round(runs["nixcache"][0], 2), "peak_rss_mb": runs["nixcache"][1],
                             "requests": dict(ours_req), "summary": runs["nixcache"][2].strip(),
                             "bucket_mb": round(bucket_bytes(s3, ours) / 1e6, 1),
                             "second_push_seconds": round(again[0], 2),
                             "second_push_requests": dict(weed.request_counts(ours) - ours_req)},
                "nix_copy": {"seconds": round(runs["nix_copy"][0], 2), "peak_rss_mb": runs["nix_copy"][1],
                             "requests": dict(theirs_req),
                             "bucket_mb": round(bucket_bytes(s3, theirs) / 1e6, 1)},
            })  # fmt: skip
    finally:
        if proxy is not None:
            proxy.terminate()
        weed.stop()
    hook_median, hook_p95 = hook_latency(workdir, config)

    def median(tool: str, field: str) -> float:
        return float(statistics.median(r[tool][field] for r in rounds))

    ours_s, nix_s = median("nixcache", "seconds"), median("nix_copy", "seconds")
    result = {
        "paths": n_paths, "nar_mb": round(nar_bytes / 1e6, 1), "rounds": rounds,
        "median_seconds": {"nixcache": ours_s, "nix_copy": nix_s},
        "speedup_median": round(nix_s / ours_s, 2),
        "speedup_per_round": [round(r["nix_copy"]["seconds"] / r["nixcache"]["seconds"], 2) for r in rounds],
        "mb_per_s": {"nixcache": round(nar_bytes / 1e6 / ours_s, 1), "nix_copy": round(nar_bytes / 1e6 / nix_s, 1)},
        "peak_rss_mb": {"nixcache": max(r["nixcache"]["peak_rss_mb"] for r in rounds),
                        "nix_copy": max(r["nix_copy"]["peak_rss_mb"] for r in rounds)},
        "requests_per_path": {
            "nixcache": round(sum(rounds[0]["nixcache"]["requests"].values()) / n_paths, 2),
            "nix_copy": round(sum(rounds[0]["nix_copy"]["requests"].values()) / n_paths, 2)},
        "hook_ms": {"median": round(hook_median, 1), "p95": round(hook_p95, 1)},
        "latency_ms": args.latency_ms,
        "compression_level": args.compression_level if args.compression_level is not None else "default (3)",
        "machine": f"{os.cpu_count()} cores",
        "nix_version": subprocess.run(["nix", "--version"], capture_output=True, text=True).stdout.strip(),
    }  # fmt: skip
    out = ROOT / "bench" / "out"
    out.mkdir(exist_ok=True)
    suffix = f"-level{args.compression_level}" if args.compression_level is not None else ""
    suffix += f"-latency{args.latency_ms}ms" if args.latency_ms else ""
    (out / f"upload{suffix}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()

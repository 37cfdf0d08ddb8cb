"""Upload benchmark: nixcache vs Nix's own uploader (`nix copy --to http://…`), same machine, same run.

    python bench/upload.py [--closure deep|small] [--size-mb N] [--paths N] [--rounds 3]
                           [--latency-ms 0] [--workdir /tmp/nixcache-bench]

Builds a closure of real files from this machine (derivations with references): ``deep``
(default: 500 MB of libraries, docs and Python's lib in 220 paths, each referencing the
previous one and the one at half its index) or ``small`` (tens of thousands of small files:
man pages, C headers, Python and Perl libraries, in 50 paths; per-file work dominates).
Starts a SeaweedFS on loopback and pushes the closure into fresh buckets three ways: `nix
copy --to 'http://…/BUCKET?compression=zstd'`, `nixcache push`, and a running `nixcache
serve` handed the top path on its FIFO (measured from the write to the last upload: the
daemon does not pay start-up). Reports wall time, CPU (user+sys of the tool's own process
and its children; the server excluded), peak RSS and S3 requests per path (SeaweedFS's own
request counters), plus the post-build hook's latency. Writes bench/out/upload*.json.
"""

from __future__ import annotations

import argparse
import compileall
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import boto3

from nixcache.bucket.seaweed import ACCESS_KEY, SECRET_KEY, SeaweedFS, free_port
from nixcache.cli.status import query

ROOT = Path(__file__).resolve().parent.parent
SOURCES = {
    "deep": [Path("/usr/lib"), Path("/usr/share"), Path(sys.prefix) / "lib"],
    "small": [Path("/usr/share/man"), Path("/usr/include"), Path("/usr/lib/python3"), Path("/usr/share/perl"),
              Path("/usr/share/perl5"), Path(sys.prefix) / "lib"],
}  # fmt: skip
LARGEST = {"deep": 64 << 20, "small": 64 << 10}
DEFAULTS = {"deep": (500, 220), "small": (300, 50)}  # (MB, paths)
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


def pick_files(sources: list[Path], size: int, largest: int) -> list[Path]:
    files: list[Path] = []
    total = 0
    for source in sources:
        for dirpath, dirnames, names in os.walk(source):
            dirnames.sort()
            for name in sorted(names):
                p = Path(dirpath, name)
                try:
                    st = p.lstat()
                except OSError:
                    continue
                if not p.is_file() or p.is_symlink() or not os.access(p, os.R_OK) or st.st_size > largest:
                    continue
                files.append(p)
                total += st.st_size
                if total >= size:
                    return files
    return files


def build_closure(workdir: Path, size: int, n_paths: int, kind: str) -> str:
    files = pick_files(SOURCES[kind], size, LARGEST[kind])
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


def prepare(workdir: Path, size_mb: int, n_paths: int, kind: str = "deep") -> tuple[str, int, int]:
    """The benchmark's closure, built in ``workdir`` (``deep``) or a subdirectory of it:
    (top store path, paths, NAR bytes)."""
    where = workdir if kind == "deep" else workdir / kind
    where.mkdir(parents=True, exist_ok=True)
    os.environ["NIX_CONFIG"] = "substituters =\nexperimental-features = nix-command\n"
    print(f"building the {kind} closure…", file=sys.stderr)
    top = build_closure(where, size_mb << 20, n_paths, kind)
    infos = json.loads(subprocess.run([*NIX, "path-info", "--json", "-r", top], check=True,
                                      capture_output=True, text=True).stdout)  # fmt: skip
    paths, nar_bytes = len(infos), sum(i["narSize"] for i in infos)
    files = sum(1 for info in infos for _ in Path(info["path"]).rglob("*"))
    print(f"closure: {paths} paths, {files} files, {nar_bytes / 1e6:.0f} MB", file=sys.stderr)
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


def run_measured(args: list[str], env: dict[str, str] | None = None) -> tuple[float, int, str, float]:
    """(wall seconds, peak RSS in MB of the process and its waited children, stdout, CPU
    seconds: user+sys of the process and its waited children)."""
    started = time.monotonic()
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    assert proc.stdout is not None
    out = proc.stdout.read().decode()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"{args[0]} failed with {proc.returncode}")
    return time.monotonic() - started, usage.ru_maxrss // 1024, out, usage.ru_utime + usage.ru_stime


def cpu_seconds(pid: int) -> float:
    """User+sys CPU of a running process (its waited children included)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(f) for f in fields[11:15]) / os.sysconf("SC_CLK_TCK")


def peak_rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text().splitlines()
    return int(next(line for line in status if line.startswith("VmHWM")).split()[1]) / 1024


def daemon_status(state: Path) -> dict[str, object]:
    """What `nixcache status --json` shows, from the control socket (no Python start-up)."""
    return dict(json.loads(query(str(state / "control.sock"))))


def run_daemon(
    config: Path, state: Path, top: str, n_paths: int, log: Path, profile: Path | None = None
) -> tuple[float, int, str, float]:
    """`nixcache serve` started (not measured), then handed ``top`` on its FIFO as the
    post-build hook would: (wall seconds until every path is uploaded, peak RSS in MB over
    the whole run (VmHWM), the daemon's S3 requests as JSON, CPU seconds from the write on).
    With ``profile``, py-spy samples the daemon (every thread, native frames) meanwhile and
    writes its raw stacks there."""
    with open(log, "w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "nixcache.cli", "serve", "--config", str(config)],
                                stdout=subprocess.DEVNULL, stderr=err)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not (state / "control.sock").exists():
            if time.monotonic() > deadline or proc.poll() is not None:
                raise SystemExit(f"the daemon did not start (see {log})")
            time.sleep(0.05)
        spy = None
        if profile is not None:
            spy = subprocess.Popen(["py-spy", "record", "--pid", str(proc.pid), "--rate", "100", "--native",
                                    "--format", "raw", "--output", str(profile)],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        time.sleep(0.5 if spy is None else 2)  # its start-up requests (cache info, records) are done
        before, cpu_before = daemon_status(state), cpu_seconds(proc.pid)
        started = time.monotonic()
        fd = os.open(state / "fifo", os.O_WRONLY | os.O_NONBLOCK)
        os.write(fd, f"{top}\n".encode())
        os.close(fd)
        while True:
            time.sleep(0.1)  # each status costs the daemon ~1 ms of CPU: not 50 a second
            now = daemon_status(state)
            if now["uploaded"] - before["uploaded"] >= n_paths and not now["in_flight"] and not now["pending"]:  # type: ignore[operator]
                break
            if now["failing"] or time.monotonic() - started > 900 or proc.poll() is not None:
                raise SystemExit(f"the daemon's push failed: {now.get('failures')} (see {log})")
        seconds, cpu, rss = time.monotonic() - started, cpu_seconds(proc.pid) - cpu_before, peak_rss_mb(proc.pid)
        if spy is not None:
            spy.send_signal(signal.SIGINT)
            spy.wait(60)
        requests = {op: n - before["requests"].get(op, 0) for op, n in now["requests"].items()}  # type: ignore[attr-defined]
        return seconds, int(rss), json.dumps(requests), cpu
    finally:
        proc.terminate()
        proc.wait(60)


def bucket_bytes(s3: object, bucket: str) -> int:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket)  # type: ignore[attr-defined]
    return sum(o["Size"] for p in pages for o in p.get("Contents", []))


def hook_latency(workdir: Path, config: Path, fifo: Path, runs: int = 40) -> tuple[float, float]:
    """Median and p95 wall time (ms) of the hook script `nixcache hook-script` writes (what
    Nix runs after each build), with a reader on the FIFO as the daemon would be."""
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
    ap.add_argument("--closure", choices=sorted(SOURCES), default="deep")
    ap.add_argument("--size-mb", type=int, default=None, help="default: 500 (deep), 300 (small)")
    ap.add_argument("--paths", type=int, default=None, help="default: 220 (deep), 50 (small)")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "nixcache-bench")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--latency-ms", type=int, default=0,
                    help="one-way delay added to every request by a loopback proxy (a remote bucket)")  # fmt: skip
    ap.add_argument("--compression-level", type=int, default=None,
                    help="zstd level for both tools (default: each tool's default, 3 for both)")  # fmt: skip
    ap.add_argument("--tools", default="nix_copy,push,daemon", help="which of nix_copy,push,daemon to run")
    ap.add_argument("--profile", type=Path, default=None,
                    help="py-spy the daemon's push (all threads, native frames) into this raw stacks file")  # fmt: skip
    args = ap.parse_args()
    # Bytecode as an installed package has it (pip and Nix compile it): where
    # PYTHONDONTWRITEBYTECODE is set, every `nixcache` start would compile its own sources.
    compileall.compile_dir(ROOT / "nixcache", quiet=1)
    workdir: Path = args.workdir
    size_mb, paths = DEFAULTS[args.closure]
    top, n_paths, nar_bytes = prepare(workdir, args.size_mb or size_mb, args.paths or paths, args.closure)
    tools = args.tools.split(",")

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
        endpoint, proxy = delayed(weed, args.latency_ms)
        level = f"compression_level = {args.compression_level}\n" if args.compression_level is not None else ""

        def configure(name: str, bucket: str) -> tuple[Path, Path]:
            """A config of its own (state, FIFO, no roots, no collection) per tool and round."""
            state = workdir / f"state-{name}"
            shutil.rmtree(state, ignore_errors=True)
            (state / "gcroots").mkdir(parents=True)
            config = workdir / f"bench-{name}.toml"
            config.write_text(
                f'state_dir = "{state}"\nfifo = "{state / "fifo"}"\ngcroots_dir = "{state / "gcroots"}"\n'
                f'profiles_dir = ""\n[s3]\nbucket = "{bucket}"\nendpoint = "{endpoint}"\n'
                f'credentials_file = "{creds}"\n[signing]\nsecret_key_file = "{key}"\n'
                f"[upload]\nworkers = {args.workers}\n{level}[gc]\ndereference = false\ncollect = false\n"
            )
            return config, state

        rounds = []
        for r in range(args.rounds):
            stamp = f"{int(time.time())}-{r}"
            buckets = {name: f"{name.replace('_', '')}-{stamp}" for name in tools}
            runs = {}
            # Rotate who goes first, so none always meets a warmer (or more loaded) server.
            for name in tools[r % len(tools) :] + tools[: r % len(tools)]:
                s3.create_bucket(Bucket=buckets[name])
                print(f"round {r + 1}: {name}…", file=sys.stderr)
                if name == "nix_copy":
                    zstd = f"&compression-level={args.compression_level}" if args.compression_level is not None else ""
                    copy = [*NIX, "copy", "--to", f"{endpoint}/{buckets[name]}?compression=zstd{zstd}", top]
                    runs[name] = run_measured(copy)
                    continue
                config, state = configure(name, buckets[name])
                if name == "push":
                    runs[name] = run_measured([sys.executable, "-m", "nixcache.cli", "push", "--config",
                                               str(config), top])  # fmt: skip
                else:
                    runs[name] = run_daemon(config, state, top, n_paths, workdir / "daemon.log", args.profile)
            time.sleep(2)  # let the server's counters settle
            counts = {name: weed.request_counts(b) for name, b in buckets.items()}
            row = {
                name: {"seconds": round(run[0], 2), "cpu_seconds": round(run[3], 2), "peak_rss_mb": run[1],
                       "requests": dict(counts[name]), "bucket_mb": round(bucket_bytes(s3, buckets[name]) / 1e6, 1),
                       "summary": run[2].strip()}
                for name, run in runs.items()
            }  # fmt: skip
            if "push" in runs:  # the same closure again: nothing to do
                config, _ = configure("push", buckets["push"])
                again = run_measured([sys.executable, "-m", "nixcache.cli", "push", "--config", str(config), top])
                time.sleep(2)
                row["push"]["second_push_seconds"] = round(again[0], 2)
                row["push"]["second_push_requests"] = dict(weed.request_counts(buckets["push"]) - counts["push"])
            rounds.append(row)
    finally:
        if proxy is not None:
            proxy.terminate()
        weed.stop()
        shutil.rmtree(weed.data_dir, ignore_errors=True)  # GBs of volumes per run
    hook = None
    if "push" in tools:
        config, state = configure("push", "unused")
        hook = hook_latency(workdir, config, state / "fifo")

    def median(tool: str, field: str) -> float:
        return float(statistics.median(r[tool][field] for r in rounds))

    gb = nar_bytes / 1e9
    result: dict[str, object] = {
        "closure": args.closure, "paths": n_paths, "nar_mb": round(nar_bytes / 1e6, 1), "rounds": rounds,
        "median_seconds": {t: median(t, "seconds") for t in tools},
        "median_cpu_seconds_per_gb": {t: round(median(t, "cpu_seconds") / gb, 2) for t in tools},
        "mb_per_s": {t: round(nar_bytes / 1e6 / median(t, "seconds"), 1) for t in tools},
        "peak_rss_mb": {t: max(r[t]["peak_rss_mb"] for r in rounds) for t in tools},
        "requests_per_path": {t: round(sum(rounds[0][t]["requests"].values()) / n_paths, 2) for t in tools},
        # The daemon's own count from the FIFO write on (SeaweedFS's includes its start-up's).
        "daemon_push_requests_per_path": round(sum(json.loads(rounds[0]["daemon"]["summary"]).values()) / n_paths, 3)
        if "daemon" in tools else None,
        "bucket_mb": {t: rounds[0][t]["bucket_mb"] for t in tools},
        "latency_ms": args.latency_ms,
        "compression_level": args.compression_level if args.compression_level is not None else "default (3)",
        "machine": f"{os.cpu_count()} cores",
        "nix_version": subprocess.run(["nix", "--version"], capture_output=True, text=True).stdout.strip(),
    }  # fmt: skip
    if "nix_copy" in tools:
        for t in tools:
            if t != "nix_copy":
                result[f"speedup_{t}"] = {
                    "median": round(median("nix_copy", "seconds") / median(t, "seconds"), 2),
                    "per_round": [round(r["nix_copy"]["seconds"] / r[t]["seconds"], 2) for r in rounds],
                    "cpu_ratio_median": round(median("nix_copy", "cpu_seconds") / median(t, "cpu_seconds"), 2),
                }
    if hook is not None:
        result["hook_ms"] = {"median": round(hook[0], 1), "p95": round(hook[1], 1)}
    out = ROOT / "bench" / "out"
    out.mkdir(exist_ok=True)
    suffix = "" if args.closure == "deep" else f"-{args.closure}"
    suffix += f"-level{args.compression_level}" if args.compression_level is not None else ""
    suffix += f"-latency{args.latency_ms}ms" if args.latency_ms else ""
    (out / f"upload{suffix}.json").write_text(json.dumps(result, indent=2))
    print(json.dumps({k: v for k, v in result.items() if k != "rounds"}, indent=2))
    print(f"\n| {args.closure}: {n_paths} paths, {nar_bytes / 1e6:.0f} MB | wall | CPU s/GB | peak RSS | req/path |")
    print("|---|---|---|---|---|")
    for t in tools:
        print(f"| {t} | {median(t, 'seconds'):.2f} s | {median(t, 'cpu_seconds') / gb:.2f} | "
              f"{result['peak_rss_mb'][t]} MB | {result['requests_per_path'][t]} |")  # type: ignore[index]  # fmt: skip


if __name__ == "__main__":
    main()

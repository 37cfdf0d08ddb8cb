"""What the bucket-consistency mechanism costs in S3 requests, by operation (issue 10).

    python bench/gc_costs.py [--paths 50]

Starts SeaweedFS on loopback, makes ``--paths`` store paths with real Nix (a chain: each
references the previous one), and runs the real CLI of two hosts (alpha, beta) sharing one
bucket, printing each command's own request count (nixcache counts every HTTP request,
retries included). Writes bench/out/gc_costs.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import boto3

from nixcache.bucket.seaweed import ACCESS_KEY, SECRET_KEY, SeaweedFS

ROOT = Path(__file__).resolve().parent.parent

CHAIN = r"""
{ n, seed }:
let
  link = i: derivation {
    name = "cost-${toString i}";
    inherit seed;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    PATH = "/usr/bin:/bin";
    prev = if i == 0 then "" else paths.${toString (i - 1)};
    args = [ "-c" "mkdir $out; echo ${toString i} $seed > $out/i; echo $prev > $out/prev" ];
  };
  paths = builtins.listToAttrs (builtins.genList (i: { name = toString i; value = link i; }) n);
in paths.${toString (n - 1)}
"""


def requests_of(output: str) -> dict[str, int]:
    """The counts a command printed: ``S3 requests: {'Op': n}`` or ``S3 requests: Op n, Op n``."""
    found = re.findall(r"S3 requests: (\{.*?\})", output)
    if found:
        return {k: int(v) for k, v in json.loads(found[-1].replace("'", '"')).items()}
    plain = re.findall(r"S3 requests: (.*)$", output.strip())
    return {op: int(n) for op, n in re.findall(r"(\w+) (\d+)", plain[-1])} if plain else {}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--paths", type=int, default=50)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="nixcache-gc-costs-"))
    weed = SeaweedFS(work / "weed")
    weed.start()
    rows: list[tuple[str, dict[str, int]]] = []
    try:
        bucket = f"costs-{uuid.uuid4().hex[:8]}"
        boto3.client("s3", endpoint_url=weed.endpoint, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
                     region_name="us-east-1").create_bucket(Bucket=bucket)  # fmt: skip
        (work / "chain.nix").write_text(CHAIN)
        top = subprocess.run(
            ["nix-build", str(work / "chain.nix"), "--arg", "n", str(args.paths), "--argstr", "seed", uuid.uuid4().hex,
             "--no-out-link", "--option", "substituters", ""],
            check=True, capture_output=True, text=True,
        ).stdout.strip()  # fmt: skip
        key = work / "key.sec"
        subprocess.run(["nix-store", "--generate-binary-cache-key", "costs-1", str(key), str(work / "key.pub")],
                       check=True)  # fmt: skip
        (work / "credentials").write_text(
            f"[default]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n"
        )
        configs = {}
        for host in ("alpha", "beta", "gamma"):
            (work / host / "gcroots").mkdir(parents=True)
            configs[host] = work / host / "config.toml"
            configs[host].write_text(
                f'hostname = "{host}"\nstate_dir = "{work / host / "state"}"\nfifo = "{work / host / "fifo"}"\n'
                f'gcroots_dir = "{work / host / "gcroots"}"\nprofiles_dir = ""\n'
                f'[s3]\nbucket = "{bucket}"\nendpoint = "{weed.endpoint}"\n'
                f'credentials_file = "{work / "credentials"}"\n'
                f'[signing]\nsecret_key_file = "{key}"\n[gc]\ngrace_period = 0\n'
            )

        def run(label: str, host: str, *cmd: str) -> None:
            out = subprocess.run([sys.executable, "-m", "nixcache.cli", *cmd, "--config", str(configs[host])],
                                 capture_output=True, text=True)  # fmt: skip
            if out.returncode != 0:
                raise SystemExit(f"{label}: {out.stdout}{out.stderr}")
            rows.append((label, requests_of(out.stdout)))

        run(f"push {args.paths} new paths (alpha)", "alpha", "push", top)
        run(f"push the same {args.paths} paths again (alpha, new process)", "alpha", "push", top)
        (work / "alpha" / "gcroots" / "top").symlink_to(top)
        run("publish one root, closure present (alpha, new process)", "alpha", "publish")
        run("publish, nothing changed (alpha)", "alpha", "publish")
        run("dereference, nothing gone (alpha)", "alpha", "dereference")
        run("gc, empty trash (alpha)", "alpha", "gc")
        (work / "alpha" / "gcroots" / "top").unlink()
        run("dereference, one root gone (alpha)", "alpha", "dereference")
        run(f"gc deleting {args.paths} paths: first on this bucket (probe), index warm (alpha)", "alpha", "gc")
        rows.append(("", {}))
        run(f"push the {args.paths} collected paths (beta: a new host, uploads them)", "beta", "push", top)
        (work / "beta" / "gcroots" / "top").symlink_to(top)
        run("publish (beta)", "beta", "publish")
        (work / "beta" / "gcroots" / "top").unlink()
        run("dereference (beta)", "beta", "dereference")
        run(f"gc on a host that never saw these {args.paths} narinfos (gamma): the index's one-time GETs",
            "gamma", "gc")  # fmt: skip
    finally:
        weed.stop()
    table = ["| operation | requests |", "|---|---|"]
    for label, reqs in rows:
        if not label:
            continue
        table.append(f"| {label} | {', '.join(f'{k} {v}' for k, v in sorted(reqs.items()))} (= {sum(reqs.values())}) |")
    out = ROOT / "bench" / "out"
    out.mkdir(exist_ok=True)
    (out / "gc_costs.json").write_text(json.dumps({"paths": args.paths, "rows": rows}, indent=2))
    print("\n".join(table))


if __name__ == "__main__":
    main()

"""Test harness: real S3 servers (SeaweedFS, moto), real Nix builds, the daemon as a process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import boto3
from botocore.config import Config as BotoConfig

from nixcache.bucket.seaweed import ACCESS_KEY, SECRET_KEY, free_port

NIX = ["nix", "--extra-experimental-features", "nix-command"]
BIN = Path(sys.executable).parent
HOOK = BIN / "nixcache-hook"


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class MotoServer:
    """moto's AWS-faithful S3 server on a free loopback port."""

    def __init__(self, log_dir: Path) -> None:
        self.port = free_port()
        self.log = (log_dir / "moto.log").open("ab")
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        import urllib.request

        def up() -> bool:
            try:
                urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=1).close()
                return True
            except OSError:
                return False

        wait_until(up, 30, "moto server")

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=20)


@dataclass
class Bucket:
    """A fresh bucket on a real server, with a boto3 client for assertions."""

    endpoint: str
    name: str

    @property
    def client(self) -> Any:
        return boto3.client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
            aws_secret_access_key=SECRET_KEY, region_name="us-east-1",
            config=BotoConfig(retries={"max_attempts": 1}, s3={"addressing_style": "path"}),
        )  # fmt: skip

    @property
    def url(self) -> str:
        """What a Nix client substitutes from (anonymous HTTP)."""
        return f"{self.endpoint}/{self.name}"

    def keys(self, prefix: str = "") -> list[str]:
        out: list[str] = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.name, Prefix=prefix):
            out += [o["Key"] for o in page.get("Contents", [])]
        return out

    def gcinfos(self, prefix: str) -> list[str]:
        """The gcinfo keys under ``prefix`` (not a host's ``.claim``)."""
        return [k for k in self.keys(prefix) if k.endswith(".gcinfo.gz")]

    def get(self, key: str) -> bytes | None:
        try:
            return self.client.get_object(Bucket=self.name, Key=key)["Body"].read()  # type: ignore[no-any-return]
        except self.client.exceptions.NoSuchKey:
            return None

    def has_narinfo(self, store_path: str) -> bool:
        return self.get(hash_part(store_path) + ".narinfo") is not None


def new_bucket(endpoint: str, public_read_policy: bool = False) -> Bucket:
    """A new bucket. On AWS-faithful servers objects are private unless a policy says
    otherwise: ``public_read_policy`` adds the policy a public Nix cache on AWS uses."""
    b = Bucket(endpoint, f"t-{uuid.uuid4().hex[:16]}")
    b.client.create_bucket(Bucket=b.name)
    if public_read_policy:
        policy = {
            "Version": "2012-10-17",
            # AWS authorises HEAD as s3:GetObject; moto 5 checks a non-AWS "s3:HeadObject".
            "Statement": [{"Effect": "Allow", "Principal": "*", "Action": ["s3:GetObject", "s3:HeadObject"],
                           "Resource": f"arn:aws:s3:::{b.name}/*"}],
        }  # fmt: skip
        b.client.put_bucket_policy(Bucket=b.name, Policy=json.dumps(policy))
    return b


def hash_part(store_path: str) -> str:
    return Path(store_path).name.split("-", 1)[0]


def generate_key(tmp: Path, name: str) -> tuple[Path, str]:
    """A signing key made by real Nix: (secret key file, public key text)."""
    secret, public = tmp / f"{name}.sec", tmp / f"{name}.pub"
    subprocess.run(["nix-store", "--generate-binary-cache-key", name, str(secret), str(public)], check=True)
    return secret, public.read_text().strip()


def write_credentials(tmp: Path) -> Path:
    path = tmp / "credentials"
    path.write_text(f"[default]\naws_access_key_id = {ACCESS_KEY}\naws_secret_access_key = {SECRET_KEY}\n")
    return path


def toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return str(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    return json.dumps(str(v))


def write_config(path: Path, settings: dict[str, Any]) -> Path:
    top = {k: v for k, v in settings.items() if not isinstance(v, dict)}
    lines = [f"{k} = {toml_value(v)}" for k, v in top.items()]
    for section, values in settings.items():
        if isinstance(values, dict):
            lines.append(f"[{section}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


def base_settings(tmp: Path, bucket: Bucket, secret_key: Path, **upload: Any) -> dict[str, Any]:
    (tmp / "gcroots").mkdir(exist_ok=True)
    return {
        "hostname": "testhost",
        "state_dir": str(tmp / "state"),
        "fifo": str(tmp / "run" / "hook.fifo"),
        "gcroots_dir": str(tmp / "gcroots"),
        "profiles_dir": "",
        "roots": {"debounce": 0.2},
        "gc": {"dereference_interval": 3600},
        "s3": {
            "bucket": bucket.name,
            "endpoint": bucket.endpoint,
            "credentials_file": str(write_credentials(tmp)),
            "max_attempts": 3,
            "connect_timeout": 2,
        },
        "signing": {"secret_key_file": str(secret_key)},
        "upload": {"workers": 4, "retry_interval": 2, "spool_interval": 1, **upload},
    }


class Daemon:
    """``nixcache serve`` as a real process; its JSON log lines are parsed for events."""

    running: ClassVar[list[Daemon]] = []  # killed after each test, whatever the outcome

    def __init__(self, config: Path, log: Path) -> None:
        self.config = config
        self.log_path = log
        self.process: subprocess.Popen[bytes] | None = None
        self._offset = 0

    def start(self, wait_ready: bool = True, env: dict[str, str] | None = None) -> Daemon:
        self._offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        self.process = subprocess.Popen(
            [sys.executable, "-m", "nixcache.cli", "serve", "--config", str(self.config)],
            stdout=subprocess.DEVNULL, stderr=self.log_path.open("ab"), stdin=subprocess.DEVNULL,
            env={**os.environ, **(env or {})},
        )  # fmt: skip
        Daemon.running.append(self)
        if wait_ready:
            self.wait_event("service.ready", 30)
        return self

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        out = []
        with self.log_path.open("rb") as f:
            f.seek(self._offset)
            for raw in f:
                try:
                    ev = json.loads(raw)
                except ValueError:
                    continue
                if name is None or ev.get("event") == name:
                    out.append(ev)
        return out

    def wait_event(self, name: str, timeout: float, count: int = 1) -> list[dict[str, Any]]:
        def seen() -> list[dict[str, Any]] | None:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"daemon exited ({self.process.returncode}): {self.log_path.read_text()[-3000:]}")
            evs = self.events(name)
            return evs if len(evs) >= count else None

        return wait_until(seen, timeout, f"event {name} x{count}")  # type: ignore[no-any-return]

    def signal(self, sig: int) -> None:
        assert self.process is not None
        self.process.send_signal(sig)

    def stop(self) -> int:
        """SIGTERM and wait: the daemon must drain and exit 0."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)

    def kill9(self) -> None:
        assert self.process is not None
        self.process.kill()
        self.process.wait()

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


DERIVATIONS = r"""
{ seed, size ? 0 }:
let
  mk = name: deps: derivation {
    inherit name seed deps size;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    PATH = "/usr/bin:/bin";
    args = [ "-c" ''
      mkdir -p $out/share
      echo ${name} $seed > $out/share/name
      for d in $deps; do echo $d >> $out/share/deps; done
      if [ "$size" -gt 0 ]; then head -c $size /dev/urandom > $out/share/blob; fi
      printf '#!/bin/sh\necho hi\n' > $out/run; chmod +x $out/run
    '' ];
  };
  lib = mk "nixcache-test-lib" [ ];
  tool = mk "nixcache-test-tool" [ lib ];
in mk "nixcache-test-app" [ lib tool ]
"""


def write_hook_script(tmp: Path, config: Path) -> Path:
    """What NixOS would put in post-build-hook: the hook with our config."""
    script = tmp / "post-build-hook.sh"
    subprocess.run([str(BIN / "nixcache"), "hook-script", "--config", str(config), str(script)], check=True)
    return script


def run_cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "nixcache.cli", *args, "--config", str(config)], capture_output=True, text=True
    )


def nix_build(tmp: Path, hook: Path | None = None, size: int = 0, out: str = "result") -> list[str]:
    """Build three derivations with references (unique per call); return the closure of the top."""
    expr = tmp / "drvs.nix"
    expr.write_text(DERIVATIONS)
    args = ["nix-build", str(expr), "--argstr", "seed", uuid.uuid4().hex, "--arg", "size", str(size),
            "-o", str(tmp / out), "--option", "substituters", ""]  # fmt: skip
    if hook is not None:
        args += ["--option", "post-build-hook", str(hook)]
    top = subprocess.run(args, check=True, capture_output=True, text=True).stdout.strip()
    closure = subprocess.run(["nix-store", "-qR", top], check=True, capture_output=True, text=True)
    return closure.stdout.split()


def add_blob(tmp: Path, size: int, name: str = "blob") -> str:
    """A store path of ``size`` random (incompressible) bytes, added with nix-store --add."""
    path = tmp / f"{name}-{uuid.uuid4().hex[:8]}"
    with path.open("wb") as f:
        for _ in range(size >> 20):
            f.write(os.urandom(1 << 20))
        f.write(os.urandom(size & ((1 << 20) - 1)))
    out = subprocess.run(["nix-store", "--add", str(path)], check=True, capture_output=True, text=True)
    path.unlink()
    return out.stdout.strip()


def nix_copy_from(bucket: Bucket, paths: list[str], dest: Path, public_key: str) -> subprocess.CompletedProcess[str]:
    """Substitute ``paths`` from the bucket over HTTP into a fresh store, signatures required."""
    return subprocess.run(
        [*NIX, "copy", "--from", bucket.url, "--to", str(dest), "--option", "require-sigs", "true",
         "--option", "trusted-public-keys", public_key, *paths],
        capture_output=True, text=True,
    )  # fmt: skip


def dangling_narinfos(bucket: Bucket) -> list[str]:
    """narinfos in the bucket whose NAR is missing (must always be empty)."""
    keys = set(bucket.keys())
    bad = []
    for key in keys:
        if key.endswith(".narinfo"):
            text = bucket.get(key)
            if text is None:
                continue
            url = next(ln.split(": ", 1)[1] for ln in text.decode().splitlines() if ln.startswith("URL: "))
            if url not in keys:
                bad.append(key)
    return bad


PAIR = r"""
{ seed }:
let
  mk = name: deps: derivation {
    inherit name seed deps;
    system = builtins.currentSystem;
    builder = "/bin/sh";
    PATH = "/usr/bin:/bin";
    args = [ "-c" ''
      mkdir -p $out; echo ${name} $seed > $out/name
      for d in $deps; do echo $d >> $out/deps; done
    '' ];
  };
  shared = mk "nixcache-shared" [ ];
in {
  one = mk "nixcache-one" [ shared (mk "nixcache-one-dep" [ ]) ];
  two = mk "nixcache-two" [ shared (mk "nixcache-two-dep" [ ]) ];
}
"""


def build_pair(tmp: Path) -> tuple[str, str, str]:
    """Two roots sharing one dependency: (root one, root two, the shared path)."""
    expr = tmp / "pair.nix"
    expr.write_text(PAIR)
    out = subprocess.run(
        ["nix-build", str(expr), "--argstr", "seed", uuid.uuid4().hex, "--no-out-link",
         "--option", "substituters", ""],
        check=True, capture_output=True, text=True,
    ).stdout.split()  # fmt: skip
    one, two = out
    shared = next(p for p in closure_of(one) if p.endswith("-nixcache-shared"))
    return one, two, shared


def closure_of(path: str) -> list[str]:
    return subprocess.run(["nix-store", "-qR", path], check=True, capture_output=True, text=True).stdout.split()

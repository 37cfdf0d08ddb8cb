"""``nixcache serve --embedded``: a complete setup on loopback with no cloud account.

Starts a SeaweedFS server (data, ports and a generated signing key kept in the state
dir, so restarts reuse them), creates the bucket and returns the config to serve with.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from nixcache.bucket.s3 import S3
from nixcache.bucket.seaweed import ACCESS_KEY, SECRET_KEY, SeaweedFS
from nixcache.config import Config, load_config
from nixcache.formats.signing import SecretKey
from nixcache.local.journal import write_atomic

BUCKET = "nixcache"


def prepare(state_dir: Path) -> tuple[Config, Path, SeaweedFS]:
    """Start (or restart) the embedded server; write its credentials, key and config file."""
    state_dir.mkdir(parents=True, exist_ok=True)
    weed = SeaweedFS(state_dir / "seaweedfs")
    ports_file = state_dir / "seaweedfs-ports.json"
    if ports_file.exists():
        weed.ports = {k: int(v) for k, v in json.loads(ports_file.read_text()).items()}
    weed.start()
    write_atomic(ports_file, json.dumps(weed.ports).encode())
    creds = state_dir / "credentials"
    write_atomic(creds, f"[default]\naws_access_key_id = {ACCESS_KEY}\n"
                        f"aws_secret_access_key = {SECRET_KEY}\n".encode())  # fmt: skip
    creds.chmod(0o600)
    key_file = state_dir / "signing.key"
    if not key_file.exists():
        key = SecretKey.generate("nixcache-embedded-1")
        write_atomic(key_file, key.render().encode())
        key_file.chmod(0o600)
        (state_dir / "signing.pub").write_text(str(key.public) + "\n")
    config = state_dir / "config.toml"
    (state_dir / "gcroots").mkdir(exist_ok=True)
    # Trying it out must not publish (and push) every GC root of the machine: only the links
    # put in <state_dir>/gcroots count.
    settings = {
        "state_dir": str(state_dir),
        "fifo": str(state_dir / "hook.fifo"),
        "gcroots_dir": str(state_dir / "gcroots"),
        "profiles_dir": "",
        "s3": {"bucket": BUCKET, "endpoint": weed.endpoint, "credentials_file": str(creds)},
        "signing": {"secret_key_file": str(key_file)},
    }
    config.write_text(tomli_w.dumps(settings))
    cfg, _ = load_config(config)
    return cfg, config, weed


async def create_bucket(cfg: Config) -> None:
    async with S3(cfg.s3) as s3:
        await s3.create_bucket()


@dataclass(frozen=True)
class Setup:
    """What `nixcache serve --embedded` serves with, and tells the user to point Nix at."""

    cfg: Config
    config_file: Path
    endpoint: str
    public_key: str


@contextlib.contextmanager
def running(state_dir: Path) -> Iterator[Setup]:
    """The embedded server up and its bucket created, for the time of the block."""
    cfg, config_file, weed = prepare(state_dir)
    try:
        asyncio.run(create_bucket(cfg))
        public_key = (state_dir / "signing.pub").read_text().strip()
        yield Setup(cfg, config_file, weed.endpoint, public_key)
    finally:
        weed.stop()

"""Default locations, shared by the config model and the stdlib-only hook."""

from __future__ import annotations

CONFIG_FILE = "/etc/nixcache/config.toml"
CONFIG_ENV = "NIXCACHE_CONFIG"
STATE_DIR = "/var/lib/nixcache"
FIFO = "/run/nixcache/hook.fifo"
STORE_DIR = "/nix/store"
GCROOTS_DIR = "/nix/var/nix/gcroots"
PROFILES_DIR = "/nix/var/nix/profiles"
MACHINE_ID_FILE = "/etc/machine-id"


def spool_dir(state_dir: str) -> str:
    """Where the hook leaves paths when the daemon is not reading the FIFO."""
    return f"{state_dir}/spool"

"""Every key name in the bucket, in one place."""

from __future__ import annotations

CACHE_INFO = "nix-cache-info"

COMPRESSION_EXTENSIONS = {"zstd": ".zst", "xz": ".xz", "none": ""}


def hash_part(store_path: str) -> str:
    """``/nix/store/<hash>-<name>`` → ``<hash>``."""
    return store_path.rsplit("/", 1)[-1].split("-", 1)[0]


def narinfo_key(store_path: str) -> str:
    return f"{hash_part(store_path)}.narinfo"


def nar_key(nar_hash_nix32: str, compression: str) -> str:
    """NARs are named by their uncompressed hash: identical contents share one file,
    and the name is known before the upload starts (no copy after hashing)."""
    return f"nar/{nar_hash_nix32}.nar{COMPRESSION_EXTENSIONS[compression]}"


def cache_info(store_dir: str, priority: int) -> str:
    return f"StoreDir: {store_dir}\nWantMassQuery: 1\nPriority: {priority}\n"

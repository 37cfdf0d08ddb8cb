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


GCINFO_SUFFIX = ".gcinfo.gz"
ROOTS_PREFIX = "gcroots/"
TRASH_PREFIX = "gctrash/"


def gcinfo_name(store_path: str) -> str:
    """``/nix/store/<hash>-<name>`` → ``<name>-<hash>.gcinfo.gz`` (the original design's name)."""
    base = store_path.rsplit("/", 1)[-1]
    digest, _, name = base.partition("-")
    return f"{name}-{digest}{GCINFO_SUFFIX}"


def store_path_of_gcinfo(name: str, store_dir: str) -> str | None:
    """Inverse of :func:`gcinfo_name` (None for a name that is not one)."""
    if not name.endswith(GCINFO_SUFFIX):
        return None
    stem = name[: -len(GCINFO_SUFFIX)]
    pname, _, digest = stem.rpartition("-")
    if len(digest) != 32 or not pname:
        return None
    return f"{store_dir}/{digest}-{pname}"


CLAIM = ".claim"
"""``gcroots/<hostname>/.claim``: the machine id of the host that publishes there."""


def roots_folder(hostname: str) -> str:
    return f"{ROOTS_PREFIX}{hostname}/"


def trash_folder(hostname: str) -> str:
    return f"{TRASH_PREFIX}{hostname}/"


GC_LEASE = "gc.lease"
NAR_PREFIX = "nar/"


def nar_candidates(nar_hash_nix32: str) -> list[str]:
    """Every key a NAR with this hash may have (one per compression)."""
    return [nar_key(nar_hash_nix32, c) for c in COMPRESSION_EXTENSIONS]


def hash_of_narinfo_key(key: str) -> str | None:
    """``<hash>.narinfo`` → ``<hash>``; None for any other key."""
    if "/" in key or not key.endswith(".narinfo"):
        return None
    digest = key[: -len(".narinfo")]
    return digest if len(digest) == 32 else None


def hash_of_nar_key(key: str) -> str | None:
    """``nar/<narHash>.nar[.ext]`` → ``<narHash>`` (nix32); None for any other key."""
    if not key.startswith(NAR_PREFIX):
        return None
    name = key[len(NAR_PREFIX) :]
    digest, sep, _ = name.partition(".nar")
    return digest if sep and len(digest) == 52 else None


NIX32_CHARS = frozenset("0123456789abcdfghijklmnpqrsvwxyz")


def served_key(path: str) -> str | None:
    """The key a binary-cache client may read at URL path ``path`` (``/nix-cache-info``,
    ``/<hash>.narinfo``, ``/nar/<hash>.nar[.ext]``); None for anything else: no listing, no
    ``gcroots/``, ``gctrash/``, ``gc/``, and no path trick (every character is checked)."""
    if not path.startswith("/"):
        return None
    key = path[1:]
    if key == CACHE_INFO:
        return key
    digest = hash_of_narinfo_key(key)
    if digest is not None:
        return key if set(digest) <= NIX32_CHARS else None
    digest = hash_of_nar_key(key)
    if digest is None or not set(digest) <= NIX32_CHARS:
        return None
    extension = key[len(NAR_PREFIX) + len(digest) + len(".nar") :]
    return key if extension in ("", ".xz", ".zst", ".bz2", ".br", ".lz4", ".gz") else None


MAX_PARTS = 10_000
"""S3's (and R2's, B2's…) limit on the parts of one multipart upload."""


def part_size(configured: int, nar_size: int) -> int:
    """The part size for a NAR of ``nar_size`` bytes: ``configured``, or more if its
    compressed form could need more than MAX_PARTS parts (zstd and xz grow incompressible
    data by well under 1/128, plus their framing)."""
    largest = nar_size + (nar_size >> 7) + (1 << 20)
    return max(configured, -(-largest // MAX_PARTS))

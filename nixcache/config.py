"""Configuration: one TOML file, validated by pydantic, reloadable."""

from __future__ import annotations

import ipaddress
import os
import socket
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from nixcache import configfile, defaults
from nixcache.errors import ConfigError, SigningError
from nixcache.formats.signing import SecretKey


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class S3Config(_Section):
    bucket: str = Field(min_length=3, max_length=63)
    endpoint: str | None = None
    """e.g. ``https://s3.us-west-004.backblazeb2.com``; unset means AWS."""
    region: str = "us-east-1"
    profile: str | None = None
    credentials_file: Path | None = None
    """An AWS-style shared credentials file; unset uses the usual AWS_* variables/files."""
    addressing_style: Literal["path", "virtual", "auto"] = "path"
    max_attempts: int = Field(default=6, ge=1, le=20)
    """Attempts per request (exponential backoff with jitter on 5xx, SlowDown, connection errors)."""
    connect_timeout: float = Field(default=10.0, gt=0)
    read_timeout: float = Field(default=60.0, gt=0)


class SigningConfig(_Section):
    secret_key_file: Path


class UploadConfig(_Section):
    workers: int = Field(default=4, ge=1, le=64)
    compression: Literal["zstd", "xz", "none"] = "zstd"
    compression_level: int | None = Field(default=None, ge=0, le=22)
    skip_signed_by: tuple[str, ...] = ("cache.nixos.org-1",)
    priority: int = Field(default=40, ge=0)
    queue_size: int = Field(default=1000, ge=1)
    part_size_mb: int = Field(default=10, ge=5, le=512)
    """Multipart part size: one part is held per transfer (10 MiB × 4 workers keeps a push's
    peak RSS under 128 MB); raised for a NAR too large for S3's 10,000 parts."""
    retry_interval: float = Field(default=60.0, gt=0)
    """Seconds between attempts at paths whose upload failed (they stay pending meanwhile)."""
    spool_interval: float = Field(default=10.0, gt=0)
    drain_timeout: float = Field(default=30.0, ge=0)
    """On SIGTERM, how long in-flight uploads may finish before they are left pending."""

    def level(self) -> int:
        if self.compression_level is not None:
            return self.compression_level
        return {"zstd": 3, "xz": 6, "none": 0}[self.compression]


def parse_duration(value: object) -> object:
    """Seconds, or a string like ``90s``, ``30m``, ``12h``, ``7d``."""
    if isinstance(value, str):
        units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
        text = value.strip()
        if text and text[-1] in units:
            try:
                return float(text[:-1]) * units[text[-1]]
            except ValueError:
                pass
        try:
            return float(text)
        except ValueError:
            raise ValueError(f"not a duration: {value!r} (use seconds or e.g. 30m, 12h, 7d)") from None
    return value


Duration = Annotated[float, BeforeValidator(parse_duration), Field(ge=0)]


class RootsConfig(_Section):
    include: tuple[str, ...] = ("*",)
    """Globs; a root is published if its link, indirect link or store path matches one..."""
    exclude: tuple[str, ...] = ("*nixos-rebuild*",)
    """...and none of these (the nixos-system root that follows a rebuild covers it)."""
    keep: tuple[str, ...] = ()
    """Globs on a published root's store path or gcinfo name: never moved to the trash."""
    debounce: Duration = 2.0
    """Seconds of quiet after a change before the roots are rescanned (one burst, one round)."""
    rescan_interval: Duration = 300.0
    """Full rescan period: catches indirect roots (./result) re-pointed without an event."""


class GcConfig(_Section):
    dereference: bool = True
    dereference_interval: Duration = 1800.0
    collect: bool = True
    collect_interval: Duration = 3600.0
    grace_period: Duration = 86400.0
    """Nothing uploaded (narinfo or NAR written) within this long is collected."""
    lease_ttl: Duration = 3600.0
    """A collector's lease expires after this long, so a dead host's lease does not block forever."""
    residual_age: Duration | None = None
    """If set, also delete residual objects older than this at each collection."""
    record_retention: Duration = 604800.0
    """Deletion records (``gc/records/``) older than this are deleted; a host that has not
    listed them for half this long forgets which paths it believed in the bucket."""
    sole_collector: bool = False
    """This host is the only one collecting in the bucket: needed where the provider ignores
    conditional writes (the lease cannot exclude a second collector there)."""


class MetricsConfig(_Section):
    listen: str | None = Field(default=None, pattern=r"^(127\.0\.0\.1|localhost|\[::1\]):[0-9]{1,5}$")
    """``127.0.0.1:PORT`` to serve Prometheus metrics on (loopback only), unset for none."""
    textfile: Path | None = None
    """A file rewritten every 15 s for node_exporter's textfile collector, unset for none."""


def _is_loopback(host: str) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class SubstituterConfig(_Section):
    """Serve the bucket to Nix over HTTP from this daemon, with its credentials: for buckets
    nobody may read anonymously (docs/nixos.md, private buckets)."""

    listen: str | None = Field(default=None, pattern=r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):[0-9]{1,5}$")
    """``HOST:PORT`` to serve on (e.g. ``127.0.0.1:37515``), unset for none."""
    netrc_file: Path | None = None
    """Who may read, in netrc format (``machine … login … password …``: the file a Nix client
    uses as its ``netrc-file``). Required unless ``listen`` is loopback."""
    negative_ttl: Duration = 60.0
    """How long a missing narinfo is answered 404 without asking the bucket again."""
    narinfo_cache: bool = True
    """Keep served narinfos in ``state_dir/substituter/`` (evicted as collections delete)."""
    nar_cache_mb: int = Field(default=0, ge=0)
    """Keep served NARs in ``state_dir/substituter/nars/`` up to this many MiB, least recently
    used dropped first; 0 for none. For a LAN reading the same closures."""

    @model_validator(mode="after")
    def _lan_needs_credentials(self) -> SubstituterConfig:
        if self.listen and self.netrc_file is None and not _is_loopback(self.listen.rpartition(":")[0]):
            raise ValueError(
                f"{self.listen} is not a loopback address: set substituter.netrc_file so only the "
                "machines you give its credentials can read the bucket"
            )
        return self


class Config(_Section):
    hostname: str = Field(default_factory=socket.gethostname, min_length=1)
    store_dir: str = defaults.STORE_DIR
    gcroots_dir: Path = Path(defaults.GCROOTS_DIR)
    profiles_dir: str = defaults.PROFILES_DIR
    """Scanned like gcroots_dir, as Nix's own collector does; "" to disable."""
    state_dir: Path = Path(defaults.STATE_DIR)
    fifo: Path = Path(defaults.FIFO)
    machine_id_file: Path = Path(defaults.MACHINE_ID_FILE)
    """Identifies this machine when it claims ``gcroots/<hostname>/`` (two machines with one
    hostname must not share it); missing: an id generated once in ``state_dir``."""
    s3: S3Config
    signing: SigningConfig
    upload: UploadConfig = UploadConfig()
    roots: RootsConfig = RootsConfig()
    gc: GcConfig = GcConfig()
    metrics: MetricsConfig = MetricsConfig()
    substituter: SubstituterConfig = SubstituterConfig()

    def roots_dirs(self) -> list[Path]:
        """Where GC roots are looked for, as Nix's collector does."""
        return [self.gcroots_dir] + ([Path(self.profiles_dir)] if self.profiles_dir else [])


def _describe(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        where = ".".join(str(x) for x in e["loc"]) or "(top)"
        parts.append(f"{where}: {e['msg']}")
    return "; ".join(parts)


def parse_config(data: dict[str, object], source: str = "config") -> Config:
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{source}: {_describe(e)}") from None


def load_config(path: str | os.PathLike[str] | None = None) -> tuple[Config, Path]:
    """Read and validate the config file; every problem becomes one ConfigError line."""
    data, p = configfile.read(path)
    return parse_config(data, p), Path(p)


def load_signing_key(cfg: Config) -> SecretKey:
    """The secret key named by ``[signing] secret_key_file``, with a clear error if unusable."""
    path = cfg.signing.secret_key_file
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise SigningError(
            f"signing key file {path} does not exist (create one with "
            "`nix-store --generate-binary-cache-key NAME {path} {path}.pub`)"
        ) from None
    except OSError as e:
        raise SigningError(f"cannot read signing key file {path}: {e.strerror}") from None
    return SecretKey.parse(text)

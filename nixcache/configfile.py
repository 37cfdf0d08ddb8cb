"""Find and read the config file as TOML: stdlib only, for commands that must start fast
(`nixcache status`) and for the validating loader in config.py."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

from nixcache import defaults
from nixcache.errors import ConfigError


def config_path(explicit: str | os.PathLike[str] | None) -> Path:
    """``--config``, else ``$NIXCACHE_CONFIG``, else the system default."""
    if explicit:
        return Path(explicit)
    return Path(os.environ.get(defaults.CONFIG_ENV) or defaults.CONFIG_FILE)


def read(path: str | os.PathLike[str] | None) -> tuple[dict[str, Any], Path]:
    """The config file's TOML (not validated); every problem is one ConfigError line."""
    p = config_path(path)
    try:
        return tomllib.loads(p.read_text()), p
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist (use --config or ${defaults.CONFIG_ENV})") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {p}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from None

"""Find and read the config file as TOML: stdlib only, for commands that must start fast
(`nixcache status`) and for the validating loader in config.py."""

from __future__ import annotations

import os
import tomllib
from typing import TYPE_CHECKING

from nixcache import defaults
from nixcache.errors import ConfigError

if TYPE_CHECKING:
    from typing import Any


def config_path(explicit: str | os.PathLike[str] | None) -> str:
    """``--config``, else ``$NIXCACHE_CONFIG``, else the system default. (Strings, not
    pathlib: importing it is a tenth of what `nixcache status` may take.)"""
    if explicit:
        return os.fspath(explicit)
    return os.environ.get(defaults.CONFIG_ENV) or defaults.CONFIG_FILE


def read(path: str | os.PathLike[str] | None) -> tuple[dict[str, Any], str]:
    """The config file's TOML (not validated); every problem is one ConfigError line."""
    p = config_path(path)
    try:
        with open(p, encoding="utf-8") as f:
            return tomllib.loads(f.read()), p
    except FileNotFoundError:
        raise ConfigError(f"config file {p} does not exist (use --config or ${defaults.CONFIG_ENV})") from None
    except OSError as e:
        raise ConfigError(f"cannot read config file {p}: {e.strerror}") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from None

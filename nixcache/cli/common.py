"""What the command families share: their config, and a progress line around one operation.

Imported by the heavy commands only (it loads the validating config and asyncio)."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from nixcache.config import Config, load_config
from nixcache.progress import Progress

T = TypeVar("T")


def config(args: argparse.Namespace) -> Config:
    """The validated config ``--config`` (or the default) names."""
    cfg, _ = load_config(args.config)
    return cfg


def with_progress(job: Callable[[Progress], Coroutine[Any, Any, T]]) -> T:
    """Run ``job`` with a progress line on stderr, gone once it is done (on a terminal)."""
    progress = Progress()
    try:
        return asyncio.run(job(progress))
    finally:
        progress.close()

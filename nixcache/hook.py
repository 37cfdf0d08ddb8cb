"""Where the post-build hook was before the tree had packages, kept for what earlier installs
left behind: hook scripts run ``python -S -E -s <site-packages>/nixcache/hook.py`` as a file,
and pip's ``nixcache-hook`` script does ``from nixcache.hook import main``. Both must keep
working after an upgrade (a failing hook fails the build). Stdlib only, like the hook."""

from __future__ import annotations

import os
import sys

if not __package__:  # run as a file: make the package importable without site-packages
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from nixcache.local.hook import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())

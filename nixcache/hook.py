"""Where the post-build hook was before the tree had packages: hook scripts written then run
``python -S -E -s <site-packages>/nixcache/hook.py`` as a file, and must keep working after an
upgrade (a failing hook fails the build). Stdlib only, like the hook: it runs local/hook.py."""

from __future__ import annotations

import os
import runpy

if __name__ == "__main__":
    runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "local", "hook.py"), run_name="__main__")

"""``python -m nixcache.cli``: the same as the ``nixcache`` command."""

import sys

from nixcache.cli import main

sys.exit(main())

"""`nixcache serve` (also `--embedded`), `nixcache hook` and `nixcache hook-script`.

`hook` runs on every build's path and `hook-script` needs no daemon: what serving needs
(asyncio, the daemon, pydantic through the config) is imported inside `serve` only.
"""

from __future__ import annotations

import argparse
import sys

from nixcache import defaults


def serve(args: argparse.Namespace) -> int:
    import asyncio
    from pathlib import Path

    from nixcache.config import load_config
    from nixcache.daemon.service import Service

    if args.embedded is None:
        cfg, path = load_config(args.config)
        return asyncio.run(Service(cfg, path).run())

    from nixcache.daemon import embedded

    with embedded.running(Path(args.embedded)) as setup:
        print(
            f"nixcache: embedded SeaweedFS at {setup.endpoint}, bucket {setup.cfg.s3.bucket}\n"
            f"  substituter:       {setup.endpoint}/{setup.cfg.s3.bucket}\n"
            f"  trusted key:       {setup.public_key}\n"
            f"  config:            {setup.config_file}\n"
            f"  post-build hook:   nixcache hook-script --config {setup.config_file} /tmp/nixcache-hook\n"
            f"                     nix-build ... --option post-build-hook /tmp/nixcache-hook",
            file=sys.stderr,
        )
        return asyncio.run(Service(setup.cfg, setup.config_file).run())


def hook(args: argparse.Namespace) -> int:
    from nixcache.local import hook as post_build_hook

    return post_build_hook.main()


def hook_script(args: argparse.Namespace) -> int:
    from pathlib import Path

    from nixcache.config import load_config
    from nixcache.local import hook as post_build_hook

    cfg, _ = load_config(args.config)
    output = Path(args.output)
    output.write_text(post_build_hook.script(str(cfg.fifo), defaults.spool_dir(str(cfg.state_dir))))
    output.chmod(0o755)
    print(output)
    return 0

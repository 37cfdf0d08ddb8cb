"""This machine: the Nix store, its GC roots, the durable queue of pending paths, the hook."""

"""``nixcache serve``: the long-running service, split by task."""

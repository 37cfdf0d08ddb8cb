"""nixcache: a Nix binary cache in any S3 bucket, garbage-collected by GC roots."""

__version__ = "0.1.0"

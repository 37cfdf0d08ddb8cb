"""Bucket formats and Nix encodings: pure, bytes in and values out."""

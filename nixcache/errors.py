"""One base exception; each subclass carries a message a user can act on."""

from __future__ import annotations


class NixcacheError(Exception):
    """Base class of every error nixcache reports to the user."""


class ConfigError(NixcacheError):
    """The configuration file is missing, unreadable or invalid."""


class StoreError(NixcacheError):
    """The local Nix store refused a query, or a path is not a valid store path."""


class SigningError(NixcacheError):
    """A signing key file is missing or malformed."""


class S3Error(NixcacheError):
    """The bucket could not be reached or refused a request."""


class NarHashMismatch(NixcacheError):
    """The bytes `nix-store --dump` produced do not match the narHash in the Nix database."""

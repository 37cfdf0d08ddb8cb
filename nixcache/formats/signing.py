"""Nix signing keys (``name:base64``), narinfo fingerprints, ed25519 sign/verify. Pure."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterable
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from nixcache.errors import SigningError


def _split(text: str, what: str, raw_len: int) -> tuple[str, bytes]:
    name, sep, b64 = text.strip().partition(":")
    if not sep or not name:
        raise SigningError(f"{what} must look like 'name:base64', got {len(text)} characters without a name")
    try:
        raw = base64.b64decode(b64, validate=True)
    except binascii.Error:
        raise SigningError(f"{what} '{name}': the part after ':' is not base64") from None
    if len(raw) != raw_len:
        raise SigningError(f"{what} '{name}': expected {raw_len} bytes, got {len(raw)}")
    return name, raw


@dataclass(frozen=True)
class PublicKey:
    """A trusted key as in Nix's ``trusted-public-keys``."""

    name: str
    key: Ed25519PublicKey

    @classmethod
    def parse(cls, text: str) -> PublicKey:
        name, raw = _split(text, "public key", 32)
        return cls(name, Ed25519PublicKey.from_public_bytes(raw))

    def verify(self, fingerprint: str, signatures: Iterable[str]) -> bool:
        """True when one of ``signatures`` (``name:base64``) is this key's over ``fingerprint``."""
        for sig in signatures:
            name, _, b64 = sig.partition(":")
            if name != self.name:
                continue
            try:
                self.key.verify(base64.b64decode(b64), fingerprint.encode())
                return True
            except (InvalidSignature, binascii.Error, ValueError):
                continue
        return False

    def __str__(self) -> str:
        raw = self.key.public_bytes_raw()
        return f"{self.name}:{base64.b64encode(raw).decode()}"


@dataclass(frozen=True)
class SecretKey:
    """A key from ``nix-store --generate-binary-cache-key`` (64 bytes: seed then public key)."""

    name: str
    key: Ed25519PrivateKey

    @classmethod
    def parse(cls, text: str) -> SecretKey:
        name, raw = _split(text, "secret key", 64)
        return cls(name, Ed25519PrivateKey.from_private_bytes(raw[:32]))

    @classmethod
    def generate(cls, name: str) -> SecretKey:
        return cls(name, Ed25519PrivateKey.generate())

    def sign(self, fingerprint: str) -> str:
        """The ``Sig:`` value for a fingerprint."""
        sig = self.key.sign(fingerprint.encode())
        return f"{self.name}:{base64.b64encode(sig).decode()}"

    @property
    def public(self) -> PublicKey:
        return PublicKey(self.name, self.key.public_key())

    def render(self) -> str:
        """The key file contents, as Nix writes them."""
        raw = self.key.private_bytes_raw() + self.key.public_key().public_bytes_raw()
        return f"{self.name}:{base64.b64encode(raw).decode()}"


def fingerprint(store_path: str, nar_hash: str, nar_size: int, references: Iterable[str]) -> str:
    """Nix's signed fingerprint: ``1;<path>;<sha256:nix32>;<size>;<comma-joined sorted refs>``.

    ``references`` are full store paths.
    """
    return f"1;{store_path};{nar_hash};{nar_size};{','.join(sorted(references))}"

"""Nix's base-32 encoding (the hash part of store paths and narinfo hashes)."""

from __future__ import annotations

ALPHABET = "0123456789abcdfghijklmnpqrsvwxyz"
_VALUES = {c: i for i, c in enumerate(ALPHABET)}


def encoded_length(n_bytes: int) -> int:
    """Characters needed for ``n_bytes`` bytes."""
    return (n_bytes * 8 - 1) // 5 + 1


def encode(data: bytes) -> str:
    """Encode bytes the way Nix does (least significant bits last, odd alphabet)."""
    out = []
    for n in range(encoded_length(len(data)) - 1, -1, -1):
        b = n * 5
        i, j = divmod(b, 8)
        c = data[i] >> j
        if i + 1 < len(data):
            c |= data[i + 1] << (8 - j)
        out.append(ALPHABET[c & 0x1F])
    return "".join(out)


def decode(text: str) -> bytes:
    """Inverse of :func:`encode`; raises ValueError on a bad character or length."""
    n_bytes = len(text) * 5 // 8
    if encoded_length(n_bytes) != len(text):
        raise ValueError(f"invalid nix32 length {len(text)}")
    out = bytearray(n_bytes)
    for n, ch in enumerate(reversed(text)):
        try:
            digit = _VALUES[ch]
        except KeyError:
            raise ValueError(f"invalid nix32 character {ch!r}") from None
        b = n * 5
        i, j = divmod(b, 8)
        out[i] |= (digit << j) & 0xFF
        carry = digit >> (8 - j)
        if carry:
            if i + 1 >= n_bytes:
                raise ValueError("invalid nix32 string (overflow)")
            out[i + 1] |= carry
    return bytes(out)

"""The ``.narinfo`` file of a Nix binary cache: model, render, parse. Pure."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from nixcache.formats.signing import SecretKey, fingerprint


class NarInfoError(ValueError):
    """A narinfo text that does not parse."""


@dataclass(frozen=True)
class NarInfo:
    """What a cache says about one store path. ``references`` and ``deriver`` are base names."""

    store_path: str
    url: str
    compression: str
    file_hash: str
    file_size: int
    nar_hash: str
    nar_size: int
    references: tuple[str, ...] = ()
    deriver: str | None = None
    sigs: tuple[str, ...] = ()
    ca: str | None = None
    extra: tuple[tuple[str, str], ...] = field(default=())

    @property
    def store_dir(self) -> str:
        return self.store_path.rsplit("/", 1)[0]

    def fingerprint(self) -> str:
        refs = [f"{self.store_dir}/{r}" for r in self.references]
        return fingerprint(self.store_path, self.nar_hash, self.nar_size, refs)

    def signed(self, key: SecretKey) -> NarInfo:
        """A copy carrying ``key``'s signature (replacing an older one by the same key name)."""
        others = tuple(s for s in self.sigs if not s.startswith(key.name + ":"))
        return replace(self, sigs=(*others, key.sign(self.fingerprint())))

    def render(self) -> str:
        lines = [
            f"StorePath: {self.store_path}",
            f"URL: {self.url}",
            f"Compression: {self.compression}",
            f"FileHash: {self.file_hash}",
            f"FileSize: {self.file_size}",
            f"NarHash: {self.nar_hash}",
            f"NarSize: {self.nar_size}",
            f"References: {' '.join(self.references)}",
        ]
        if self.deriver:
            lines.append(f"Deriver: {self.deriver}")
        lines += [f"Sig: {s}" for s in self.sigs]
        if self.ca:
            lines.append(f"CA: {self.ca}")
        lines += [f"{k}: {v}" for k, v in self.extra]
        return "\n".join(lines) + "\n"

    @classmethod
    def parse(cls, text: str) -> NarInfo:
        fields: dict[str, str] = {}
        sigs: list[str] = []
        extra: list[tuple[str, str]] = []
        known = {"StorePath", "URL", "Compression", "FileHash", "FileSize", "NarHash", "NarSize",
                 "References", "Deriver", "CA"}  # fmt: skip
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            key, sep, value = line.partition(": ")
            if not sep:
                raise NarInfoError(f"line {n}: expected 'Key: value'")
            if key == "Sig":
                sigs.append(value)
            elif key in known:
                fields[key] = value
            else:
                extra.append((key, value))
        try:
            return cls(
                store_path=fields["StorePath"],
                url=fields["URL"],
                compression=fields.get("Compression", "bzip2"),
                file_hash=fields.get("FileHash", ""),
                file_size=int(fields.get("FileSize", "0")),
                nar_hash=fields["NarHash"],
                nar_size=int(fields["NarSize"]),
                references=tuple(fields.get("References", "").split()),
                deriver=fields.get("Deriver") or None,
                sigs=tuple(sigs),
                ca=fields.get("CA") or None,
                extra=tuple(extra),
            )
        except KeyError as e:
            raise NarInfoError(f"missing field {e.args[0]}") from None
        except ValueError as e:
            raise NarInfoError(str(e)) from None

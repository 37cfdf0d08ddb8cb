"""Pure formats: nix32, narinfo, signatures, store path parsing."""

from __future__ import annotations

import base64

import pytest

from nixcache.bucket import layout
from nixcache.errors import SigningError, StoreError
from nixcache.formats import nix32
from nixcache.formats.narinfo import NarInfo, NarInfoError
from nixcache.formats.signing import PublicKey, SecretKey, fingerprint
from nixcache.local.store import parse_store_path, sri_to_nix32

# `nix hash to-base32 sha256-6nMizyE/Zje+q3pQ6RrUlp9mIlmYX+h/uqh2Pr+Fgcg=` printed this.
SRI = "sha256-6nMizyE/Zje+q3pQ6RrUlp9mIlmYX+h/uqh2Pr+Fgcg="
NIX32 = "1j41hnzkwxm8p9zyhpwqb4i6d7wnshdfjl3smfz3friz477j4wza"


def test_nix32_matches_nix() -> None:
    digest = base64.b64decode(SRI.split("-", 1)[1])
    assert nix32.encode(digest) == NIX32
    assert nix32.decode(NIX32) == digest
    assert sri_to_nix32(SRI) == "sha256:" + NIX32


@pytest.mark.parametrize("bad", ["e" * 52, "zzzz", "123", NIX32[:-1] + "!"])
def test_nix32_rejects_bad_input(bad: str) -> None:
    with pytest.raises(ValueError):
        nix32.decode(bad)


def test_nix32_roundtrips_every_length() -> None:
    for n in range(1, 40):
        data = bytes((i * 37 + n) % 256 for i in range(n))
        assert nix32.decode(nix32.encode(data)) == data


def sample() -> NarInfo:
    return NarInfo(
        store_path="/nix/store/zzw3k5mnb4f5hppyl0lk30hhrrhfbrzl-b-1",
        url="nar/abc.nar.zst",
        compression="zstd",
        file_hash="sha256:" + NIX32,
        file_size=139,
        nar_hash="sha256:" + NIX32,
        nar_size=168,
        references=("ps0hr38i9l6q35kdi49p8x2hbwfr39fl-a-1",),
        deriver="41ck28yjvpjvi88vl4h5qsm39a91kagd-b-1.drv",
    )


def test_narinfo_render_parse_roundtrip_and_signature() -> None:
    key = SecretKey.generate("test-1")
    info = sample().signed(key)
    parsed = NarInfo.parse(info.render())
    assert parsed == info
    assert key.public.verify(parsed.fingerprint(), parsed.sigs)
    assert parsed.fingerprint() == (
        f"1;/nix/store/zzw3k5mnb4f5hppyl0lk30hhrrhfbrzl-b-1;sha256:{NIX32};168;"
        "/nix/store/ps0hr38i9l6q35kdi49p8x2hbwfr39fl-a-1"
    )
    # Another key, or a tampered fingerprint, does not verify.
    assert not SecretKey.generate("test-1").public.verify(parsed.fingerprint(), parsed.sigs)
    assert not key.public.verify(parsed.fingerprint() + "x", parsed.sigs)


def test_signing_again_replaces_own_signature_only() -> None:
    key = SecretKey.generate("mine-1")
    info = NarInfo.parse(sample().render() + "Sig: other-1:AAAA\n").signed(key).signed(key)
    assert [s.split(":")[0] for s in info.sigs] == ["other-1", "mine-1"]


def test_narinfo_parse_errors() -> None:
    with pytest.raises(NarInfoError, match="NarHash"):
        NarInfo.parse("StorePath: /nix/store/x\nURL: nar/x\nNarSize: 1\n")
    with pytest.raises(NarInfoError, match="line 1"):
        NarInfo.parse("garbage\n")


def test_key_files_roundtrip_and_errors() -> None:
    key = SecretKey.generate("cache-1")
    again = SecretKey.parse(key.render())
    assert str(again.public) == str(key.public)
    assert PublicKey.parse(str(key.public)).verify("fp", [key.sign("fp")])
    assert fingerprint("/nix/store/a", "sha256:x", 1, ["/nix/store/c", "/nix/store/b"]).endswith(
        "/nix/store/b,/nix/store/c"
    )
    for bad in ("no-colon", "name:not base64!", "name:" + base64.b64encode(b"short").decode()):
        with pytest.raises(SigningError):
            SecretKey.parse(bad)


@pytest.mark.parametrize(
    "line",
    [
        "hello",
        "/nix/store/short-name",
        "/nix/store/" + "e" * 32 + "-x",  # 'e' is not in Nix's base-32 alphabet
        "/tmp/" + "0" * 32 + "-x",
        "/nix/store/" + "0" * 32 + "-x/bin/sub",
        "/nix/store/" + "0" * 32 + "-" + "x" * 5000,
    ],
)
def test_parse_store_path_rejects(line: str) -> None:
    with pytest.raises(StoreError):
        parse_store_path(line, "/nix/store")


def test_parse_store_path_accepts_outputs_and_drvs() -> None:
    for base in ("0" * 32 + "-hello-2.12", "0" * 32 + "-hello-2.12.drv", "0" * 32 + "-a+b_c?=d"):
        assert parse_store_path("/nix/store/" + base, "/nix/store") == "/nix/store/" + base


def test_layout_names() -> None:
    path = "/nix/store/zzw3k5mnb4f5hppyl0lk30hhrrhfbrzl-b-1"
    assert layout.narinfo_key(path) == "zzw3k5mnb4f5hppyl0lk30hhrrhfbrzl.narinfo"
    assert layout.nar_key(NIX32, "zstd") == f"nar/{NIX32}.nar.zst"
    assert layout.nar_key(NIX32, "none") == f"nar/{NIX32}.nar"

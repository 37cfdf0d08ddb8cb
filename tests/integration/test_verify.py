"""`nixcache verify` against a real bucket filled by nixcache from real Nix paths."""

from __future__ import annotations

from pathlib import Path

from nixcache.formats.narinfo import NarInfo
from nixcache.formats.signing import SecretKey
from tests.harness import Bucket, base_settings, hash_part, nix_build, run_cli, write_config


def test_verify_passes_a_clean_bucket_and_finds_each_injected_defect(
    tmp_path: Path, bucket: Bucket, signing_key: tuple[Path, str]
) -> None:
    config = write_config(tmp_path / "config.toml", base_settings(tmp_path, bucket, signing_key[0]))
    closure = nix_build(tmp_path)
    (tmp_path / "gcroots" / "app").symlink_to(closure[-1])
    assert run_cli(config, "publish").returncode == 0
    clean = run_cli(config, "verify")
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "3 narinfos, 1 live gcinfos, signatures by nixcache-test-1: 0 problem(s)" in clean.stdout

    lib, tool, app = sorted(closure, key=lambda p: ("lib" not in p, "tool" not in p))
    # 1. a missing NAR
    app_info = NarInfo.parse((bucket.get(hash_part(app) + ".narinfo") or b"").decode())
    bucket.client.delete_object(Bucket=bucket.name, Key=app_info.url)
    # 2. a narinfo signed by someone else
    tool_key = hash_part(tool) + ".narinfo"
    forged = NarInfo.parse((bucket.get(tool_key) or b"").decode())
    forged = NarInfo(**{**forged.__dict__, "sigs": ()}).signed(SecretKey.generate("nixcache-test-1"))
    bucket.client.put_object(Bucket=bucket.name, Key=tool_key, Body=forged.render().encode())
    # 3. a missing reference (and a gcinfo member gone)
    bucket.client.delete_object(Bucket=bucket.name, Key=hash_part(lib) + ".narinfo")
    # 4. a corrupt gcinfo
    bad = "gcroots/otherhost/broken-" + "0" * 32 + ".gcinfo.gz"
    bucket.client.put_object(Bucket=bucket.name, Key=bad, Body=b"\x1f\x8b\x08 not really gzip")

    found = run_cli(config, "verify")
    assert found.returncode == 1, found.stderr
    out = found.stdout
    assert out, found.stderr
    assert f"NAR {app_info.url} is missing" in out
    assert f"{tool_key}: no valid signature by nixcache-test-1" in out
    lib_name = Path(lib).name
    assert f"{hash_part(app)}.narinfo: reference {lib_name} is not in the bucket" in out
    assert f"{tool_key}: reference {lib_name} is not in the bucket" in out
    assert f"{bad}: not a complete gzip" in out
    assert "member(s) missing" in out

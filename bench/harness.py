"""
The processes a bench run starts and stops: L{Service} (one subprocess on
a loopback port, with its log), L{Services} (all of a run's, stopped at
the end, also on errors), the temporary directory, txpypi under twistd,
proxpi under gunicorn, and L{Backends} (SeaweedFS and redis-server, from
the launchers the tests use too: L{tests.servers}).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

REPO = Path(__file__).resolve().parent.parent
# The tests' launchers for redis-server and SeaweedFS come from the checkout: put it on the
# path after this script's folder (sys.path[0]), so that the checkout's bench/ folder does
# not shadow bench.py, and before site-packages, so that no other "tests" does.
if str(REPO) not in sys.path:
    sys.path.insert(1, str(REPO))

from tests import servers  # noqa: E402

free_ports = servers.free_ports
which = servers.which

#: Credentials for SeaweedFS, which accepts any: in txpypi's environment (boto3's chain) and ours.
S3_ENV = {"AWS_ACCESS_KEY_ID": "txpypi-bench", "AWS_SECRET_ACCESS_KEY": "txpypi-bench"}
S3_BUCKET = "txpypi-bench"


def clean_env(**extra: str) -> dict[str, str]:
    """
    The environment without pip/uv settings or HTTP proxies, plus C{extra}.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PIP_", "UV_", "PROXPI_"))
        and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")
    }
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env.update(extra)
    return env


@dataclass
class Service:
    name: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class Services:
    """
    The processes a run has started and not stopped yet.
    """

    started: list[Service] = field(default_factory=list)

    def start(self, name: str, argv: Sequence[str], env: dict[str, str], port: int, workdir: Path) -> Service:
        log = workdir / f"{name}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                list(argv),
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=workdir,
            )
        return self.adopt(name, port, process, log)

    def adopt(self, name: str, port: int, process: subprocess.Popen[bytes], log: Path) -> Service:
        """
        Count C{process}, started elsewhere, among these: stopped with them, its log shown on errors.
        """
        service = Service(name, port, process, log)
        self.started.append(service)
        return service

    def wait_ready(self, service: Service, timeout: float = 60.0) -> float:
        """
        Poll until C{service}'s port accepts connections; return the seconds it took.
        """
        start = time.monotonic()

        def listening() -> bool:
            with socket.create_connection(("127.0.0.1", service.port), timeout=0.5):
                return True

        servers.wait_until(listening, start + timeout, service.name, service.process, service.log, 0.05)
        return time.monotonic() - start

    def stop(self, *services: Service) -> None:
        """
        SIGTERM C{services} (all at once), then SIGKILL those still there after 10 s.
        """
        for service in services:
            if service.process.poll() is None:
                service.process.terminate()
        for service in services:
            servers.stop_process(service.process, timeout=10)
            if service in self.started:
                self.started.remove(service)

    def stop_all(self) -> None:
        self.stop(*reversed(self.started))

    def stop_and_show(self) -> None:
        """
        Stop them all, then show how each had fared and its log's end
        (which usually explains a failure), on stderr.
        """
        died = {s.name: s.process.poll() for s in self.started}
        started = list(self.started)
        self.stop_all()
        for service in started:
            how = "running" if died[service.name] is None else f"had exited with {died[service.name]}"
            print(f"\n--- {service.name} ({how}); log tail:\n{service.tail(15)}", file=sys.stderr)


@contextmanager
def workspace(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="txpypi-bench-"))
    try:
        yield path
    finally:
        if keep:
            print(f"\n(kept {path})")
        else:
            shutil.rmtree(path, ignore_errors=True)


@contextmanager
def session(keep: bool) -> Iterator[tuple[Path, Services]]:
    """
    A temporary directory (kept if C{keep}) and the L{Services} of a run:
    every one still running is stopped at the end; on an error, after
    showing how each fared.
    """
    services = Services()
    with workspace(keep) as work:
        try:
            yield work, services
        except Exception:
            services.stop_and_show()
            raise
        finally:
            services.stop_all()


def twistd_txpypi(*args: str) -> list[str]:
    """
    The command line of C{twistd -n txpypi ARGS}, run by this Python.
    """
    return [
        sys.executable,
        "-c",
        "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()",
        "-n",
        "--pidfile=",
        "txpypi",
        *args,
    ]


def start_txpypi(
    services: Services,
    work: Path,
    name: str,
    port: int,
    upstream: Service,
    *args: str,
    env: dict[str, str] | None = None,
    upstream_option: bool = True,
) -> Service:
    """
    Start (not wait for) a txpypi called C{name} on 127.0.0.1:C{port}, in
    front of C{upstream} (unless not C{upstream_option}: its config names
    its upstreams), with the admin token in C{work}, and C{args}.
    """
    front = ["--upstream", f"{upstream.base}/simple/"] if upstream_option else []
    return services.start(
        name,
        twistd_txpypi(
            *front,
            "--listen",
            f"tcp:{port}:interface=127.0.0.1",
            "--admin-token-file",
            str(work / "admin-token"),
            *args,
        ),
        clean_env(PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", **(env or {})),
        port,
        work,
    )


def start_proxpi(services: Services, work: Path, port: int, upstream: Service, threads: int = 2) -> Service:
    """
    Start (not wait for) proxpi on 127.0.0.1:C{port} in front of
    C{upstream}, served the way its Docker image does it: gunicorn, one
    worker, C{threads} threads.
    """
    cache = work / "proxpi-cache"
    cache.mkdir(exist_ok=True)
    env = clean_env(
        PROXPI_INDEX_URL=f"{upstream.base}/simple/", PROXPI_CACHE_DIR=str(cache), PYTHONUNBUFFERED="1"
    )
    argv = [sys.executable, "-m", "gunicorn", "--preload", "--workers", "1", "--threads", str(threads)]
    argv += [
        "--bind",
        f"127.0.0.1:{port}",
        "--logger-class",
        "proxpi.server._GunicornLogger",
        "proxpi.server:app",
    ]
    return services.start("proxpi", argv, env, port, work)


def s3_client(endpoint: str) -> Any:
    """
    A boto3 client for SeaweedFS at C{endpoint}, with the bench's credentials.
    """
    import boto3
    from botocore.config import Config

    session = boto3.session.Session(
        aws_access_key_id=S3_ENV["AWS_ACCESS_KEY_ID"], aws_secret_access_key=S3_ENV["AWS_SECRET_ACCESS_KEY"]
    )
    config = Config(retries={"max_attempts": 1}, connect_timeout=1, read_timeout=10)
    return session.client("s3", endpoint_url=endpoint, region_name="us-east-1", config=config)


@dataclass
class Backends:
    """
    SeaweedFS (its S3) and a redis-server on free loopback ports, each
    started the first time a section asks for it, stopped with the rest.
    """

    services: Services
    work: Path
    weed: str
    _s3: str | None = None
    _redis: str | None = None

    def s3(self, prefix: str) -> list[str]:
        """
        txpypi's arguments for a store under C{prefix} in SeaweedFS's bucket.
        """
        if self._s3 is None:
            self._s3 = self._start_seaweedfs()
        return [
            "--store",
            "s3",
            "--s3-endpoint-url",
            self._s3,
            "--s3-bucket",
            S3_BUCKET,
            "--s3-prefix",
            prefix,
            "--s3-region",
            "us-east-1",
        ]

    def _start_seaweedfs(self) -> str:
        start = time.monotonic()
        # Ready once an object can be written and read back, not just once the bucket is
        # made: the filer restarts its gRPC server once after start-up.
        server = servers.start_seaweedfs(
            self.weed, self.work / "seaweedfs", S3_BUCKET, s3_client, volume_size_mb=256
        )
        port = urlsplit(server.endpoint).port or 80
        self.services.adopt("seaweedfs", port, server.process, server.log)
        print(f"seaweedfs ready on {server.endpoint} after {time.monotonic() - start:.2f}s", flush=True)
        return server.endpoint

    def redis(self) -> str:
        """
        The URL of the redis-server.
        """
        if self._redis is None:
            start = time.monotonic()
            server = servers.RedisProcess(self.work)
            try:
                server.start(interval=0.05)
            except BaseException:
                server.stop()
                raise
            assert server.process is not None
            service = self.services.adopt("redis", server.port, server.process, server.log)
            print(f"{'redis':9s} ready on {service.base} after {time.monotonic() - start:.2f}s", flush=True)
            self._redis = server.url
        return self._redis

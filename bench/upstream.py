"""
The fake upstream index: what it serves, the process that serves it, and
the bench's side of its extra routes.

It is L{txpypi.testing.FakeUpstream}, run in a process of its own (C{bench.py
--serve-upstream PORT}, see L{start_upstream}), with three more routes:
C{GET /_counts} (its request counters as JSON), C{GET /_reset} and
C{GET /_rate?bytes_per_second=N}.  Files bigger than L{STREAM_CHUNK} are
written by a pull producer as the socket drains (L{ChunkedBody}) or, once
a rate is set, by a paced push producer (L{PacedBody}).
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from clients import expect_200, get_json
from harness import REPO, Service, Services, clean_env
from twisted.internet.interfaces import IPullProducer, IPushProducer
from twisted.web.server import Request
from zope.interface import implementer

JSON_ACCEPT = "application/vnd.pypi.simple.v1+json"
HTML_ACCEPT = "text/html"
MB = 1024 * 1024
#: The script whose C{--serve-upstream} runs L{serve_upstream}.
SCRIPT = Path(__file__).resolve().with_name("bench.py")

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
# A paced upstream (a rate set through /_rate) writes this much at a time, from a token
# bucket of this size: bursts of at most 1 MB, as a link with a router's buffer would pass.
PACE_PIECE = 128 * 1024
PACE_BURST = 1024 * 1024


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


# --- The server --------------------------------------------------------------------------------


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


# --- The bench's side --------------------------------------------------------------------------


def start_upstream(services: Services, work: Path, port: int, *flags: str, script: Path = SCRIPT) -> Service:
    """
    Start (not wait for) C{script --serve-upstream PORT FLAGS} as the
    service C{upstream}, with the checkout on its path.
    """
    argv = [sys.executable, str(script), "--serve-upstream", str(port), *flags]
    env = clean_env(PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    return services.start("upstream", argv, env, port, work)


def sizes(
    file_kb: int, big_mb: int, big_files: int, uv_rounds: int, huge_mb: int, huge_files: int
) -> list[str]:
    """
    The C{--serve-upstream} flags for what L{build_dists} builds.
    """
    return [
        "--file-kb",
        str(file_kb),
        "--big-mb",
        str(big_mb),
        "--upstream-big-files",
        str(big_files),
        "--uv-rounds",
        str(uv_rounds),
        "--huge-mb",
        str(huge_mb),
        "--upstream-huge-files",
        str(huge_files),
    ]


@dataclass
class UpstreamFile:
    project: str
    filename: str
    size: int
    sha256: str
    path: str  # on the upstream


def upstream_file(upstream: Service, project: str) -> UpstreamFile:
    """
    C{project}'s 1.0 wheel, as the upstream's JSON page lists it.
    """
    filename = wheel_name(project, "1.0")
    page = json.loads(expect_200(f"{upstream.base}/simple/{project}/", JSON_ACCEPT).body)
    for entry in page["files"]:
        if entry["filename"] == filename:
            return UpstreamFile(
                project, filename, int(entry["size"]), entry["hashes"]["sha256"], f"/packages/{filename}"
            )
    raise RuntimeError(f"the upstream does not list {filename}")


def huge_file(upstream: Service, index: int) -> UpstreamFile:
    """
    Huge wheel C{index}, as the upstream's JSON page lists it.
    """
    return upstream_file(upstream, HUGE_PROJECT.format(index))


def counts(upstream: Service) -> Any:
    """
    The upstream's request counters since the last L{reset}: C{requests}
    (path -> count), C{methods} (method -> count) and C{non_get}.
    """
    return get_json(f"{upstream.base}/_counts")


def reset(upstream: Service) -> None:
    """
    Set the upstream's request counters to zero.
    """
    get_json(f"{upstream.base}/_reset")


def upstream_gets(upstream: Service, path: str) -> tuple[int, int]:
    """
    The GETs and the other requests the upstream answered for C{path} since the last L{reset}.
    """
    found = counts(upstream)
    others = sum(1 for line in found["non_get"] if line.split(" ", 1)[1] == path)
    return found["requests"].get(path, 0) - others, others


def set_rate(upstream: Service, bytes_per_second: float) -> None:
    """
    Pace the upstream's file bodies from now on (0: as fast as the socket drains).
    """
    get_json(f"{upstream.base}/_rate?bytes_per_second={bytes_per_second:.0f}")

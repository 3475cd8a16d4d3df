"""
The proxy over real loopback HTTP, against the fake upstream in JSON and in
HTML-only mode: pages, files, single flight, bad input and upstream faults.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from treq.client import HTTPClient
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.resource import Resource
from twisted.web.server import Site

from tests.conftest import Running, Served, get_reactor, listen
from txpypi.core.simple.media import HTML_LEGACY, HTML_V1, JSON_V1
from txpypi.testing import Dist, FakeUpstream, build_wheel

JSON_ACCEPT = {b"Accept": [JSON_V1.encode()]}


def find(dists: list[Dist], filename: str) -> Dist:
    return next(d for d in dists if d.filename == filename)


def header(response: Any, name: str) -> str | None:
    values = response.headers.getRawHeaders(name.encode())
    return None if values is None else values[0].decode()


def cached_files(running: Running) -> list[Path]:
    root = Path(running.proxy.files._store.root) / "files"  # type: ignore[attr-defined]
    return sorted(p for p in root.rglob("*") if p.is_file())


# -- pages


@pytest_twisted.ensureDeferred
async def test_project_page_in_both_formats(proxy: Running, upstream: Served, http: HTTPClient) -> None:
    response = await http.get(proxy.url + "/simple/beta/", headers=JSON_ACCEPT)
    assert response.code == 200
    assert header(response, "content-type") == JSON_V1
    assert header(response, "vary") == "Accept, Accept-Encoding"
    assert header(response, "x-cache") == "MISS"
    assert header(response, "cache-control") in ("max-age=600", "max-age=599")
    data = json.loads(await response.content())
    filenames = [f["filename"] for f in data["files"]]
    assert filenames == ["beta-1.0-py3-none-any.whl", "beta-1.1-py3-none-any.whl", "beta-1.1.tar.gz"]
    assert all(f["url"] == f"../../files/beta/{f['filename']}" for f in data["files"])
    assert data["versions"] == ["1.0", "1.1"]
    wheel = data["files"][1]
    assert wheel["core-metadata"] == wheel["dist-info-metadata"]
    assert set(wheel["core-metadata"]) == {"sha256"}
    if upstream.fake.mode == "json":
        # Only a JSON upstream can tell sizes and upload times.
        assert wheel["size"] > 0 and wheel["upload-time"].startswith("2024-01-02")

    response = await http.get(proxy.url + "/simple/beta/", headers={b"Accept": [b"text/html"]})
    assert header(response, "content-type") == HTML_LEGACY
    assert header(response, "x-cache") == "HIT"
    html = (await response.content()).decode()
    assert 'href="../../files/beta/beta-1.1-py3-none-any.whl#sha256=' in html

    response = await http.get(proxy.url + "/simple/gamma/?format=" + HTML_V1, headers=JSON_ACCEPT)
    assert header(response, "content-type") == HTML_V1
    html = (await response.content()).decode()
    assert 'data-yanked="broken build"' in html and 'data-requires-python="&gt;=3.8"' in html
    assert upstream.fake.requests["/simple/beta/"] == 1


@pytest_twisted.ensureDeferred
async def test_project_list(proxy: Running, upstream: Served, http: HTTPClient) -> None:
    response = await http.get(proxy.url + "/simple/", headers=JSON_ACCEPT)
    assert response.code == 200 and header(response, "x-cache") == "MISS"
    names = [p["name"] for p in json.loads(await response.content())["projects"]]
    assert names == ["alpha", "beta", "big", "gamma"]
    response = await http.get(proxy.url + "/simple/")
    assert header(response, "x-cache") == "HIT"
    assert b'<a href="alpha/">alpha</a>' in await response.content()


@pytest_twisted.ensureDeferred
async def test_redirects_and_bad_requests(proxy: Running, upstream: Served, http: HTTPClient) -> None:
    cases = [
        ("/simple/Beta_/?format=text/html", 400, None),
        ("/simple/Gamma/?format=text/html", 301, "/simple/gamma/?format=text/html"),
        ("/simple/gamma", 301, "/simple/gamma/"),
        ("/simple", 301, "/simple/"),
        ("/simple/no-such-thing/", 404, None),
        ("/simple/gamma/extra", 404, None),
        ("/files/gamma/../../etc/passwd", 404, None),
        ("/files/gamma/..%2F..%2Fetc%2Fpasswd", 400, None),
        ("/files/gamma/a%00b.whl", 400, None),
        ("/files/gamma/" + "x" * 256, 400, None),
        ("/files/gamma/not-listed-1.0.tar.gz", 404, None),
        ("/files/Gamma/gamma-0.5-py3-none-any.whl", 404, None),
        ("/files/no-such-thing/x-1.0.tar.gz", 404, None),
        ("/files/gamma/gamma-0.5.tar.gz.metadata", 404, None),
    ]
    before = upstream.fake.file_requests()
    for path, code, location in cases:
        response = await http.get(proxy.url + path, allow_redirects=False)
        body = await response.content()
        assert response.code == code, (path, body)
        assert body.count(b"\n") == 1 and len(body) < 300, (path, body)
        if location is not None:
            assert header(response, "location") == location
    assert upstream.fake.file_requests() == before == 0
    response = await http.get(proxy.url + "/")
    assert response.code == 200 and f"{proxy.url}/simple/".encode() in await response.content()
    response = await http.get(proxy.url + "/no/such/route")
    assert response.code == 404
    await response.content()
    response = await http.get(proxy.url + "/simple/gamma/", headers={b"Accept": [b"application/json"]})
    assert response.code == 406
    await response.content()


@pytest_twisted.ensureDeferred
async def test_page_single_flight(upstream: Served, proxy_factory: Any, http: HTTPClient) -> None:
    """
    50 concurrent requests for one uncached page: one upstream GET.
    """
    gate: Deferred[None] = Deferred()
    held = _HeldUpstream(upstream.fake, "/simple/alpha/", gate)
    port = listen(Site(held))
    try:
        running = proxy_factory(f"http://127.0.0.1:{port.getHost().port}/simple/")
        arrived = _count_arrivals(running, 50)
        requests = [http.get(running.url + "/simple/alpha/", headers=JSON_ACCEPT) for _ in range(50)]
        await arrived
        gate.callback(None)
        responses = await gatherResults(requests)
        bodies = await gatherResults([r.content() for r in responses])
        assert {r.code for r in responses} == {200}
        assert len(set(bodies)) == 1
        assert upstream.fake.requests["/simple/alpha/"] == 1
    finally:
        await port.stopListening()


class _HeldUpstream(Resource):
    """
    Holds one path's answer until C{gate} fires.
    """

    isLeaf = True

    def __init__(self, fake: Resource, path: str, gate: Deferred[None]) -> None:
        super().__init__()
        self._fake, self._path, self._gate = fake, path, gate

    def render(self, request: Any) -> Any:
        if request.path.decode() != self._path:
            return self._fake.render(request)
        from twisted.web.server import NOT_DONE_YET

        def go(_: object) -> None:
            body = self._fake.render(request)
            request.write(body)
            request.finish()

        self._gate.addCallback(go)
        return NOT_DONE_YET


def _count_arrivals(running: Running, n: int) -> Deferred[None]:
    """
    Fire once C{n} requests reached the proxy's resources.
    """
    site = running.port.factory
    root = site.resource
    done: Deferred[None] = Deferred()
    count = [0]

    class Counting(Resource):
        def getChildWithDefault(self, path: bytes, request: Any) -> Any:
            count[0] += 1
            child = root.getChildWithDefault(path, request)
            if count[0] == n:
                get_reactor().callLater(0, done.callback, None)
            return child

    site.resource = Counting()
    return done


# -- files


@pytest_twisted.ensureDeferred
async def test_file_miss_then_hit(
    proxy: Running, upstream: Served, http: HTTPClient, dists: list[Dist]
) -> None:
    await http.get(proxy.url + "/simple/beta/")
    for name in ("beta-1.1-py3-none-any.whl", "beta-1.1.tar.gz"):
        dist = find(dists, name)
        response = await http.get(proxy.url + f"/files/beta/{name}")
        assert response.code == 200
        assert header(response, "x-cache") == "MISS"
        assert header(response, "cache-control") == "public, max-age=365000000, immutable"
        assert response.length == len(dist.content)  # Content-Length
        assert await response.content() == dist.content
        response = await http.get(proxy.url + f"/files/beta/{name}")
        assert header(response, "x-cache") == "HIT"
        assert header(response, "etag") == f'"{dist.sha256}"'
        assert await response.content() == dist.content
        assert upstream.fake.requests[f"/packages/{name}"] == 1
    # PEP 658 metadata, verified against its own hash.
    wheel = find(dists, "beta-1.1-py3-none-any.whl")
    response = await http.get(proxy.url + "/files/beta/beta-1.1-py3-none-any.whl.metadata")
    assert response.code == 200 and await response.content() == wheel.metadata
    head = await http.head(proxy.url + "/files/beta/beta-1.1-py3-none-any.whl")
    assert head.code == 200 and header(head, "x-cache") == "HIT"
    await Deferred.fromCoroutine(proxy.proxy.files.wait_idle())
    stored = {p.name: p.read_bytes() for p in cached_files(proxy)}
    assert stored["beta-1.1-py3-none-any.whl"] == wheel.content
    assert stored["beta-1.1-py3-none-any.whl.metadata"] == wheel.metadata


@pytest_twisted.ensureDeferred
async def test_file_without_page_request_first(
    proxy: Running, upstream: Served, http: HTTPClient, dists: list[Dist]
) -> None:
    """
    A file URL works on a cold proxy: the proxy reads the index itself to
    find the upstream URL.
    """
    dist = find(dists, "gamma-0.5-py3-none-any.whl")
    response = await http.get(proxy.url + "/files/gamma/gamma-0.5-py3-none-any.whl")
    assert await response.content() == dist.content
    assert upstream.fake.requests["/simple/gamma/"] == 1


class _Collector(Protocol):
    def __init__(self) -> None:
        self.chunks: list[bytes] = []
        self.first: Deferred[None] = Deferred()
        self.done: Deferred[None] = Deferred()
        self.reason: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.chunks.append(data)
        if not self.first.called:
            self.first.callback(None)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        if not self.first.called:
            self.first.callback(None)
        self.reason = reason
        self.done.callback(None)


@pytest_twisted.ensureDeferred
async def test_single_flight_streams_to_all_clients(
    json_upstream: Served, proxy_factory: Any, http: HTTPClient, dists: list[Dist]
) -> None:
    """
    50 clients ask for one uncached file while the upstream is mid-body:
    one upstream GET; every client already has bytes before the upstream
    finishes (streaming, not store-and-forward) but never the whole file;
    all get identical, correct bodies.
    """
    big = find(dists, "big-1.0-py3-none-any.whl")
    gate: Deferred[None] = Deferred()
    json_upstream.fake.holds[big.filename] = gate
    running = proxy_factory(json_upstream.url)
    url = running.url + "/files/big/" + big.filename
    responses = await gatherResults(
        [http.get(url, unbuffered=True) for _ in range(50)]  # type: ignore[call-arg]
    )
    assert {header(r, "x-cache") for r in responses} == {"MISS"}
    assert {r.length for r in responses} == {len(big.content)}
    collectors = []
    for r in responses:
        c = _Collector()
        r.deliverBody(c)
        collectors.append(c)
    await gatherResults([c.first for c in collectors])
    assert all(0 < sum(map(len, c.chunks)) < len(big.content) for c in collectors)
    gate.callback(None)
    await gatherResults([c.done for c in collectors])
    assert all(b"".join(c.chunks) == big.content for c in collectors)
    await Deferred.fromCoroutine(running.proxy.files.wait_idle())
    assert json_upstream.fake.requests["/packages/" + big.filename] == 1
    assert running.proxy.files.downloads.flights == {}


@pytest.mark.parametrize("fault", ["wrong-bytes", "cut", "truncated"])
@pytest_twisted.ensureDeferred
async def test_bad_download_is_aborted_and_not_cached(
    fault: str, json_upstream: Served, proxy_factory: Any, http: HTTPClient, dists: list[Dist]
) -> None:
    """
    A hash mismatch or a cut upstream connection: every client's connection
    is aborted short of the full length, nothing is cached, and the next
    request fetches afresh.
    """
    big = find(dists, "big-1.0-py3-none-any.whl")
    json_upstream.fake.faults[big.filename] = fault  # type: ignore[assignment]
    gate: Deferred[None] = Deferred()
    json_upstream.fake.holds[big.filename] = gate
    running = proxy_factory(json_upstream.url)
    url = running.url + "/files/big/" + big.filename
    responses = await gatherResults([http.get(url, unbuffered=True) for _ in range(3)])  # type: ignore[call-arg]
    assert {r.code for r in responses} == {200}
    collectors = []
    for r in responses:
        c = _Collector()
        r.deliverBody(c)
        collectors.append(c)
    gate.callback(None)
    for c in collectors:
        await c.done
        received = b"".join(c.chunks)
        assert len(received) < len(big.content)
        assert c.reason is not None and not c.reason.check(ResponseDone)
    del json_upstream.fake.holds[big.filename]
    await Deferred.fromCoroutine(running.proxy.files.wait_idle())
    assert cached_files(running) == []
    assert list((Path(running.proxy.files._store.spool_dir)).iterdir()) == []  # type: ignore[attr-defined]
    del json_upstream.fake.faults[big.filename]
    response = await http.get(url)
    assert hashlib.sha256(await response.content()).hexdigest() == big.sha256
    assert json_upstream.fake.requests["/packages/" + big.filename] == 2
    await Deferred.fromCoroutine(running.proxy.files.wait_idle())
    assert [p.name for p in cached_files(running)] == [big.filename]


@pytest_twisted.ensureDeferred
async def test_upstream_errors(json_upstream: Served, proxy_factory: Any, http: HTTPClient) -> None:
    running = proxy_factory(json_upstream.url)
    json_upstream.fake.page_faults["beta"] = "500"
    response = await http.get(running.url + "/simple/beta/")
    body = await response.content()
    assert response.code == 502 and b"500" in body and body.count(b"\n") == 1
    json_upstream.fake.faults["gamma-0.5-py3-none-any.whl"] = "500"
    response = await http.get(running.url + "/files/gamma/gamma-0.5-py3-none-any.whl")
    assert response.code == 502
    await response.content()
    await Deferred.fromCoroutine(running.proxy.files.wait_idle())
    # Upstream down altogether: nothing listens on its port.
    down = proxy_factory("http://127.0.0.1:1/simple/", cache_dir=running.proxy.files._store.root / "down")
    response = await http.get(down.url + "/simple/alpha/")
    body = await response.content()
    assert response.code == 502 and b"unreachable" in body


@pytest_twisted.ensureDeferred
async def test_cache_survives_restart(
    json_upstream: Served, proxy_factory: Any, http: HTTPClient, tmp_path: Path, dists: list[Dist]
) -> None:
    first = proxy_factory(json_upstream.url, tmp_path / "c")
    name = "gamma-0.5-py3-none-any.whl"
    assert await (await http.get(first.url + "/files/gamma/" + name)).content() == find(dists, name).content
    await Deferred.fromCoroutine(first.proxy.files.wait_idle())
    await first.stop()
    second = proxy_factory(json_upstream.url, tmp_path / "c")
    page = await http.get(second.url + "/simple/gamma/")
    assert header(page, "x-cache") == "HIT"
    await page.content()
    response = await http.get(second.url + "/files/gamma/" + name)
    assert header(response, "x-cache") == "HIT"
    assert await response.content() == find(dists, name).content
    assert json_upstream.fake.requests["/packages/" + name] == 1
    assert json_upstream.fake.requests["/simple/gamma/"] == 1


@pytest_twisted.ensureDeferred
async def test_client_that_leaves_does_not_cancel_the_fetch(
    json_upstream: Served, proxy_factory: Any, http: HTTPClient, dists: list[Dist]
) -> None:
    big = find(dists, "big-1.0-py3-none-any.whl")
    gate: Deferred[None] = Deferred()
    json_upstream.fake.holds[big.filename] = gate
    running = proxy_factory(json_upstream.url)
    url = running.url + "/files/big/" + big.filename
    leaver = await http.get(url, unbuffered=True)  # type: ignore[call-arg]
    c = _Collector()
    leaver.deliverBody(c)
    await c.first
    c.transport.stopProducing()  # type: ignore[union-attr]
    await c.done
    gate.callback(None)
    # The flight goes on to the end for later clients.
    (flight,) = running.proxy.files.downloads.flights.values()
    assert await Deferred.fromCoroutine(flight.readers.read(len(big.content), 1)) == b""
    assert flight.verified
    response = await http.get(url)
    assert await response.content() == big.content
    assert json_upstream.fake.requests["/packages/" + big.filename] == 1


@pytest_twisted.ensureDeferred
async def test_stalled_upstream_fails_promptly(
    json_upstream: Served, tmp_path: Path, http: HTTPClient
) -> None:
    """
    An upstream that stops sending mid-page or mid-file: the fetch fails
    after --read-timeout (0.3 s here), the client of the page gets 504, the
    clients of the file are aborted, and nothing is left in flight.
    """
    from txpypi.config import Settings
    from txpypi.tap import build

    json_upstream.fake.page_faults["beta"] = "stall"
    json_upstream.fake.faults["gamma-0.5-py3-none-any.whl"] = "stall"
    settings = Settings(
        listen=(), upstream=json_upstream.url, cache_dir=str(tmp_path / "c"), read_timeout=0.3
    )
    service, proxy = build(settings, get_reactor())
    service.startService()
    port = listen(proxy.site())
    running = Running(proxy, service, port)
    try:
        response = await http.get(running.url + "/simple/beta/")
        body = await response.content()
        assert response.code == 504 and b"timed out" in body
        assert "default/simple/beta/" not in proxy.pages._flights

        response = await http.get(running.url + "/files/gamma/gamma-0.5-py3-none-any.whl", unbuffered=True)  # type: ignore[call-arg]
        assert response.code == 200
        c = _Collector()
        response.deliverBody(c)
        await c.done
        assert c.reason is not None and not c.reason.check(ResponseDone)
        await Deferred.fromCoroutine(proxy.files.wait_idle())
        assert cached_files(running) == []
    finally:
        await running.stop()


@pytest_twisted.ensureDeferred
async def test_another_upstream_or_hash_is_fetched_again(
    json_upstream: Served, proxy_factory: Any, http: HTTPClient, tmp_path: Path, dists: list[Dist]
) -> None:
    """
    A cached file is served only while it is what the configured upstream
    lists: after switching upstream, or when a fresh index lists another
    hash, it is fetched again.
    """
    name = "gamma-0.5-py3-none-any.whl"
    first = proxy_factory(json_upstream.url, tmp_path / "c")
    assert await (await http.get(first.url + "/files/gamma/" + name)).content() == find(dists, name).content
    await Deferred.fromCoroutine(first.proxy.files.wait_idle())
    await first.stop()

    other = FakeUpstream([build_wheel("gamma", "0.5", ["beta"])])
    port = listen(Site(other))
    try:
        second = proxy_factory(f"http://127.0.0.1:{port.getHost().port}/simple/", tmp_path / "c")
        response = await http.get(second.url + "/files/gamma/" + name)
        assert header(response, "x-cache") == "MISS"
        replacement = other.dists["gamma"][0].content
        assert replacement != find(dists, name).content
        assert await response.content() == replacement
        await Deferred.fromCoroutine(second.proxy.files.wait_idle())
        # Same upstream, same name, new bytes: the fresh index says so.
        other.dists["gamma"] = [build_wheel("gamma", "0.5", ["alpha"])]
        second.proxy.pages.ttl = 0  # the next page request goes upstream
        await (await http.get(second.url + "/simple/gamma/")).content()
        second.proxy.pages.ttl = 600
        response = await http.get(second.url + "/files/gamma/" + name)
        assert header(response, "x-cache") == "MISS"
        assert await response.content() == other.dists["gamma"][0].content
        assert other.requests["/packages/" + name] == 2
    finally:
        await port.stopListening()


@pytest.mark.parametrize("fault, reason", [("503", b"503"), ("404", b"no file"), ("long", b"Content-Length")])
@pytest_twisted.ensureDeferred
async def test_upstream_file_faults_before_the_body(
    fault: str, reason: bytes, json_upstream: Served, proxy_factory: Any, http: HTTPClient, dists: list[Dist]
) -> None:
    """
    Faults seen before any byte is sent get a status with a one-line reason;
    nothing is cached and the next request asks again.
    """
    name = "gamma-0.5-py3-none-any.whl"
    json_upstream.fake.faults[name] = fault  # type: ignore[assignment]
    running = proxy_factory(json_upstream.url)
    url = running.url + "/files/gamma/" + name
    response = await http.get(url)
    body = await response.content()
    assert response.code == (404 if fault == "404" else 502) and reason in body and body.count(b"\n") == 1
    await Deferred.fromCoroutine(running.proxy.files.wait_idle())
    assert cached_files(running) == []
    del json_upstream.fake.faults[name]
    assert await (await http.get(url)).content() == find(dists, name).content
    assert json_upstream.fake.requests["/packages/" + name] == 2


@pytest_twisted.ensureDeferred
async def test_slow_upstream_streams_through(
    json_upstream: Served, proxy_factory: Any, http: HTTPClient, dists: list[Dist]
) -> None:
    """
    An upstream that trickles 4 KiB per millisecond: the file arrives whole
    and verified, in many pieces, and is cached.
    """
    name = "beta-1.1.tar.gz"
    json_upstream.fake.faults[name] = "slow"
    running = proxy_factory(json_upstream.url)
    response = await http.get(running.url + "/files/beta/" + name)
    assert await response.content() == find(dists, name).content
    await Deferred.fromCoroutine(running.proxy.files.wait_idle())
    assert [p.name for p in cached_files(running)] == [name]

"""
What bounds the clients of the HTTP server: the send timeout (a client
that takes no bytes is cut off), the request deadline and the idle timeout
(slow or idle clients), request body limits (413 before the body is read),
the connection cap, the one-second memo of C{/}, C{/stats} and C{/health},
and the admin route of the project list.

The channel's timers are driven with a L{Clock} over a L{StringTransport};
each behaviour is also shown on a real loopback connection.
"""

from __future__ import annotations

import socket
import ssl
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from treq.testing import RequestTraversalAgent, StubTreq
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Protocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.web import http
from twisted.web.client import ResponseNeverReceived
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

from tests.conftest import TLS, Served, get_reactor
from tests.integration.test_proxy import find
from txpypi.cache.files import FileCache
from txpypi.cache.pages import PageCache
from txpypi.config import Settings
from txpypi.core.live import Live
from txpypi.fetch.upstream import Upstream, UpstreamClient
from txpypi.options import Running
from txpypi.storage.memory import MemoryStore
from txpypi.storage.metadata import MemoryMetadata
from txpypi.storage.outages import Outage
from txpypi.tap import Options
from txpypi.testing import Dist, FakeUpstream, build_wheel
from txpypi.web.app import Proxy
from txpypi.web.memo import MEMO_ENTRIES, Memo
from txpypi.web.metrics import Metrics
from txpypi.web.server import MAX_GET_BODY, MAX_REQUEST_BODY, ConnectionLimits, ProxyChannel, ProxySite

BIG = "big-1.0-py3-none-any.whl"
TOKEN = "s3cret-token-for-the-tests"
CLIENT = IPv4Address("TCP", "10.0.0.9", 40000)


# -- helpers


def sample(metrics: Metrics, name: str, **labels: str) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


@attrs.define
class Logged:
    """
    The log events whose format contains C{text}, with a Deferred for the
    first of them.
    """

    text: str
    events: list[dict[str, Any]] = attrs.field(factory=list)
    first: Deferred[None] = attrs.field(factory=Deferred)

    def __call__(self, event: dict[str, Any]) -> None:
        if self.text in (event.get("log_format") or ""):
            self.events.append(event)
            if not self.first.called:
                self.first.callback(None)


@pytest.fixture
def logged() -> Iterator[Any]:
    observers: list[Logged] = []

    def watch(text: str) -> Logged:
        observer = Logged(text)
        globalLogPublisher.addObserver(observer)
        observers.append(observer)
        return observer

    yield watch
    for observer in observers:
        globalLogPublisher.removeObserver(observer)


def unit_proxy(clock: Clock, metadata: Any, fake: FakeUpstream, spool: str, **more: Any) -> Proxy:
    client = UpstreamClient(clock, agent=RequestTraversalAgent(fake))
    pages = PageCache(clock, client, metadata, Upstream("test", "http://upstream.test/simple/"))
    files = FileCache(clock, client, MemoryStore(spool), metadata, pages)
    return Proxy(pages, files, clock, client=client, **more)


@pytest.fixture
def temp_files(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """
    Counts the temporary files that Twisted's HTTP server makes for request
    bodies.
    """
    made: list[int] = []
    real = tempfile.TemporaryFile

    def counting(*args: Any, **kwargs: Any) -> Any:
        made.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(http.tempfile, "TemporaryFile", counting)
    return made


class Hello(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:
        return b"x" * 100


class Slow(Resource):
    """
    A resource that answers when told to; counts what it rendered.
    """

    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.requests: list[Request] = []

    def render(self, request: Request) -> int:
        self.requests.append(request)
        return NOT_DONE_YET


def make_site(clock: Clock, resource: Resource | None = None, send_timeout: float = 5.0) -> ProxySite:
    root = resource if resource is not None else Hello()
    limits = ConnectionLimits(Live(max_connections=1024, send_timeout=send_timeout, log_format="none"))
    return ProxySite(root, clock, Metrics.create(), connections=limits)


def connect(site: ProxySite) -> tuple[ProxyChannel, StringTransport]:
    channel = site.buildProtocol(CLIENT)
    assert isinstance(channel, ProxyChannel)
    transport = StringTransport(peerAddress=CLIENT)
    channel.makeConnection(transport)
    return channel, transport


def close(channel: ProxyChannel) -> None:
    channel.connectionLost(Failure(ConnectionDone()))


GET = b"GET / HTTP/1.1\r\nHost: proxy.test\r\n\r\n"


# -- the send timeout, on a Clock


def test_a_client_that_takes_no_bytes_is_cut_off_after_send_timeout(logged: Any) -> None:
    """
    The transport pauses the channel when the client stops taking bytes;
    a pause that lasts send-timeout cuts the client off (one log line, one
    count), and a resume in time keeps it.
    """
    clock = Clock()
    slow = Slow()
    site = make_site(clock, slow, send_timeout=5)
    channel, transport = connect(site)
    cut = logged("took no bytes")
    channel.dataReceived(GET)
    request = slow.requests[0]
    request.write(b"a body that takes long")
    channel.pauseProducing()  # the client's receive window is full
    clock.advance(4.9)
    assert not transport.disconnected
    channel.resumeProducing()  # it took some bytes
    clock.advance(60)
    assert not transport.disconnected
    channel.pauseProducing()
    clock.advance(4.9)
    assert not transport.disconnected
    clock.advance(0.1)
    assert transport.disconnected  # aborted
    assert len(cut.events) == 1 and cut.events[0]["client"] == "10.0.0.9"
    assert sample(site.metrics, "txpypi_client_timeouts_total", kind="send") == 1
    close(channel)
    assert request._disconnected
    assert not [c for c in clock.getDelayedCalls() if c.active()]


def test_a_finished_response_the_client_does_not_take_is_cut_off_too() -> None:
    """
    A response that the resource finished but that still fills the
    transport's buffer holds the connection as well: the pause times out
    the same.
    """
    clock = Clock()
    site = make_site(clock, send_timeout=5)
    channel, transport = connect(site)
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: p\r\nConnection: close\r\n\r\n")
    assert transport.value().startswith(b"HTTP/1.1 200 OK") and transport.disconnecting
    channel.pauseProducing()
    clock.advance(5)
    assert transport.disconnected
    close(channel)


def test_the_send_timeout_covers_a_response_in_progress_and_is_read_live() -> None:
    """
    A response still being written (its resource has not finished) is cut
    off too, after the send-timeout in force when the pause began.
    """
    clock = Clock()
    slow = Slow()
    site = make_site(clock, slow, send_timeout=5)
    channel, transport = connect(site)
    channel.dataReceived(GET)
    request = slow.requests[0]
    request.write(b"part of a body")
    site.connections.live.send_timeout = 2  # SIGHUP
    channel.pauseProducing()
    clock.advance(2)
    assert transport.disconnected
    close(channel)
    assert request._disconnected


# -- slow requests and idle connections, on a Clock


def test_a_request_must_arrive_within_send_timeout() -> None:
    """
    A request trickled a byte at a time (which resets an idle timeout
    forever) gets a 408 and is closed send-timeout after its first byte.
    """
    clock = Clock()
    slow = Slow()
    site = make_site(clock, slow, send_timeout=5)
    channel, transport = connect(site)
    channel.dataReceived(b"GET / HTTP/1.1\r\n")
    for byte in b"Host: pr":
        clock.advance(0.6)
        channel.dataReceived(bytes([byte]))
    assert not transport.disconnecting
    clock.advance(5 - 0.6 * 8)
    assert transport.disconnecting and transport.value().startswith(b"HTTP/1.1 408 ")
    assert transport.value().endswith(b"\r\n\r\nthe request did not arrive within 5 s\n")
    assert slow.requests == []
    assert sample(site.metrics, "txpypi_client_timeouts_total", kind="request") == 1
    assert sample(site.metrics, "txpypi_requests_total", route="home", code="408") == 1
    close(channel)


def test_an_idle_keep_alive_connection_is_closed_after_send_timeout() -> None:
    """
    Between requests, a keep-alive connection idle for send-timeout is
    closed; a request that takes long to answer is not cut (neither timer
    runs while it is handled).
    """
    clock = Clock()
    slow = Slow()
    site = make_site(clock, slow, send_timeout=5)
    channel, transport = connect(site)
    channel.dataReceived(GET)
    clock.advance(100)  # the answer takes long: nothing is cut meanwhile
    assert not transport.disconnecting
    request = slow.requests[0]
    request.write(b"done")
    request.finish()
    clock.advance(4.9)
    assert not transport.disconnecting
    channel.dataReceived(GET)  # a second request on the same connection
    slow.requests[1].finish()
    clock.advance(4.9)
    assert not transport.disconnecting
    clock.advance(0.1)
    assert transport.disconnecting
    close(channel)


# -- request bodies, on a StringTransport


def test_a_declared_body_past_the_limit_gets_413_before_it_is_read(temp_files: list[int]) -> None:
    """
    A GET that declares a body past MAX_GET_BODY, and any request past
    MAX_REQUEST_BODY, gets a 413 with a one-line reason as soon as its
    headers are in, is not dispatched, and makes no temporary file; bodies
    within the limits are read (in memory) and the request dispatched.
    """
    clock = Clock()
    slow = Slow()
    site = make_site(clock, slow)
    for method, length in ((b"GET", 10**12), (b"HEAD", MAX_GET_BODY + 1), (b"DELETE", MAX_REQUEST_BODY + 1)):
        channel, transport = connect(site)
        channel.dataReceived(
            b"%s /cache/x HTTP/1.1\r\nHost: p\r\nContent-Length: %d\r\n\r\n" % (method, length)
        )
        channel.dataReceived(b"x" * 1000)  # never read
        answer = transport.value()
        assert answer.startswith(b"HTTP/1.1 413 Content Too Large\r\n"), method
        assert answer.endswith(
            b"\r\n\r\nrequest body too large: at most %d bytes"
            % (MAX_GET_BODY if method != b"DELETE" else MAX_REQUEST_BODY)
            + (b" on GET and HEAD\n" if method != b"DELETE" else b"\n")
        )
        assert transport.disconnecting
        close(channel)
    assert slow.requests == [] and temp_files == []
    assert sample(site.metrics, "txpypi_requests_total", route="admin", code="413") == 3

    for method, length in ((b"GET", MAX_GET_BODY), (b"POST", MAX_REQUEST_BODY)):
        channel, transport = connect(site)
        channel.dataReceived(b"%s / HTTP/1.1\r\nHost: p\r\nContent-Length: %d\r\n\r\n" % (method, length))
        channel.dataReceived(b"y" * length)
        request = slow.requests[-1]
        assert request.method == method and request.content.read() == b"y" * length
        close(channel)
    assert len(slow.requests) == 2 and temp_files == []


def chunked(body: bytes, size: int) -> bytes:
    return b"".join(
        b"%x\r\n%s\r\n" % (len(body[i : i + size]), body[i : i + size]) for i in range(0, len(body), size)
    )


def test_a_chunked_body_is_counted_as_it_arrives(temp_files: list[int]) -> None:
    """
    A chunked body (no declared length) is kept in memory, not a temporary
    file, and cut with a 413 as soon as it passes the limit; the rest of it
    is not read, and the request never dispatched.
    """
    clock = Clock()
    slow = Slow()
    site = make_site(clock, slow)
    channel, transport = connect(site)
    channel.dataReceived(b"DELETE /cache/x HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n")
    sent = 0
    while not transport.disconnecting:
        channel.dataReceived(chunked(b"z" * 1024, 1024))
        sent += 1024
    assert sent == MAX_REQUEST_BODY + 1024
    channel.dataReceived(chunked(b"z" * 1024, 1024) + b"0\r\n\r\n")  # ignored
    assert transport.value().startswith(b"HTTP/1.1 413 ")
    assert slow.requests == [] and temp_files == []
    close(channel)

    channel, transport = connect(site)
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n")
    channel.dataReceived(chunked(b"w" * 100, 10) + b"0\r\n\r\n")
    assert slow.requests[0].content.read() == b"w" * 100 and temp_files == []
    close(channel)


# -- the same, on real loopback connections


def exchange(
    port: int, data: bytes, more: bytes = b"", repeat: int = 0, timeout: float = 10
) -> tuple[bytes, int]:
    """
    In a thread: send C{data}, then C{more} up to C{repeat} times (as long
    as the server takes it), then read until the server closes.

    @return: what the server answered, and how many of C{more} went out.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        sent = 0
        try:
            for _ in range(repeat):
                s.sendall(more)
                sent += 1
        except OSError:
            pass
        answer = b""
        try:
            while chunk := s.recv(65536):
                answer += chunk
        except ConnectionResetError:
            pass
        return answer, sent


@pytest_twisted.ensureDeferred
async def test_body_limits_over_loopback(
    json_upstream: Served, proxy_factory: Any, temp_files: list[int]
) -> None:
    """
    Over a raw socket: a GET declaring a terabyte of body gets its 413 with
    not one byte of the body sent; a chunked body past the limit is cut
    while the client is still sending it; nothing is spooled.
    """
    running = proxy_factory(json_upstream.url)
    port = running.port.getHost().port
    answer, _ = await deferToThread(
        exchange, port, b"GET /simple/ HTTP/1.1\r\nHost: p\r\nContent-Length: 1000000000000\r\n\r\n"
    )
    assert answer.startswith(b"HTTP/1.1 413 Content Too Large\r\n")
    assert answer.endswith(
        b"\r\n\r\nrequest body too large: at most %d bytes on GET and HEAD\n" % MAX_GET_BODY
    )

    piece = chunked(b"c" * 8192, 8192)
    head = b"DELETE /cache/alpha HTTP/1.1\r\nHost: p\r\nTransfer-Encoding: chunked\r\n\r\n"
    answer, sent = await deferToThread(exchange, port, head, piece, 1024)  # 8 MiB, if the server took it
    assert sent < 1024
    assert answer == b"" or answer.startswith(b"HTTP/1.1 413 ")
    assert temp_files == []
    assert sample(running.proxy.metrics, "txpypi_requests_total", route="admin", code="413") == 1
    assert sample(running.proxy.metrics, "txpypi_requests_total", route="simple", code="413") == 1


@pytest.mark.parametrize("scheme", ["http", "https"])
@pytest_twisted.ensureDeferred
async def test_a_client_that_never_reads_is_cut_off_over_loopback(
    json_upstream: Served, proxy_factory: Any, dists: list[Dist], logged: Any, tls: TLS, scheme: str
) -> None:
    """
    A real client (over plain TCP and over TLS) that asks for a large file
    and never reads is cut off once it took nothing for send-timeout: one
    log line, and the client finds its connection reset, with only part of
    the file.
    """
    endpoint = tls.endpoint() if scheme == "https" else None
    running = proxy_factory(json_upstream.url, endpoint=endpoint, send_timeout=0.5)
    size = len(find(dists, BIG).content)
    cut = logged("took no bytes")
    raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    raw.settimeout(10)
    client: socket.socket = raw
    if scheme == "https":
        client = ssl.create_default_context(cafile=str(tls.ca)).wrap_socket(
            raw, server_hostname="127.0.0.1", suppress_ragged_eofs=False
        )

    def ask() -> None:  # the TLS handshake needs the reactor: in a thread
        client.connect(("127.0.0.1", running.port.getHost().port))
        client.sendall(b"GET /files/big/%s HTTP/1.1\r\nHost: p\r\n\r\n" % BIG.encode())

    def drain() -> tuple[int, type[BaseException] | None]:
        # Below TLS (whose reads report a reset as a mere EOF): the TCP
        # connection must end with a reset, not a FIN.
        got = 0
        try:
            while chunk := socket.socket.recv(client, 65536):
                got += len(chunk)
        except OSError as e:
            return got, type(e)
        return got, None

    try:
        await deferToThread(ask)
        await cut.first.addTimeout(10, get_reactor())
        got, error = await deferToThread(drain)
    finally:
        client.close()
    assert error is ConnectionResetError and got < size
    assert len(cut.events) == 1
    assert sample(running.proxy.metrics, "txpypi_client_timeouts_total", kind="send") == 1


# -- the connection cap


class RawClient(Protocol):
    """
    A client connection: what it received, and when it was lost.
    """

    def __init__(self) -> None:
        self.received = b""
        self.reason: Failure | None = None
        self.lost: Deferred[None] = Deferred()
        self._waiting: list[tuple[bytes, Deferred[None]]] = []

    def dataReceived(self, data: bytes) -> None:
        self.received += data
        for marker, d in list(self._waiting):
            if marker in self.received:
                self._waiting.remove((marker, d))
                d.callback(None)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.reason = reason
        self.lost.callback(None)

    def wait_for(self, marker: bytes) -> Deferred[None]:
        if marker in self.received:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiting.append((marker, d))
        return d.addTimeout(10, get_reactor())


async def open_client(port: int) -> RawClient:
    client = RawClient()
    await connectProtocol(TCP4ClientEndpoint(get_reactor(), "127.0.0.1", port), client)
    return client


async def answered(client: RawClient, close: bool = False) -> None:
    assert client.transport is not None
    client.received = b""
    client.transport.write(
        b"GET /metrics HTTP/1.1\r\nHost: p\r\n%s\r\n" % (b"Connection: close\r\n" if close else b"")
    )
    await client.wait_for(b"HTTP/1.1 200 OK")


@pytest_twisted.ensureDeferred
async def test_max_connections_counts_every_listener(json_upstream: Served, proxy_factory: Any) -> None:
    """
    With max-connections 3 over two listeners, the 4th connection is closed
    at once, unanswered, and counted; once one of the three closes, a new
    one is served.
    """
    running = proxy_factory(json_upstream.url, max_connections=3)
    from tests.conftest import listen

    second = listen(running.proxy.site())
    try:
        ports = [running.port.getHost().port, second.getHost().port]
        held = [await open_client(ports[i % 2]) for i in range(3)]
        for client in held:
            await answered(client)
        metrics = running.proxy.metrics
        assert sample(metrics, "txpypi_connections_open") == 3
        for port in ports:
            extra = await open_client(port)
            assert extra.transport is not None
            extra.transport.write(b"GET /metrics HTTP/1.1\r\nHost: p\r\n\r\n")
            await extra.lost.addTimeout(10, get_reactor())
            assert extra.received == b""
        assert sample(metrics, "txpypi_connections_refused_total") == 2

        await answered(held[0], close=True)  # the server closes it
        await held[0].lost
        again = await open_client(ports[1])
        await answered(again)
        held = [*held[1:], again]
        assert sample(metrics, "txpypi_connections_open") == 3
        assert sample(metrics, "txpypi_connections_refused_total") == 2
    finally:
        for client in held:
            if client.transport is not None:
                client.transport.loseConnection()
        await second.stopListening()
    for client in held:
        await client.lost


def test_options_and_sighup(tmp_path: Path) -> None:
    """
    --send-timeout and --max-connections parse, are checked, and SIGHUP
    applies both.
    """
    from twisted.python.usage import UsageError

    options = Options()
    options.parseOptions(["--send-timeout", "2.5", "--max-connections", "3"])
    assert (options.settings.send_timeout, options.settings.max_connections) == (2.5, 3)
    defaults = Settings()
    assert (defaults.send_timeout, defaults.max_connections) == (60.0, 1024)
    for argv in (["--send-timeout", "0"], ["--max-connections", "0"], ["--max-connections", "many"]):
        with pytest.raises(UsageError):
            Options().parseOptions(argv)
    proxy = unit_proxy(Clock(), MemoryMetadata(), FakeUpstream([]), str(tmp_path))
    Running(Settings(), proxy.live).reload(options.settings)  # what SIGHUP does
    assert (proxy.connections.send_timeout, proxy.connections.max_connections) == (2.5, 3)
    assert proxy.site().connections is proxy.connections


# -- the memo of /, /stats and /health


@attrs.define
class CountingMetadata(MemoryMetadata):
    """
    Counts the queries; while C{gate} is set, the download queries wait
    for it.
    """

    calls: Counter[str] = attrs.field(factory=Counter)
    gate: Deferred[None] | None = None

    def _after_gate(self, d: Deferred[Any]) -> Deferred[Any]:
        if self.gate is None:
            return d
        gate = self.gate
        return gate.addCallback(lambda _: d)

    def top_projects(self, limit: int) -> Deferred[list[tuple[str, int]]]:
        self.calls["top_projects"] += 1
        return self._after_gate(super().top_projects(limit))

    def project_downloads(self, project: str) -> Deferred[list[tuple[str, str, int]]]:
        self.calls["project_downloads"] += 1
        return self._after_gate(super().project_downloads(project))

    def ping(self) -> Deferred[None]:
        self.calls["ping"] += 1
        return super().ping()


def fetch(stub: StubTreq, url: str, method: str = "GET", **kwargs: Any) -> Deferred[tuple[int, bytes]]:
    async def go() -> tuple[int, bytes]:
        response = await stub.request(method, "http://proxy.test" + url, **kwargs)
        return response.code, await stub.content(response)

    return Deferred.fromCoroutine(go())


def now(d: Deferred[Any]) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "did not complete synchronously"
    if isinstance(out[0], Failure):
        out[0].raiseException()
    return out[0]


def test_stats_and_the_status_page_query_once_a_second(tmp_path: Path) -> None:
    """
    Ten requests of /stats (and of /stats?project=) within a second cost
    one query; once the second passed, the next costs a new one.  The
    status page's top ten likewise.
    """
    clock = Clock()
    metadata = CountingMetadata(downloads={("beta", "1.0", "beta-1.0-py3-none-any.whl"): 3})
    proxy = unit_proxy(clock, metadata, FakeUpstream([]), str(tmp_path))
    stub = StubTreq(proxy.app.resource())
    for _ in range(10):
        code, body = now(fetch(stub, "/stats?project=beta"))
        assert code == 200 and b'"downloads": 3' in body
        clock.advance(0.09)
    assert metadata.calls == {"top_projects": 1, "project_downloads": 1}
    clock.advance(0.2)
    now(fetch(stub, "/stats?project=beta"))
    assert metadata.calls == {"top_projects": 2, "project_downloads": 2}
    now(fetch(stub, "/stats?top=5"))  # another query
    assert metadata.calls["top_projects"] == 3
    for _ in range(10):
        assert now(fetch(stub, "/"))[0] == 200
    assert metadata.calls["top_projects"] == 4


def test_concurrent_requests_share_one_query(tmp_path: Path) -> None:
    """
    While a query runs, the requests that want it wait for the same one;
    one whose client leaves does not cancel it for the others.
    """
    clock = Clock()
    metadata = CountingMetadata(downloads={("gamma", "0.5", "gamma-0.5-py3-none-any.whl"): 1})
    proxy = unit_proxy(clock, metadata, FakeUpstream([]), str(tmp_path))
    stub = StubTreq(proxy.app.resource())
    gate: Deferred[None] = Deferred()
    metadata.gate = gate
    pending = [fetch(stub, "/stats") for _ in range(10)]
    stub.flush()
    assert metadata.calls == {"top_projects": 1} and not any(d.called for d in pending)
    pending[0].cancel()  # its client leaves
    left: list[Failure] = []
    pending[0].addErrback(left.append)
    assert left and left[0].check(ResponseNeverReceived)
    gate.callback(None)
    stub.flush()
    answers = [now(d) for d in pending[1:]]
    assert 20 not in proxy._top._flights
    assert all(code == 200 and body == answers[0][1] for code, body in answers)
    assert b'"project": "gamma"' in answers[0][1]
    assert metadata.calls == {"top_projects": 1}


def test_health_probes_the_stores_once_a_second(tmp_path: Path) -> None:
    """
    Ten /health within a second probe the file store and ping the metadata
    store once; the second after, again.
    """
    clock = Clock()
    metadata = CountingMetadata()
    probes: list[int] = []

    def probe() -> Deferred[None]:
        probes.append(1)
        return succeed(None)

    outage = Outage("files", "the file store", clock, probe=probe)
    proxy = unit_proxy(clock, metadata, FakeUpstream([]), str(tmp_path), outages=(outage,))
    stub = StubTreq(proxy.app.resource())
    for _ in range(10):
        code, body = now(fetch(stub, "/health"))
        assert code == 200 and b'"status": "ok"' in body
    assert len(probes) == 1 and metadata.calls == {"ping": 1}
    clock.advance(1)
    now(fetch(stub, "/health"))
    assert len(probes) == 2 and metadata.calls == {"ping": 2}


def test_the_memo_is_bounded_and_keeps_no_failure() -> None:
    clock = Clock()
    memo: Memo[int, int] = Memo(clock)
    calls: list[int] = []

    async def square(n: int) -> int:
        calls.append(n)
        if n < 0:
            raise ValueError(n)
        return n * n

    for n in range(MEMO_ENTRIES * 3):
        assert now(memo.get(n, lambda n=n: square(n))) == n * n  # type: ignore[misc]
    assert len(memo._kept) <= MEMO_ENTRIES
    for _ in range(2):
        with pytest.raises(ValueError):
            now(memo.get(-1, lambda: square(-1)))
    assert calls.count(-1) == 2


# -- the admin route of the project list


def test_the_project_list_and_the_project_named_list(tmp_path: Path) -> None:
    """
    DELETE /cache/ forgets the project list only; DELETE /cache/list
    forgets the project list and the index page of the project list, and
    says so.
    """
    clock = Clock()
    fake = FakeUpstream([build_wheel("list", "1.0"), build_wheel("alpha", "1.0")])
    proxy = unit_proxy(clock, MemoryMetadata(), fake, str(tmp_path), live=Live(admin_token=TOKEN))
    stub = StubTreq(proxy.app.resource())
    auth = {"Authorization": "Bearer " + TOKEN}

    def load() -> None:
        for project in (None, "list"):
            now(Deferred.fromCoroutine(proxy.pages.get(project)))

    load()
    code, body = now(fetch(stub, "/cache/", "DELETE", headers=auth))
    assert (code, body) == (200, b"forgot the project list\n")
    assert proxy.pages.fresh(None) is None and proxy.pages.fresh("list") is not None

    load()
    code, body = now(fetch(stub, "/cache/list", "DELETE", headers=auth))
    assert code == 200 and body.count(b"\n") == 1
    assert b"index page of list" in body and b"project list" in body
    assert proxy.pages.fresh(None) is None and proxy.pages.fresh("list") is None

    load()
    code, body = now(fetch(stub, "/cache/alpha", "DELETE", headers=auth))
    assert (code, body) == (200, b"forgot the index page of alpha\n")
    assert proxy.pages.fresh(None) is not None
    assert now(fetch(stub, "/cache/", "DELETE"))[0] == 401

"""
Index pages on the wire: a page body goes out in slices through a push
producer that honours back-pressure (a real L{Request} over a transport
double that pauses its producer like a TCP transport, and a real proxy
with a real TCP client that never reads), big bodies kept gzip-only are
inflated for identity clients, and HEAD sends no body.
"""

from __future__ import annotations

import gzip
import json
import socket
from typing import Any

import pytest
import pytest_twisted
from treq.client import HTTPClient
from twisted.internet.defer import Deferred
from twisted.web.server import Request
from twisted.web.test.requesthelper import DummyChannel

import txpypi.cache.pages
from tests.conftest import Running, Served, get_reactor
from txpypi.cache.pages import INFLATE_ABOVE, Body
from txpypi.core.simple.media import JSON_V1
from txpypi.testing import FakeUpstream, build_wheel, generated_names
from txpypi.web.pages import PAGE_SLICE, PageSender


class PausingTransport(DummyChannel.TCP):
    """
    Like a TCP transport: written bytes wait in a buffer until L{drain}
    sends them; past C{limit} buffered bytes the streaming producer is
    paused, and resumed once the buffer drained.
    """

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.buffered = 0
        self.most_buffered = 0
        self.producer: Any = None

    def registerProducer(self, producer: Any, streaming: bool) -> None:
        assert streaming
        self.producer = producer

    def unregisterProducer(self) -> None:
        self.producer = None

    def write(self, data: bytes) -> None:
        super().write(data)
        self.buffered += len(data)
        self.most_buffered = max(self.most_buffered, self.buffered)
        if self.producer is not None and self.buffered > self.limit:
            self.producer.pauseProducing()

    def drain(self) -> None:
        self.buffered = 0
        if self.producer is not None:
            self.producer.resumeProducing()


def _request(transport: DummyChannel.TCP) -> Request:
    channel = DummyChannel()
    channel.transport = transport
    request = Request(channel, False)
    request.method = b"GET"
    request.clientproto = b"HTTP/1.1"
    return request


@pytest.mark.parametrize("gzip_only", [False, True])
def test_a_page_goes_out_in_slices_under_back_pressure(gzip_only: bool) -> None:
    """
    A client that takes nothing leaves the sender paused with at most the
    transport's buffer and one slice written, never the body; as it drains,
    the rest follows, byte for byte (inflated when the body is kept
    gzip-only), and the request finishes.
    """
    data = b"".join(b"%08d <a href='x'>name</a>\n" % i for i in range(200_000))  # ~6 MB
    body = Body.of(data)
    assert (body.identity is None) is (len(data) > INFLATE_ABOVE) and body.identity is None
    representation = (
        txpypi.cache.pages.Representation(body.gzip, len(data), True, "e")
        if gzip_only
        else txpypi.cache.pages.Representation(data, len(data), False, "e")
    )
    transport = PausingTransport(limit=64 * 1024)
    request = _request(transport)
    request.setHeader(b"content-length", b"%d" % len(data))
    sender = PageSender(request, representation)
    sender.start()
    assert sender._paused and transport.producer is sender
    assert transport.most_buffered <= transport.limit + PAGE_SLICE + 1024  # headers
    sent_while_paused = sender.sent
    assert sent_while_paused < 3 * PAGE_SLICE
    drains = 0
    while not request.finished:
        transport.drain()
        drains += 1
        assert transport.most_buffered <= transport.limit + PAGE_SLICE + 1024
    assert drains > len(data) // (2 * PAGE_SLICE) and not sender.holding
    assert transport.written.getvalue().split(b"\r\n\r\n", 1)[1] == data


def test_a_stopped_sender_lets_go_of_the_body() -> None:
    data = b"x" * (4 * PAGE_SLICE)
    transport = PausingTransport(limit=PAGE_SLICE)
    request = _request(transport)
    sender = PageSender(request, txpypi.cache.pages.Representation(data, len(data), False, "e"))
    sender.start()
    assert sender._paused and sender.holding
    sender.stopProducing()  # the connection went away
    assert not sender.holding
    transport.drain()
    assert not request.finished and sender.sent < len(data)


def test_a_client_that_leaves_releases_the_body() -> None:
    data = b"x" * (4 * PAGE_SLICE)
    transport = PausingTransport(limit=PAGE_SLICE)
    request = _request(transport)
    sender = PageSender(request, txpypi.cache.pages.Representation(data, len(data), False, "e"))
    sender.start()
    request.connectionLost(Exception("gone"))
    assert not sender.holding


# -- over loopback


@pytest.fixture
def big_list() -> Any:
    """
    A fake upstream whose root page lists 200,000 projects.
    """
    from twisted.web.server import Site

    from tests.conftest import listen

    fake = FakeUpstream([build_wheel("alpha", "1.0")])
    fake.list_projects(generated_names(200_000))
    port = listen(Site(fake))
    yield Served(fake, port)
    pytest_twisted.blockon(port.stopListening())


class StillClient:
    """
    A real TCP client that sends one request and then reads nothing.
    """

    def __init__(self, port: int, path: str, accept: str) -> None:
        self.socket = socket.socket()
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.socket.connect(("127.0.0.1", port))
        self.socket.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nAccept: {accept}\r\n\r\n".encode())

    def close(self) -> None:
        self.socket.close()


@pytest_twisted.ensureDeferred
async def test_clients_that_stop_reading_hold_no_copy_of_the_page(
    big_list: Served, proxy_factory: Any, http: HTTPClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    Four real TCP clients ask for the 200,000-project list (several MB,
    identity, inflated from the gzip-only copy) and read nothing: each
    sender is paused with its transport holding a bounded amount, not the
    body; when they go, the senders let go of the body.
    """
    running: Running = proxy_factory(big_list.url)
    # Warm the page, and learn how long the body is.
    response = await http.get(running.url + "/simple/", headers={b"Accept": [JSON_V1.encode()]})
    body = await response.content()
    assert response.code == 200 and len(body) > 4 * 1024 * 1024
    senders: list[PageSender] = []
    paused: list[Deferred[None]] = [Deferred() for _ in range(4)]
    original_pause = PageSender.pauseProducing

    def pause(self: PageSender) -> None:
        original_pause(self)
        if self not in senders:
            senders.append(self)
            paused[len(senders) - 1].callback(None)

    monkeypatch.setattr(PageSender, "pauseProducing", pause)
    clients = [StillClient(running.port.getHost().port, "/simple/", JSON_V1) for _ in range(4)]
    try:
        for d in paused:
            await d
        for sender in senders:
            transport: Any = sender._request.channel.transport  # type: ignore[union-attr]
            buffered = len(transport.dataBuffer) - transport.offset + transport._tempDataLen
            assert sender._paused and sender.holding
            assert buffered < 4 * PAGE_SLICE, buffered
            assert sender.sent < len(body) // 2
    finally:
        gone = [s._request.notifyFinish() for s in senders]
        for client in clients:
            client.close()
    for d in gone:
        try:
            await d
        except Exception:
            pass
    assert not any(sender.holding for sender in senders)


@pytest_twisted.ensureDeferred
async def test_identity_and_gzip_answers_of_a_big_page_agree(
    big_list: Served, proxy_factory: Any, http: HTTPClient
) -> None:
    """
    The root page, kept gzip-only, reaches an identity client inflated with
    the right Content-Length, a gzip client compressed, and HEAD with no
    body: the same bytes whichever way.
    """
    running: Running = proxy_factory(big_list.url)
    url = running.url + "/simple/"
    from twisted.web.client import Agent, readBody

    agent = Agent(get_reactor(), pool=http._agent._pool)  # type: ignore[attr-defined]
    from twisted.web.http_headers import Headers

    for accept in (JSON_V1, "text/html"):
        plain = await agent.request(b"GET", url.encode(), Headers({"Accept": [accept]}))
        plain_body = await readBody(plain)
        zipped = await agent.request(
            b"GET", url.encode(), Headers({"Accept": [accept], "Accept-Encoding": ["gzip"]})
        )
        zipped_body = await readBody(zipped)
        assert plain.length == len(plain_body) and zipped.length == len(zipped_body)
        assert zipped.headers.getRawHeaders("content-encoding") == ["gzip"]
        assert gzip.decompress(zipped_body) == plain_body
        listed = len(json.loads(plain_body)["projects"]) if accept == JSON_V1 else plain_body.count(b"</a>")
        assert listed == 200_000
        head = await agent.request(b"HEAD", url.encode(), Headers({"Accept": [accept]}))
        assert await readBody(head) == b""
        assert head.headers.getRawHeaders("content-length") == [str(len(plain_body))]
        assert plain.headers.getRawHeaders("etag") != zipped.headers.getRawHeaders("etag")
    assert big_list.fake.requests["/simple/"] == 1
    page = running.proxy.pages.fresh(None)
    assert page is not None and page.html.identity is None and page.json.identity is None  # gzip only

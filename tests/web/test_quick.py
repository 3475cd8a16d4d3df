"""
The quick lane (L{txpypi.web.quick}) answers a warm page with the same
bytes, the same access log line and the same metrics as the usual way,
and leaves everything else to it: each request below is sent with the lane
on and off, over real loopback, and the answers compared (all but the
C{Date}).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.logger import globalLogPublisher

from tests.conftest import Running, Served, get_reactor
from txpypi.web.quick import FileBody, Parses, parse, send_now

JSON = b"application/vnd.pypi.simple.v1+json"


class Raw(Protocol):
    """
    Sends bytes as given and collects what comes back until C{expect}
    answers are whole (by their Content-Length; none for HEAD and 304).
    """

    def __init__(self, expect: int, heads: list[bool]) -> None:
        self.data = b""
        self.expect = expect
        self.heads = heads
        self.done: Deferred[list[bytes]] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        answers = split(self.data, self.heads)
        if answers is not None and len(answers) >= self.expect and not self.done.called:
            self.done.callback(answers)

    def connectionLost(self, reason: Any = None) -> None:
        if not self.done.called:
            self.done.callback(split(self.data, self.heads, partial=True) or [self.data])


def split(data: bytes, heads: list[bool], partial: bool = False) -> list[bytes] | None:
    answers = []
    for head in heads:
        end = data.find(b"\r\n\r\n")
        if end < 0:
            return answers if partial else None
        top = data[: end + 4]
        length = re.search(rb"\r\nContent-Length: (\d+)\r\n", top)
        size = 0 if head or b" 304 " in top.split(b"\r\n")[0] or length is None else int(length.group(1))
        if len(data) < end + 4 + size:
            return answers if partial else None
        answers.append(data[: end + 4 + size])
        data = data[end + 4 + size :]
    return answers


async def exchange(running: Running, *requests: bytes, pieces: int = 1) -> list[bytes]:
    """
    Send C{requests} on one connection (all at once, or each in C{pieces}
    writes), and return the answers, their Date lines blanked.
    """
    heads = [r.startswith(b"HEAD ") for r in requests]
    protocol = Raw(len(requests), heads)
    endpoint = TCP4ClientEndpoint(get_reactor(), "127.0.0.1", running.port.getHost().port)
    await connectProtocol(endpoint, protocol)
    data = b"".join(requests)
    if pieces == 1:
        protocol.transport.write(data)  # type: ignore[union-attr]
    else:
        step = max(1, len(data) // pieces)
        for i in range(0, len(data), step):
            protocol.transport.write(data[i : i + step])  # type: ignore[union-attr]
            await Deferred.fromCoroutine(_tick())
    answers = await protocol.done
    protocol.transport.loseConnection()  # type: ignore[union-attr]
    return [re.sub(rb"\r\nDate: [^\r]*\r\n", b"\r\nDate: -\r\n", a) for a in answers]


async def _tick() -> None:
    d: Deferred[None] = Deferred()
    get_reactor().callLater(0.01, d.callback, None)
    await d


def request(path: bytes, method: bytes = b"GET", **headers: bytes) -> bytes:
    lines = [b"%s %s HTTP/1.1" % (method, path), b"Host: 127.0.0.1"]
    lines += [name.replace("_", "-").encode() + b": " + value for name, value in headers.items()]
    return b"\r\n".join(lines) + b"\r\n\r\n"


@pytest.fixture
def logged() -> Any:
    lines: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "txpypi.access":
            # The time and the duration differ from one request to the next.
            line = re.sub(r"\[[^\]]*\]", "[-]", event["access"])
            line = re.sub(r'"(time|duration)":[^,}]*', r'"\1":-', line)
            lines.append(line if line.startswith("{") else line.rsplit(" ", 1)[0])

    globalLogPublisher.addObserver(observe)
    yield lines
    globalLogPublisher.removeObserver(observe)


def site(running: Running) -> Any:
    return running.proxy.sites[-1]


async def both_ways(
    running: Running, logged: list[str], *requests: bytes, pieces: int = 1
) -> tuple[list[bytes], int]:
    """
    The answers with the quick lane on, checked to be those with it off (and
    so the access log lines); and how many it gave.
    """
    s = site(running)
    before = s.quick_answers
    s.quick_lane = True
    start = len(logged)
    quick = await exchange(running, *requests, pieces=pieces)
    taken = s.quick_answers - before
    quick_lines = logged[start:]
    s.quick_lane = False
    start = len(logged)
    usual = await exchange(running, *requests, pieces=pieces)
    usual_lines = logged[start:]
    s.quick_lane = True
    assert quick == usual
    assert quick_lines == usual_lines
    return quick, taken


@pytest.fixture(params=["combined", "json"])
def warm(request: pytest.FixtureRequest, upstream: Served, proxy_factory: Any, tmp_path: Path) -> Running:
    running: Running = proxy_factory(upstream.url, access_log="log", log_format=request.param)
    return running


@pytest_twisted.ensureDeferred
async def test_warm_pages_are_the_same_bytes_either_way(warm: Running, logged: list[str]) -> None:
    for accept in (JSON, b"text/html"):
        await exchange(warm, request(b"/simple/alpha/", accept=accept))  # the miss, the usual way
    cases = [
        (request(b"/simple/alpha/", accept=JSON), 1),
        (request(b"/simple/alpha/", accept=b"text/html"), 1),
        (request(b"/simple/alpha/"), 1),
        (request(b"/simple/alpha/", accept=b"*/*;q=0.1, application/vnd.pypi.simple.v1+json"), 1),
        (request(b"/simple/alpha/", accept=JSON, accept_encoding=b"gzip, deflate"), 1),
        (request(b"/simple/alpha/", method=b"HEAD", accept=JSON), 1),
        (request(b"/pypi/simple/alpha/", accept=JSON), 1),
        (request(b"/simple/alpha/", accept=JSON, user_agent=b"pip/25.0", referer=b"r"), 1),
        (request(b"/simple/alpha/", accept=JSON, x_forwarded_for=b"10.1.2.3"), 1),
        # The usual way: a redirect, a 406, a query, an unknown group.
        (request(b"/simple/Alpha/", accept=JSON), 0),
        (request(b"/simple/alpha/", accept=b"application/xml"), 0),
        (request(b"/simple/alpha/?format=json"), 0),
        (request(b"/nosuch/simple/alpha/", accept=JSON), 0),
        # What pip's requests sends on every request: HTTP/1.1's default.
        (request(b"/simple/alpha/", accept=JSON, connection=b"keep-alive"), 1),
        (request(b"/simple/alpha/", accept=JSON, connection=b"Keep-Alive "), 1),
        (request(b"/simple/alpha/", accept=JSON, connection=b"close"), 0),
        (request(b"/simple/alpha/", accept=JSON, connection=b"keep-alive, upgrade"), 0),
        (request(b"/simple/alpha/", accept=JSON).replace(b"HTTP/1.1", b"HTTP/1.0"), 0),
    ]
    for sent, quick in cases:
        answers, taken = await both_ways(warm, logged, sent)
        assert taken == quick, sent
        assert len(answers) == 1 and answers[0].startswith(b"HTTP/1."), answers
    # A conditional request: 304 either way (a HEAD's says no length).
    (answer,), _ = await both_ways(warm, logged, request(b"/simple/alpha/", accept=JSON))
    etag = re.search(rb"\r\nETag: ([^\r]*)\r\n", answer)
    assert etag is not None
    (answer,), taken = await both_ways(
        warm, logged, request(b"/simple/alpha/", accept=JSON, if_none_match=etag.group(1))
    )
    assert answer.startswith(b"HTTP/1.1 304 ") and taken == 1
    (answer,), taken = await both_ways(
        warm, logged, request(b"/simple/alpha/", method=b"HEAD", accept=JSON, if_none_match=etag.group(1))
    )
    assert answer.startswith(b"HTTP/1.1 304 ") and b"Content-Length" not in answer and taken == 1
    (answer,), taken = await both_ways(
        warm, logged, request(b"/simple/alpha/", accept=JSON, if_none_match=b'"other"')
    )
    assert answer.startswith(b"HTTP/1.1 200 ") and taken == 1


@pytest_twisted.ensureDeferred
async def test_pipelined_and_split_requests_go_the_usual_way(warm: Running, logged: list[str]) -> None:
    one = request(b"/simple/alpha/", accept=JSON)
    await exchange(warm, one)
    await exchange(warm, request(b"/simple/beta/", accept=JSON))
    answers, taken = await both_ways(warm, logged, one, request(b"/simple/beta/", accept=JSON), one)
    assert taken == 0 and len(answers) == 3
    answers, taken = await both_ways(warm, logged, one, pieces=3)
    assert taken == 0 and answers[0].startswith(b"HTTP/1.1 200 ")
    # One after the other on one connection: each quick.
    answers, taken = await both_ways(warm, logged, one)
    assert taken == 1


@pytest_twisted.ensureDeferred
async def test_the_metrics_count_quick_answers_as_the_usual_ones(warm: Running) -> None:
    one = request(b"/simple/alpha/", accept=JSON)
    await exchange(warm, one)
    metrics = warm.proxy.metrics.registry

    def counts() -> tuple[float | None, ...]:
        return (
            metrics.get_sample_value("txpypi_requests_total", {"route": "project", "code": "200"}),
            metrics.get_sample_value("txpypi_cache_answers_total", {"kind": "page", "result": "hit"}),
            metrics.get_sample_value("txpypi_served_bytes_total", {"source": "cache"}),
        )

    s = site(warm)
    seen = []
    for quick in (True, False):
        s.quick_lane = quick
        before = counts()
        await exchange(warm, one)
        after = counts()
        seen.append(tuple((a or 0) - (b or 0) for a, b in zip(after, before, strict=True)))
    assert seen[0] == seen[1] and seen[0][0] == 1 and seen[0][2] > 0


def test_what_the_parser_refuses() -> None:
    remembering = Parses()
    ok = request(b"/simple/alpha/", accept=JSON)
    assert parse(ok) is not None
    for bad in (
        ok[:-2],  # not whole
        ok + ok,  # pipelined
        ok.replace(b"GET", b"POST"),
        ok.replace(b"/simple/alpha/", b"/simple/al%70ha/"),
        ok.replace(b"/simple/alpha/", b"/simple/alpha"),
        ok.replace(b"/simple/alpha/", b"/simple/"),
        ok.replace(b"/simple/alpha/", b"/files/alpha/"),
        ok.replace(b"Host: 127.0.0.1", b"Host: 127.0.0.1\r\nContent-Length: 0"),
        ok.replace(b"Host: 127.0.0.1", b"Host: 127.0.0.1\r\nTransfer-Encoding: chunked"),
        ok.replace(b"Host: 127.0.0.1", b"Host: 127.0.0.1\r\n folded"),
        ok.replace(b"Host: 127.0.0.1", b"Host : 127.0.0.1"),
        ok.replace(b"Host: 127.0.0.1", b"Accept: a\r\nAccept: b"),
        request(b"/simple/" + b"a" * 9000 + b"/"),
        ok.replace(b"Host: 127.0.0.1", b"Host: 127.0.0.1\r\nBad Name: x"),
        ok.replace(b"Host: 127.0.0.1", b"Host: 127.0.0.1\r\nX@y: x"),
        ok.replace(b"Host: 127.0.0.1", b"Host: 127.0.0.1\r\nX-Foo: a\x00b"),
        ok.replace(b"Host: 127.0.0.1", b"Host: 127.0.0.1" + b"\r\na:b" * 501),
        ok.replace(b"Host: 127.0.0.1", b"Host: 127.0.0.1\r\nX-Foo: a\rb"),
        ok.replace(b"Host: 127.0.0.1", b"Host: 127.0.0.1\r\nX-Foo: a\nb"),
        ok.replace(b"Host: 127.0.0.1", b"Host: 127.0.0.1\r\nConnection: close"),
        ok.replace(b"HTTP/1.1\r\n", b"HTTP/1.1\n"),
        ok.replace(b"/simple/alpha/", b"/simple/simple/alpha/"),
        ok.replace(b"/simple/alpha/", b"/files/simple/alpha/"),
        ok.replace(b"/simple/alpha/", b"/simple/alpha/x"),
        ok.replace(b"/simple/alpha/", b"/files/alpha/a%2Fb"),
        ok.replace(b"/simple/alpha/", b"/a/b/simple/alpha/"),
        ok.replace(b"/simple/alpha/", b"//simple/alpha/"),
    ):
        assert parse(bad) is None, bad[:80]
        assert remembering(bad) is None and remembering(bad) is None, bad[:80]
    assert len(remembering) == 0  # a refusal is not kept
    group = parse(request(b"/internal/simple/alpha/"))
    assert group is not None and (group.group, group.project) == (b"internal", b"alpha")
    file = parse(request(b"/internal/files/alpha/alpha-1.0+local-py3-none-any.whl"))
    assert file is not None and (file.kind, file.group, file.project, file.filename) == (
        b"files",
        b"internal",
        b"alpha",
        b"alpha-1.0+local-py3-none-any.whl",
    )
    spaced = parse(ok.replace(b"Host: 127.0.0.1", b"Host: 127.0.0.1\r\nUser-Agent: \t pip 25 \t"))
    assert spaced is not None and spaced.header(b"user-agent") == b"pip 25"
    bare = parse(b"GET /simple/alpha/ HTTP/1.1\r\n\r\n")
    assert bare is not None and bare.headers == {}


def test_parses_are_remembered_by_their_bytes_and_bounded() -> None:
    """
    The site's memo of parses answers a request seen before with its
    parse (the same one), and keeps at most its limit.
    """
    parses = Parses(limit=3)
    asks = [request(b"/simple/p%d/" % i) for i in range(4)]
    first = parses(asks[0])
    assert first == parse(asks[0]) and parses(asks[0]) is first and len(parses) == 1
    for ask in asks[1:3]:
        assert parses(ask) == parse(ask)
    assert len(parses) == 3
    assert parses(asks[3]) == parse(asks[3]) and len(parses) == 1  # full: all forgotten, this one kept
    assert parses(asks[0]) is not first and parses(asks[0]) == first


class _Collect(Protocol):
    def __init__(self, size: int) -> None:
        self.data = bytearray()
        self.size = size
        self.done: Deferred[bytes] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        self.data += data
        if len(self.data) >= self.size and not self.done.called:
            self.done.callback(bytes(self.data))


class _Sender(Protocol):
    def __init__(self, pieces: list[bytes], sent: Deferred[None]) -> None:
        self.pieces = pieces
        self.sent = sent

    def connectionMade(self) -> None:
        for i, piece in enumerate(self.pieces):
            if i % 2:  # a head and a body, sent in one call
                send_now(self.transport, piece[:100], piece[100:])
            else:
                send_now(self.transport, piece)
        transport: Any = self.transport
        self.buffered = len(transport._tempDataBuffer) + bool(transport.dataBuffer)
        self.sent.callback(None)


@pytest_twisted.ensureDeferred
async def test_send_now_keeps_the_order_when_the_socket_is_full() -> None:
    """
    More than a socket holds, sent while the client reads nothing: what the
    socket does not take goes through the transport, and every later piece
    after it, so that the client reads every byte in order.
    """
    from twisted.internet.protocol import Factory

    pieces = [bytes([i % 251]) * 65536 for i in range(160)]  # 10 MiB
    sent: Deferred[None] = Deferred()
    senders: list[_Sender] = []
    factory = Factory.forProtocol(lambda: senders.append(_Sender(pieces, sent)) or senders[-1])
    port = get_reactor().listenTCP(0, factory, interface="127.0.0.1")
    try:
        client = _Collect(sum(map(len, pieces)))
        endpoint = TCP4ClientEndpoint(get_reactor(), "127.0.0.1", port.getHost().port)
        protocol = await connectProtocol(endpoint, client)
        protocol.transport.pauseProducing()  # type: ignore[union-attr]
        await sent  # all handed over while the client read nothing
        assert senders[0].buffered > 1  # the socket took part, the transport kept the rest
        protocol.transport.resumeProducing()  # type: ignore[union-attr]
        assert await client.done == b"".join(pieces)
        protocol.transport.loseConnection()  # type: ignore[union-attr]
    finally:
        await port.stopListening()


class _Reader:
    """
    A file read by descriptor, as the disk store's reader is, that says
    whether it was closed.
    """

    def __init__(self, path: Path) -> None:
        import os

        self.fd = os.open(path, os.O_RDONLY)
        self.closed = False

    def close(self) -> None:
        import os

        os.close(self.fd)
        self.closed = True


class _FileSender(Protocol):
    def __init__(self, head: bytes, body: FileBody, sent: Deferred[None]) -> None:
        self.head, self.body, self.sent = head, body, sent

    def connectionMade(self) -> None:
        send_now(self.transport, self.head, self.body)
        transport: Any = self.transport
        self.buffered = len(transport._tempDataBuffer) + bool(transport.dataBuffer)
        self.sent.callback(None)


async def _send_file(head: bytes, body: FileBody, expect: int, paused: bool) -> tuple[bytes, _FileSender]:
    """
    L{send_now} C{head} and C{body} to a client over loopback (reading
    nothing until all was handed over when C{paused}); what it got once it
    has C{expect} bytes or the connection closed.
    """
    from twisted.internet.protocol import Factory

    sent: Deferred[None] = Deferred()
    senders: list[_FileSender] = []
    factory = Factory.forProtocol(lambda: senders.append(_FileSender(head, body, sent)) or senders[-1])
    port = get_reactor().listenTCP(0, factory, interface="127.0.0.1")
    try:
        client = _Collect(expect)
        client.connectionLost = lambda reason=None: (
            client.done.called or client.done.callback(bytes(client.data))
        )  # type: ignore[method-assign]
        endpoint = TCP4ClientEndpoint(get_reactor(), "127.0.0.1", port.getHost().port)
        protocol = await connectProtocol(endpoint, client)
        if paused:
            protocol.transport.pauseProducing()  # type: ignore[union-attr]
        await sent
        if paused:
            protocol.transport.resumeProducing()  # type: ignore[union-attr]
        got = await client.done.addTimeout(30, get_reactor())
        protocol.transport.loseConnection()  # type: ignore[union-attr]
        return got, senders[0]
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_file_body_goes_by_sendfile_and_the_rest_in_order(tmp_path: Path) -> None:
    """
    A file body bigger than the socket takes while the client reads
    nothing: the head and what fits go at once (by sendfile), the rest
    through the transport after them; every byte arrives in order and the
    file is closed.
    """
    data = bytes(range(256)) * 40960  # 10 MiB
    (tmp_path / "f").write_bytes(data)
    reader = _Reader(tmp_path / "f")
    head = b"HTTP/1.1 200 OK\r\n\r\n"
    got, sender = await _send_file(head, FileBody(reader, len(data)), len(head) + len(data), paused=True)
    assert got == head + data
    assert sender.buffered >= 1  # the socket took part, the transport kept the rest
    assert reader.closed


@pytest_twisted.ensureDeferred
async def test_a_file_shorter_than_its_record_is_cut_off(tmp_path: Path) -> None:
    """
    A file that holds less than its answer's length says: the client gets
    fewer bytes and the connection is cut, never an answer that looks whole.
    """
    (tmp_path / "f").write_bytes(b"x" * 1000)
    reader = _Reader(tmp_path / "f")
    head = b"HTTP/1.1 200 OK\r\n\r\n"
    got, _ = await _send_file(head, FileBody(reader, 5000), len(head) + 5000, paused=False)
    assert got == head + b"x" * 1000
    assert reader.closed


def test_a_file_body_is_closed_when_the_transport_fails(tmp_path: Path) -> None:
    (tmp_path / "f").write_bytes(b"x" * 10)
    reader = _Reader(tmp_path / "f")

    class Broken:
        def write(self, data: bytes) -> None:
            raise RuntimeError("gone")

    with pytest.raises(RuntimeError):
        send_now(Broken(), b"H", FileBody(reader, 10))
    assert reader.closed


@pytest_twisted.ensureDeferred
async def test_cached_files_are_the_same_bytes_either_way(warm: Running, logged: list[str]) -> None:
    """
    A small hit on the disk, whole, HEAD, a 304, its metadata file: the
    same bytes and log lines either way; a miss, a range, a provenance
    object and a big file go the usual way.
    """
    page = await exchange(warm, request(b"/simple/alpha/", accept=JSON))
    assert page[0].startswith(b"HTTP/1.1 200 ")
    wheel = b"/files/alpha/alpha-1.0-py3-none-any.whl"
    (miss,) = await exchange(warm, request(wheel))
    assert b"\r\nX-Cache: MISS\r\n" in miss
    await warm.proxy.files.wait_idle()  # landed, its record in memory
    (hit,), taken = await both_ways(warm, logged, request(wheel))
    assert b"\r\nX-Cache: HIT\r\n" in hit and taken == 1
    etag = re.search(rb"\r\nETag: ([^\r]*)\r\n", hit)
    assert etag is not None
    counted = warm.proxy.metrics.registry.get_sample_value
    cases = [
        (request(wheel), 1),
        (request(wheel, method=b"HEAD"), 1),
        (request(wheel, if_none_match=etag.group(1)), 1),
        (request(wheel, method=b"HEAD", if_none_match=etag.group(1)), 1),
        (request(wheel, if_none_match=b'"other"'), 1),
        (request(b"/pypi/files/alpha/alpha-1.0-py3-none-any.whl", user_agent=b"uv/0.9"), 1),
        (request(wheel).replace(b"Host: 127.0.0.1", b"Host: 127.0.0.1\r\nRange: bytes=0-9"), 0),
        (request(b"/files/Alpha/alpha-1.0-py3-none-any.whl"), 0),
        (request(b"/files/alpha/nosuch-1.0-py3-none-any.whl"), 0),
    ]
    for sent, quick in cases:
        before = counted("txpypi_served_bytes_total", {"source": "cache"}) or 0
        answers, taken = await both_ways(warm, logged, sent)
        assert taken == quick, sent
        assert answers[0].startswith(b"HTTP/1.1 "), answers
        if quick:
            # Counted the same way twice (once each way).
            after = counted("txpypi_served_bytes_total", {"source": "cache"}) or 0
            body = len(answers[0]) - answers[0].index(b"\r\n\r\n") - 4
            assert after - before == 2 * body
    # The metadata file (PEP 658): cached on its first fetch, then quick.
    metadata = b"/files/alpha/alpha-1.0-py3-none-any.whl.metadata"
    await exchange(warm, request(metadata))
    await warm.proxy.files.wait_idle()
    await exchange(warm, request(metadata))
    (answer,), taken = await both_ways(warm, logged, request(metadata))
    assert answer.startswith(b"HTTP/1.1 200 ") and taken == 1


@pytest_twisted.ensureDeferred
async def test_a_quick_hit_counts_as_a_download(warm: Running) -> None:
    """
    A whole GET of a distribution file counts for /stats either way; a
    HEAD does not.
    """
    await exchange(warm, request(b"/simple/alpha/", accept=JSON))
    wheel = b"/files/alpha/alpha-1.0-py3-none-any.whl"
    await exchange(warm, request(wheel))  # the miss
    await warm.proxy.files.wait_idle()  # landed
    stats = warm.proxy.files.stats
    seen = []
    for quick in (True, False):
        site(warm).quick_lane = quick
        before = dict(stats._downloads) if hasattr(stats, "_downloads") else None
        await exchange(warm, request(wheel))
        await exchange(warm, request(wheel, method=b"HEAD"))
        after = dict(stats._downloads) if hasattr(stats, "_downloads") else None
        seen.append((before, after))
    site(warm).quick_lane = True
    assert seen[0][0] is not None, "DownloadStats keeps its counts in _downloads"
    increments = [
        {k: v - (b or {}).get(k, 0) for k, v in (a or {}).items() if v != (b or {}).get(k, 0)}
        for b, a in seen
    ]
    assert increments[0] == increments[1] and sum(increments[0].values()) == 1


@pytest_twisted.ensureDeferred
async def test_a_stray_empty_line_before_requests_is_read_as_twisted_reads_it(warm: Running) -> None:
    """
    Twisted eats one empty line before a request, once per request: after
    a quick answer, a second one is eaten too (not a 400).
    """
    one = request(b"/simple/alpha/", accept=JSON)
    await exchange(warm, one)
    for quick in (True, False):
        site(warm).quick_lane = quick
        protocol = Raw(2, [False, False])
        endpoint = TCP4ClientEndpoint(get_reactor(), "127.0.0.1", warm.port.getHost().port)
        await connectProtocol(endpoint, protocol)
        for piece in (b"\r\n", one, b"\r\n", one):
            protocol.transport.write(piece)  # type: ignore[union-attr]
            await Deferred.fromCoroutine(_tick())
        answers = await protocol.done
        protocol.transport.loseConnection()  # type: ignore[union-attr]
        assert [a.split(b"\r\n")[0] for a in answers] == [b"HTTP/1.1 200 OK"] * 2, quick
    site(warm).quick_lane = True


@pytest_twisted.ensureDeferred
async def test_a_failure_in_the_quick_lane_leaves_the_answer_to_the_usual_way(
    warm: Running, monkeypatch: pytest.MonkeyPatch
) -> None:
    """
    The disk fails (too many open files) under a quick hit: nothing is
    sent yet, so the usual way answers, and the connection lives on.
    """
    await exchange(warm, request(b"/simple/alpha/", accept=JSON))
    wheel = b"/files/alpha/alpha-1.0-py3-none-any.whl"
    await exchange(warm, request(wheel))
    await warm.proxy.files.wait_idle()
    store = warm.proxy.files.store if hasattr(warm.proxy.files, "store") else None
    from txpypi.storage.stores import DiskStore

    def failing(self: DiskStore, key: str) -> None:
        raise OSError(24, "Too many open files")

    monkeypatch.setattr(DiskStore, "open_now", failing)
    before = site(warm).quick_answers
    (answer,) = await exchange(warm, request(wheel))
    assert answer.startswith(b"HTTP/1.1 "), answer[:80]
    assert site(warm).quick_answers == before
    del store

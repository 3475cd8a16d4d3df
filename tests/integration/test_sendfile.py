"""
Cached files on the local disk sent over loopback: by C{sendfile} over
plain TCP (L{SendfileSender}) and by large C{pread}s over TLS
(L{PreadSender}), with the same answers as any other file (whole, ranges,
HEAD, C{304}), the client's back-pressure, a client that leaves, and a
file evicted while it is sent; and C{--accel-redirect}.
"""

from __future__ import annotations

import socket
import ssl
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.logger import globalLogPublisher
from twisted.web.server import Request

from tests.conftest import TLS, Running, Served, get_reactor
from tests.integration.test_http_semantics import BIG, cache_fds, get
from tests.integration.test_proxy import cached_files, find, header
from txpypi.fetch.wanted import ByteSource
from txpypi.testing import Dist
from txpypi.web import files as files_module
from txpypi.web.sender import LocalSender, PreadSender, Sender, SendfileSender, SpoolSender, sender_for

URL = "/files/big/" + BIG
#: The server's socket buffer while a test holds the client back: small, so
#: that the server is soon blocked on a client that stops reading.
SMALL_SNDBUF = 16 * 1024


@attrs.define
class Seams:
    """
    What the senders did: the senders made, the C{sendfile} calls (offset,
    count asked) and the C{pread} steps.
    """

    senders: list[Sender] = attrs.Factory(list)
    sendfiles: list[tuple[int, int]] = attrs.Factory(list)
    steps: int = 0
    small_buffer: bool = False

    @property
    def calls(self) -> int:
        return len(self.sendfiles) + self.steps


@pytest.fixture
def seams(monkeypatch: pytest.MonkeyPatch) -> Seams:
    seams = Seams()
    real_sendfile = SendfileSender._sendfile
    real_step = PreadSender._step

    def made(request: Request, source: ByteSource, *args: Any) -> Sender:
        if seams.small_buffer:
            transport: Any = request.channel.transport
            handle = transport.getHandle()
            if not isinstance(handle, socket.socket):  # TLS: the TCP transport below
                handle = transport.transport.getHandle()
            handle.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, SMALL_SNDBUF)
        sender = sender_for(request, source, *args)
        seams.senders.append(sender)
        return sender

    def sendfile(out_fd: int, in_fd: int, offset: int, count: int) -> int:
        seams.sendfiles.append((offset, count))
        return real_sendfile(out_fd, in_fd, offset, count)

    def step(self: PreadSender) -> None:
        seams.steps += 1
        real_step(self)

    monkeypatch.setattr(files_module, "sender_for", made)
    monkeypatch.setattr(SendfileSender, "_sendfile", staticmethod(sendfile))
    monkeypatch.setattr(PreadSender, "_step", step)
    return seams


@pytest.fixture
def failures() -> Iterator[list[dict[str, Any]]]:
    """
    The events logged with a failure, or at level error and above, while
    the test runs.
    """
    seen: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        level = getattr(event.get("log_level"), "name", "")
        if "log_failure" in event or level in ("error", "critical"):
            seen.append(event)

    globalLogPublisher.addObserver(observe)
    yield seen
    globalLogPublisher.removeObserver(observe)


@attrs.define
class Client:
    """
    A blocking client on a small receive buffer, run in threads (a TLS
    handshake needs the reactor), that reads when the test says so.
    """

    port: int
    tls: TLS | None
    sock: Any = None
    head: bytes = b""
    body: bytes = b""

    def connect(self) -> None:
        raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        raw.settimeout(20)
        self.sock = raw
        if self.tls is not None:
            context = ssl.create_default_context(cafile=str(self.tls.ca))
            self.sock = context.wrap_socket(raw, server_hostname="127.0.0.1")
        self.sock.connect(("127.0.0.1", self.port))

    def ask(self, path: str, *headers: str, method: str = "GET") -> None:
        lines = [f"{method} {path} HTTP/1.1", "Host: p", *headers, "", ""]
        self.sock.sendall("\r\n".join(lines).encode())

    def read_head(self) -> None:
        """
        Read the status line and headers (and whatever came with them).
        """
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = self.sock.recv(4096)
            assert chunk, "the connection ended before the headers did"
            data += chunk
        self.head, _, self.body = data.partition(b"\r\n\r\n")

    def read_body(self, length: int) -> None:
        while len(self.body) < length:
            chunk = self.sock.recv(65536)
            assert chunk, "the connection ended before the body did"
            self.body += chunk

    def length(self) -> int:
        for line in self.head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                return int(value)
        raise AssertionError("no content-length")

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()


async def start(
    json_upstream: Served, proxy_factory: Any, tls: TLS, seams: Seams, scheme: str, **more: Any
) -> tuple[Running, Client]:
    """
    A proxy with BIG cached (the seams forget its miss), and a client of it
    (not connected yet).
    """
    endpoint = tls.endpoint() if scheme == "https" else None
    running: Running = proxy_factory(json_upstream.url, endpoint=endpoint, **more)
    running.scheme = scheme
    client = Client(running.port.getHost().port, tls if scheme == "https" else None)
    warm = Client(client.port, client.tls)
    try:
        await deferToThread(warm.connect)
        await deferToThread(warm.ask, URL, "Connection: close")
        await deferToThread(warm.read_head)
        await deferToThread(warm.read_body, warm.length())
    finally:
        warm.close()
    await Deferred.fromCoroutine(running.proxy.files.wait_idle())
    assert b"x-cache: miss" in warm.head.lower()
    # The miss: from its spool file by sendfile over plain TCP.
    assert [type(s) for s in seams.senders] == [SpoolSender if scheme == "http" else Sender]
    seams.senders.clear()
    seams.sendfiles.clear()
    return running, client


async def fetch(client: Client, path: str, *headers: str, method: str = "GET") -> None:
    """
    One request on a connection of its own, read to the end of its body.
    """
    try:
        await deferToThread(client.connect)
        await deferToThread(client.ask, path, "Connection: close", *headers, method=method)
        await deferToThread(client.read_head)
        if method == "GET" and not client.head.startswith(b"HTTP/1.1 304"):
            await deferToThread(client.read_body, client.length())
        else:
            assert await deferToThread(client.sock.recv, 1) == b""  # no body
    finally:
        client.close()


def the_path(scheme: str) -> type[LocalSender]:
    return SendfileSender if scheme == "http" else PreadSender


SCHEMES = pytest.mark.parametrize("scheme", ["http", "https"])


@SCHEMES
@pytest_twisted.ensureDeferred
async def test_a_whole_cached_file_and_a_range(
    json_upstream: Served, proxy_factory: Any, dists: list[Dist], tls: TLS, seams: Seams, scheme: str
) -> None:
    """
    A hit is sent byte for byte, whole and as a range, by the local path of
    its transport: sendfile over plain TCP (from the range's first byte
    on), large reads over TLS (never sendfile); the access log's count of
    bytes is the body's.
    """
    data = find(dists, BIG).content
    running, client = await start(json_upstream, proxy_factory, tls, seams, scheme)
    await fetch(client, URL)
    assert client.head.startswith(b"HTTP/1.1 200") and b"x-cache: hit" in client.head.lower()
    assert client.body == data
    assert [type(s) for s in seams.senders] == [the_path(scheme)]
    assert seams.senders[0].sent == len(data)
    registry = running.proxy.metrics.registry

    def served() -> float | None:
        return registry.get_sample_value("txpypi_served_bytes_total", {"source": "cache"})

    assert served() == len(data)  # the request's sentLength
    if scheme == "http":
        assert seams.sendfiles and seams.sendfiles[0][0] == 0 and seams.steps == 0
    else:
        assert seams.steps >= 1 and seams.sendfiles == []

    seams.sendfiles.clear()
    client = Client(client.port, client.tls)
    await fetch(client, URL, "Range: bytes=1000-2000099")
    assert client.head.startswith(b"HTTP/1.1 206")
    assert f"content-range: bytes 1000-2000099/{len(data)}".encode() in client.head.lower()
    assert client.body == data[1000:2000100]
    assert seams.senders[1].sent == 2000100 - 1000
    assert served() == len(data) + 2000100 - 1000
    if scheme == "http":
        assert seams.sendfiles[0][0] == 1000
        assert sum(count for _, count in seams.sendfiles) >= 2000100 - 1000
    assert cache_fds(running.proxy.files._store.root) == []  # type: ignore[attr-defined]


@SCHEMES
@pytest_twisted.ensureDeferred
async def test_head_and_304_send_no_body(
    json_upstream: Served, proxy_factory: Any, dists: list[Dist], tls: TLS, seams: Seams, scheme: str
) -> None:
    """
    A HEAD of a hit has the file's length and no body, and a matching
    If-None-Match is a 304 without one: neither starts a sender.
    """
    dist = find(dists, BIG)
    _, client = await start(json_upstream, proxy_factory, tls, seams, scheme)
    await fetch(client, URL, method="HEAD")
    assert client.head.startswith(b"HTTP/1.1 200") and client.body == b""
    assert client.length() == len(dist.content)
    client = Client(client.port, client.tls)
    await fetch(client, URL, f'If-None-Match: "{dist.sha256}"')
    assert client.head.startswith(b"HTTP/1.1 304") and client.body == b""
    assert seams.senders == [] and seams.calls == 0


async def held_back(client: Client, seams: Seams) -> LocalSender:
    """
    Ask for BIG, read the headers, and stop reading: the server's socket
    buffer is small, so its sender is soon blocked on the client.
    """
    seams.small_buffer = True
    await deferToThread(client.connect)
    await deferToThread(client.ask, URL)
    await deferToThread(client.read_head)
    [sender] = seams.senders
    assert isinstance(sender, LocalSender)
    return sender


async def calls_while_idle(seams: Seams, seconds: float = 0.5) -> int:
    """
    The sends (sendfile calls or reads) the senders made in C{seconds} of
    a client taking nothing: an observation window, not a wait for an
    event.
    """
    await deferLater(get_reactor(), 0.2, lambda: None)  # what the buffers still took
    before = seams.calls
    cpu = time.process_time()
    await deferLater(get_reactor(), seconds, lambda: None)
    assert time.process_time() - cpu < seconds / 2  # no busy loop in this process
    return seams.calls - before


@SCHEMES
@pytest_twisted.ensureDeferred
async def test_a_client_that_stops_reading_wakes_nothing_up(
    json_upstream: Served, proxy_factory: Any, dists: list[Dist], tls: TLS, seams: Seams, scheme: str
) -> None:
    """
    While a client takes no bytes, its sender waits for the socket to be
    writable: no sendfile call (or read) at all; once it reads again, it
    gets the whole file.
    """
    data = find(dists, BIG).content
    _, client = await start(json_upstream, proxy_factory, tls, seams, scheme)
    try:
        sender = await held_back(client, seams)
        assert await calls_while_idle(seams) == 0
        assert not sender.when_done().called and sender.sent < len(data)
        await deferToThread(client.read_body, client.length())
    finally:
        client.close()
    assert client.body == data
    await sender.when_done()
    assert sender.sent == len(data)


@SCHEMES
@pytest_twisted.ensureDeferred
async def test_a_client_that_leaves_mid_file(
    json_upstream: Served,
    proxy_factory: Any,
    dists: list[Dist],
    tls: TLS,
    seams: Seams,
    failures: list[dict[str, Any]],
    scheme: str,
) -> None:
    """
    A client that closes its connection mid-file ends its sender, which
    closes the file's descriptor; nothing is logged as an error.
    """
    running, client = await start(json_upstream, proxy_factory, tls, seams, scheme)
    root = running.proxy.files._store.root  # type: ignore[attr-defined]
    sender = await held_back(client, seams)
    assert len(cache_fds(root)) == 1
    client.close()
    await sender.when_done().addTimeout(10, get_reactor())
    assert sender.sent < len(find(dists, BIG).content)
    assert cache_fds(root) == []
    assert running.proxy.senders == set()
    assert failures == []


@SCHEMES
@pytest_twisted.ensureDeferred
async def test_a_file_evicted_while_it_is_sent(
    json_upstream: Served, proxy_factory: Any, dists: list[Dist], tls: TLS, seams: Seams, scheme: str
) -> None:
    """
    A file deleted from the store while it is sent still reaches its
    client whole: the sender holds its descriptor.
    """
    data = find(dists, BIG).content
    running, client = await start(json_upstream, proxy_factory, tls, seams, scheme)
    try:
        sender = await held_back(client, seams)
        [path] = cached_files(running)
        path.unlink()
        await deferToThread(client.read_body, client.length())
    finally:
        client.close()
    assert client.body == data
    await sender.when_done()
    assert cached_files(running) == []


@SCHEMES
@pytest_twisted.ensureDeferred
async def test_send_timeout_cuts_off_a_client_of_a_hit(
    json_upstream: Served, proxy_factory: Any, dists: list[Dist], tls: TLS, seams: Seams, scheme: str
) -> None:
    """
    Waiting for the socket pauses the channel as a full buffer does, so
    --send-timeout still cuts off a client that takes nothing of a hit.
    """
    running, client = await start(json_upstream, proxy_factory, tls, seams, scheme, send_timeout=0.5)
    try:
        sender = await held_back(client, seams)
        await sender.when_done().addTimeout(10, get_reactor())
    finally:
        client.close()
    assert sender.sent < len(find(dists, BIG).content)
    metrics = running.proxy.metrics
    assert metrics.client_timeouts.labels("send")._value.get() == 1  # type: ignore[attr-defined]


@pytest_twisted.ensureDeferred
async def test_keep_alive_after_sendfile(
    json_upstream: Served, proxy_factory: Any, dists: list[Dist], tls: TLS, seams: Seams
) -> None:
    """
    After a body sent by sendfile, the same connection serves the next
    request (the socket is uncorked, the length was right).
    """
    data = find(dists, BIG).content
    _, client = await start(json_upstream, proxy_factory, tls, seams, "http")
    try:
        await deferToThread(client.connect)
        for _ in range(2):
            client.body = b""
            await deferToThread(client.ask, URL, "Range: bytes=0-99999")
            await deferToThread(client.read_head)
            await deferToThread(client.read_body, client.length())
            assert client.body == data[:100000]
    finally:
        client.close()
    assert [type(s) for s in seams.senders] == [SendfileSender, SendfileSender]


# -- --accel-redirect


@pytest_twisted.ensureDeferred
async def test_accel_redirect_answers_hits_and_streams_misses(
    json_upstream: Served, proxy_factory: Any, dists: list[Dist], tls: TLS, seams: Seams
) -> None:
    """
    With --accel-redirect, a miss streams as usual; a GET hit is an empty
    answer naming the file's path under files/ after the prefix, with the
    hit's headers; a HEAD is answered as usual.
    """
    dist = find(dists, BIG)
    running, client = await start(
        json_upstream, proxy_factory, tls, seams, "http", accel_redirect="/internal/"
    )
    [path] = cached_files(running)
    key = path.relative_to(Path(running.proxy.files._store.root) / "files")  # type: ignore[attr-defined]
    assert key.as_posix() == f"{dist.sha256[:2]}/{dist.sha256}/{BIG}"
    response, body = await get(running.url + URL)
    assert response.code == 200 and body == b""
    assert header(response, "x-accel-redirect") == f"/internal/{key.as_posix()}"
    assert header(response, "etag") == f'"{dist.sha256}"'
    assert header(response, "x-cache") == "HIT"
    assert header(response, "content-type") == "application/octet-stream"
    response, body = await get(running.url + URL, {b"Range": [b"bytes=10-19"]})
    assert response.code == 200 and body == b""  # nginx answers the range
    assert header(response, "x-accel-redirect") == f"/internal/{key.as_posix()}"
    assert header(response, "content-range") is None
    response, body = await get(running.url + URL, {b"If-None-Match": [f'"{dist.sha256}"'.encode()]})
    assert response.code == 304 and header(response, "x-accel-redirect") is None
    response, body = await get(running.url + URL, method=b"HEAD")
    assert response.code == 200 and header(response, "x-accel-redirect") is None
    assert header(response, "content-length") == str(len(dist.content))
    other = find(dists, "gamma-0.5-py3-none-any.whl")
    response, body = await get(running.url + "/files/gamma/" + other.filename)
    assert response.code == 200 and body == other.content
    assert header(response, "x-accel-redirect") is None and header(response, "x-cache") == "MISS"
    # The miss, streamed (from its spool file).
    assert seams.senders and all(type(s) is SpoolSender for s in seams.senders)


@pytest_twisted.ensureDeferred
async def test_a_download_in_progress_goes_by_sendfile_from_its_spool(
    json_upstream: Served, proxy_factory: Any, seams: Seams, http: Any, dists: list[Dist]
) -> None:
    """
    A client that joins a download in progress over plain TCP gets the
    bytes already in the spool file by sendfile, all but the last one
    received while the upstream holds the second half back, and the rest
    once it comes.  (A download that turns out wrong cuts such a client
    off short: L{tests.integration.test_proxy.test_bad_download_is_aborted_and_not_cached}.)
    """
    from tests.integration.test_shared import receive_until

    data = find(dists, BIG).content
    half = len(data) // 2  # what the upstream sends before it holds the rest
    gate: Deferred[None] = Deferred()
    json_upstream.fake.holds[BIG] = gate
    running: Running = proxy_factory(json_upstream.url)
    first = await http.get(running.url + URL, unbuffered=True)
    flight = running.proxy.files.downloads.flights[running.proxy.files.key("big", BIG)]
    spool = flight.spool
    spooled: Deferred[None] = Deferred()
    told = spool._on_written  # the flight's own: it goes on being told

    def written(error: Any) -> None:
        told(error)
        if spool.spooled >= half and not spooled.called:
            spooled.callback(None)

    spool._on_written = written
    if spool.spooled >= half:
        spooled.callback(None)
    first_got, first_reached, first_done = receive_until(first, half - 1)
    await spooled  # the first half is in the spool file,
    await first_reached  # and the first client waits for the rest: it sends nothing now
    seams.senders.clear()
    seams.sendfiles.clear()
    response = await http.get(running.url + URL, unbuffered=True)
    assert response.code == 200 and header(response, "x-cache") == "MISS"
    got, reached, done = receive_until(response, half - 1)
    await reached
    assert bytes(got) == data[: half - 1]  # the last byte received waits for the rest
    assert [type(s) for s in seams.senders] == [SpoolSender]
    assert seams.sendfiles and all(offset < half for offset, _ in seams.sendfiles)
    gate.callback(None)
    await done
    await first_done
    assert bytes(got) == bytes(first_got) == data
    assert json_upstream.fake.requests["/packages/" + BIG] == 1


def test_only_local_readers_take_the_local_paths() -> None:
    """
    A source that is not a local file (a flight's reader, an object
    store's) keeps the Deferred path.
    """

    class Remote:
        size = 10

        def read(self, offset: int, length: int) -> Deferred[bytes]:
            raise NotImplementedError

        def close(self) -> None:
            pass

    request: Any = object()
    assert type(sender_for(request, Remote())) is Sender

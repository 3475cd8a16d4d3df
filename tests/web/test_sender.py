"""
The file sender on a real L{Request} over a L{DummyChannel}: it honours
back-pressure, stops when the client leaves, and aborts on a read error.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.web.server import Request
from twisted.web.test.requesthelper import DummyChannel

from txpypi.web.sender import CHUNK, Sender


class _Source:
    """
    A byte source that can be told when to have more bytes.
    """

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.available = 0
        self.waiting: Deferred[bytes] | None = None
        self.closed = False
        self.size: int | None = len(data)

    def read(self, offset: int, length: int) -> Deferred[bytes]:
        if offset < self.available:
            return succeed(self.data[offset : min(self.available, offset + length)])
        if offset >= len(self.data):
            return succeed(b"")
        self.waiting = Deferred()
        self._offset, self._length = offset, length
        return self.waiting

    def more(self, n: int) -> None:
        self.available = min(len(self.data), self.available + n)
        waiting, self.waiting = self.waiting, None
        if waiting is not None:
            waiting.callback(self.data[self._offset : min(self.available, self._offset + self._length)])

    def close(self) -> None:
        self.closed = True


def _request() -> tuple[Request, Any]:
    channel = DummyChannel()
    request = Request(channel, False)
    request.method = b"GET"
    request.clientproto = b"HTTP/1.1"
    return request, channel.transport


def test_sender_honours_back_pressure() -> None:
    """
    While the client's transport has paused us, no more bytes are read or
    written; on resume they flow again, and the request finishes at the end.
    """
    data = bytes(range(256)) * (3 * CHUNK // 256)
    source = _Source(data)
    request, transport = _request()
    request.setHeader(b"content-length", b"%d" % len(data))
    sender = Sender(request, source)
    done = sender.start()
    assert sender.sent == 0 and source.waiting is not None
    source.more(CHUNK)
    assert sender.sent == CHUNK
    sender.pauseProducing()
    source.more(2 * CHUNK)  # answers the pending read
    assert sender.sent == 2 * CHUNK
    written = len(transport.written.getvalue())
    source.more(0)
    assert sender.sent == 2 * CHUNK and len(transport.written.getvalue()) == written
    sender.resumeProducing()
    assert sender.sent == 3 * CHUNK
    assert done.called and request.finished and source.closed
    assert transport.written.getvalue().endswith(b"\r\n\r\n" + data)


def test_sender_stops_when_the_client_leaves() -> None:
    source = _Source(b"x" * 10)
    request, _ = _request()
    sender = Sender(request, source)
    done = sender.start()
    pending = source.waiting
    sender.stopProducing()
    assert pending is not None and pending.called  # cancelled
    assert done.called and source.closed and not request.finished


def test_sender_aborts_the_client_on_a_read_error() -> None:
    """
    A store that fails mid-file must never yield a complete-looking body:
    the connection is aborted instead of finished.
    """
    from twisted.internet.testing import StringTransport

    class Broken(_Source):
        def read(self, offset: int, length: int) -> Deferred[bytes]:
            if offset >= 10:
                raise OSError(5, "Input/output error")
            return succeed(self.data[offset:10])

    request, _ = _request()
    transport = StringTransport()
    request.channel.transport = transport
    request.setHeader(b"content-length", b"20")
    source = Broken(b"x" * 20)
    Sender(request, source).start()
    assert transport.disconnected and not request.finished and source.closed
    assert transport.value().endswith(b"\r\n\r\n" + b"x" * 10)

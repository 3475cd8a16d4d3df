"""
A fault injector in front of a real S3 server (SeaweedFS): it passes every
request through, and on demand answers object reads with a 500 (as a
gateway whose volume servers are down does: listings, HEAD and writes still
work) or drops the C{Range} header of reads (as a gateway that ignores it
does, answering 200 with the whole object).
"""

from __future__ import annotations

from io import BytesIO
from typing import Any
from urllib.parse import urlsplit

from twisted.internet.defer import Deferred
from twisted.web.client import Agent, FileBodyProducer, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

#: Headers that belong to one connection, or that this relay sets itself.
#: (Host is passed on as it came: it is part of the request's signature.)
_HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"expect", b"content-length", b"te"}

_ERROR = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InternalError</Code>'
    b"<Message>injected: the volume servers are down</Message></Error>"
)


class FaultyS3(Resource):
    """
    Relays to C{target} (an S3 endpoint URL), with faults.

    @ivar fail_reads: answer GETs of objects with a 500.
    @ivar ignore_range: answer GETs of objects written through here with a
        200 and the whole object, whatever their C{Range} (the relay cannot
        drop the header itself: it is part of the request's signature).
    @ivar reads: GETs of objects seen, by path.
    """

    isLeaf = True

    def __init__(self, reactor: Any, target: str) -> None:
        super().__init__()
        self._target = target.rstrip("/")
        self._pool = HTTPConnectionPool(reactor, persistent=False)
        self._agent = Agent(reactor, pool=self._pool)
        self.fail_reads = False
        self.ignore_range = False
        self.reads: list[str] = []
        #: The objects written through here in one PUT, by path.
        self.bodies: dict[str, bytes] = {}
        self._read_waiters: list[tuple[str, Deferred[None]]] = []

    def next_read(self, containing: str) -> Deferred[None]:
        """
        Fire at the next GET of an object whose path contains C{containing}.
        """
        d: Deferred[None] = Deferred()
        self._read_waiters.append((containing, d))
        return d

    @staticmethod
    def _is_object(request: Request) -> bool:
        path = urlsplit(request.uri.decode("latin-1")).path
        return len([p for p in path.split("/") if p]) >= 2 and not request.args

    def render(self, request: Request) -> int | bytes:  # type: ignore[override]
        reading = request.method == b"GET" and self._is_object(request)
        if reading:
            path = urlsplit(request.uri.decode("latin-1")).path
            self.reads.append(path)
            for waiting in list(self._read_waiters):
                if waiting[0] in path:
                    self._read_waiters.remove(waiting)
                    waiting[1].callback(None)
            if self.fail_reads:
                request.setResponseCode(500)
                request.setHeader(b"content-type", b"application/xml")
                return _ERROR
            whole = self.bodies.get(path)
            if self.ignore_range and whole is not None:
                request.setHeader(b"content-type", b"binary/octet-stream")
                return whole
        headers = Headers()
        for name, values in request.requestHeaders.getAllRawHeaders():
            if name.lower() not in _HOP:
                headers.setRawHeaders(name, values)
        assert request.content is not None
        body = request.content.read()
        if request.method == b"PUT" and self._is_object(request):
            self.bodies[urlsplit(request.uri.decode("latin-1")).path] = body
        producer = FileBodyProducer(BytesIO(body)) if body or request.method == b"PUT" else None
        d = self._agent.request(
            request.method, (self._target + request.uri.decode("latin-1")).encode(), headers, producer
        )
        d.addCallback(self._relay, request)
        d.addErrback(self._failed, request)
        return NOT_DONE_YET

    async def _answer(self, response: Any, request: Request) -> None:
        request.setResponseCode(response.code)
        for name, values in response.headers.getAllRawHeaders():
            if name.lower() not in _HOP:
                request.responseHeaders.setRawHeaders(name, values)
        body = b"" if request.method == b"HEAD" else await readBody(response)
        if request.method == b"HEAD":
            length = response.headers.getRawHeaders(b"content-length")
            if length:
                request.responseHeaders.setRawHeaders(b"content-length", length)
        else:
            request.responseHeaders.setRawHeaders(b"content-length", [b"%d" % len(body)])
            request.write(body)
        request.finish()

    def _relay(self, response: Any, request: Request) -> Deferred[None]:
        return Deferred.fromCoroutine(self._answer(response, request))

    def _failed(self, failure: Any, request: Request) -> None:
        if not request.finished:
            request.setResponseCode(502)
            request.write(b"relay failed")
            request.finish()

    def close(self) -> Deferred[None]:
        d: Deferred[None] = self._pool.closeCachedConnections()
        return d

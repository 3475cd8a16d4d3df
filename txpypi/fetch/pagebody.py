"""
An index page's body: collected as it arrives, inflated when it is gzip,
bounded in size and in time, and failed when it may have been cut.
"""

from __future__ import annotations

import io
import zlib
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import TimeoutError
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers

from txpypi.fetch.exchange import UpstreamError, classify

#: The most bytes an index page body may have (once decompressed): past
#: it the fetch fails with a 502, so that neither a gzip bomb nor an
#: endless body can exhaust memory.  PyPI's root page, the biggest there
#: is, has some 40 MB of JSON.
MAX_PAGE_BYTES = 128 * 1024 * 1024

#: The C{Content-Encoding}s a page may come in: none, or gzip.
PLAIN = frozenset({b"", b"identity"})
GZIP = frozenset({b"gzip", b"x-gzip"})


def content_coding(headers: Headers) -> bytes:
    """
    A response's C{Content-Encoding}, lower case (C{b""} without one).
    """
    return b",".join(headers.getRawHeaders(b"content-encoding") or []).strip().lower()


class PageTooLarge(Exception):
    """
    A page body grew past its limit (decompressed).
    """


class Unframed(Exception):
    """
    A page body had neither a C{Content-Length} nor chunked framing: it
    ended when the connection closed, so it may have been cut.
    """


class BadGzip(Exception):
    """
    A gzip-encoded page body was not valid gzip, or ended before its end.
    """


def page_error(failure_value: BaseException, url: str) -> UpstreamError:
    """
    The L{UpstreamError} a page fetch of C{url} ends with, its body's
    failures included.
    """
    if isinstance(failure_value, PageTooLarge):
        return UpstreamError(502, f"upstream page {url} is larger than {failure_value} bytes")
    if isinstance(failure_value, Unframed):
        return UpstreamError(
            502, f"upstream page {url} had no length and ended when the connection closed (maybe cut)"
        )
    if isinstance(failure_value, BadGzip):
        return UpstreamError(502, f"upstream page {url} is not valid gzip: {failure_value}")
    return classify(failure_value, url)


class PageBody(Protocol):
    """
    Collects a page body, decompressing it as it arrives when it is gzip
    (at most C{limit} bytes out, however small the input), and fails: with
    L{TimeoutError} when the upstream sends nothing for C{idle} seconds, or
    less than C{min_rate} bytes a second over C{idle} seconds (a slow drip),
    L{PageTooLarge} past C{limit} bytes, L{Unframed} when the body only
    ended with the connection, L{BadGzip} for broken gzip.  On a failure
    before the end it drops the connection.
    """

    def __init__(
        self,
        clock: IReactorTime,
        idle: float,
        gzipped: bool = False,
        limit: int = MAX_PAGE_BYTES,
        min_rate: float = 0.0,
    ):
        self.done: Deferred[bytes] = Deferred()
        self._body = io.BytesIO()  # one growing buffer, not pieces to join
        self._size = 0
        self._limit = limit
        self._inflater = zlib.decompressobj(wbits=31) if gzipped else None
        self._idle = idle
        self._clock = clock
        self._timer: IDelayedCall = clock.callLater(
            idle, self._fail, TimeoutError("no data from the upstream")
        )
        self._min_rate = min_rate
        self._received = 0
        self._window_from = 0
        self._rate: IDelayedCall | None = None
        if min_rate > 0 and idle > 0:
            self._rate = clock.callLater(idle, self._check_rate)

    def _check_rate(self) -> None:
        got = self._received - self._window_from
        if got < self._min_rate * self._idle:
            self._fail(
                TimeoutError(
                    f"the upstream sent {got} bytes in {self._idle:g} s, under {self._min_rate:g} bytes/s"
                )
            )
            return
        self._window_from = self._received
        self._rate = self._clock.callLater(self._idle, self._check_rate)

    def dataReceived(self, data: bytes) -> None:
        if self.done.called:
            return
        self._received += len(data)
        if self._timer.active():
            self._timer.reset(self._idle)
        if self._inflater is None:
            self._add(data)
            return
        try:
            while data and not self.done.called:
                if self._inflater.eof:  # another gzip member follows
                    self._inflater = zlib.decompressobj(wbits=31)
                self._add(self._inflater.decompress(data, self._limit - self._size + 1))
                data = self._inflater.unconsumed_tail or self._inflater.unused_data
        except zlib.error as e:
            self._fail(BadGzip(str(e)))

    def _add(self, data: bytes) -> None:
        self._size += len(data)
        if self._size > self._limit:
            self._fail(PageTooLarge(self._limit))
        elif data:
            self._body.write(data)

    def _stop_timers(self) -> None:
        for timer in (self._timer, self._rate):
            if timer is not None and timer.active():
                timer.cancel()

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._stop_timers()
        if self.done.called:
            return
        body, self._body = self._body, io.BytesIO()
        if reason.check(PotentialDataLoss):
            self.done.errback(Unframed())
        elif not reason.check(ResponseDone):
            self.done.errback(reason)
        elif self._inflater is not None and not self._inflater.eof:
            self.done.errback(BadGzip("the body ended inside the gzip stream"))
        else:
            self.done.callback(body.getvalue())

    def _fail(self, error: Exception) -> None:
        self._stop_timers()
        self._body = io.BytesIO()
        self.done.errback(error)
        transport: Any = self.transport
        if transport is not None:
            transport.stopProducing()  # deliverBody's transport is an IPushProducer

"""
What every exchange with the upstream shares, pages and files alike: how it
fails (L{UpstreamError}, L{UpstreamNotFound}, L{classify}), its timeouts,
the wait for an answer under the response timeout, and the record of how
each one ended (the state C{/health} shows, and the metrics).
"""

from __future__ import annotations

from typing import TypeVar

import attrs
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectError, DNSLookupError, TimeoutError
from twisted.internet.interfaces import IReactorTime
from twisted.python.failure import Failure
from twisted.web.client import ResponseFailed
from twisted.web.http_headers import Headers

from txpypi import __version__
from txpypi.core.counting import UpstreamCounts
from txpypi.core.fetchpolicy import Origin, Refused
from txpypi.core.live import Live

T = TypeVar("T")

USER_AGENT = f"txpypi/{__version__}".encode()


class UpstreamError(Exception):
    """
    The upstream failed us.  C{status} is what we answer the client
    (502 or 504); C{reason} is a one-line explanation.
    """

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class UpstreamNotFound(Exception):
    """
    The upstream answered 404 for a page or file.
    """


def classify(failure_value: BaseException, url: str) -> UpstreamError:
    """
    The L{UpstreamError} an exchange with C{url} that raised
    C{failure_value} ends with: 504 when it timed out, else 502.
    """
    if isinstance(failure_value, Refused):
        return UpstreamError(502, str(failure_value))
    if isinstance(failure_value, (CancelledError, TimeoutError)):
        return UpstreamError(504, f"upstream timed out: {url}")
    if isinstance(failure_value, (ConnectError, DNSLookupError)):
        return UpstreamError(502, f"upstream unreachable: {url}: {failure_value.__class__.__name__}")
    if isinstance(failure_value, ResponseFailed):
        if any(isinstance(r, Failure) and r.check(CancelledError) for r in failure_value.reasons):
            # A real connection's request cancelled by the response
            # timeout ends so (ResponseNeverReceived([CancelledError])).
            return UpstreamError(504, f"upstream timed out: {url}")
        return UpstreamError(502, f"upstream connection failed: {url}")
    return UpstreamError(502, f"upstream error: {url}: {failure_value!r}")


def outcome_of(error: UpstreamError) -> str:
    """
    The metrics outcome of a failed exchange.
    """
    return "timeout" if error.status == 504 else "error"


@attrs.frozen
class Credentials:
    """
    The C{Authorization} header value an upstream's own origin gets, and no
    other origin: never shown (not in reprs, reasons or logs).
    """

    #: The origin of the upstream's URL.
    origin: Origin
    authorization: str = attrs.field(repr=False)

    @classmethod
    def of(cls, upstream_url: str, authorization: str) -> Credentials:
        """
        The credentials of the upstream at C{upstream_url}.

        @raise ValueError: when the URL has no origin (see L{Origin.of}).
        """
        return cls(Origin.of(upstream_url), authorization)

    def add_to(self, headers: Headers, origin: Origin) -> None:
        """
        Set C{Authorization} in C{headers}, when they go to C{origin} and
        that is the upstream's own.
        """
        if origin == self.origin:
            headers.setRawHeaders(b"Authorization", [self.authorization.encode("latin-1")])


def page_credentials(credentials: dict[str, Credentials], url: str) -> Credentials | None:
    """
    The credentials a page GET of C{url} sends: those of the upstream whose
    URL it starts with, else of the first one on its origin; none for
    another origin.

    @param credentials: the credentials of the upstreams that have some,
        by upstream URL.
    """
    try:
        origin = Origin.of(url)
    except ValueError:
        return None  # refused when it connects
    same = [(prefix, each) for prefix, each in credentials.items() if each.origin == origin]
    for prefix, each in same:
        if url.startswith(prefix):
            return each
    return same[0][1] if same else None


@attrs.define
class Timeouts:
    """
    The live limits of upstream exchanges (the connect timeout is the
    dialer's, fixed), read from the proxy's L{Live} settings, which the page
    and file sides share: a SIGHUP that changes them reaches both.
    """

    live: Live

    @property
    def response(self) -> float:
        """
        Seconds for the answer's headers to arrive (C{--response-timeout}).
        """
        return self.live.response_timeout

    @property
    def read(self) -> float:
        """
        Seconds the body may send nothing (C{--read-timeout}).
        """
        return self.live.read_timeout

    @property
    def min_rate(self) -> float:
        """
        The slowest a body may come, in bytes per second over each C{read}
        seconds (C{--min-download-rate}; 0: no minimum).
        """
        return self.live.min_download_rate


async def answered_within(clock: IReactorTime, seconds: float, d: Deferred[T]) -> T:
    """
    Wait for C{d}, cancelling it when it has not fired after C{seconds}
    (it then fails with L{CancelledError}, which L{classify} calls a
    timeout).
    """
    timer = clock.callLater(seconds, d.cancel)
    try:
        return await d
    finally:
        if timer.active():
            timer.cancel()


@attrs.define
class Health:
    """
    How the upstream's exchanges ended: the state C{/health} shows, and the
    C{upstream} metrics (by upstream name, kind and outcome, with their
    latency).
    """

    _clock: IReactorTime
    #: The proxy's L{txpypi.web.metrics.Metrics} (a layer above), or L{None}.
    metrics: UpstreamCounts | None = None
    #: The configured name of the upstream, its metrics' C{upstream} label
    #: (a peer's exchanges are counted under the same name).
    name: str = attrs.field(default="upstream", kw_only=True)
    #: When the upstream last answered as expected, and last failed (with why).
    last_success: float | None = None
    last_error: tuple[float, str] | None = None

    def state(self) -> str:
        """
        C{unknown} before any exchange, C{degraded} when the last one failed,
        else C{ok}.
        """
        if self.last_error is not None and (
            self.last_success is None or self.last_error[0] > self.last_success
        ):
            return "degraded"
        return "ok" if self.last_success is not None else "unknown"

    def now(self) -> float:
        """
        The time an exchange starts at (to pass back to L{record}).
        """
        return self._clock.seconds()

    def record(self, kind: str, outcome: str, started: float, reason: str | None = None) -> None:
        """
        An exchange of C{kind} (C{page}, C{file}, or C{peer}: another
        instance, not the upstream) ended with C{outcome}; a failure when
        there is a C{reason}.
        """
        now = self._clock.seconds()
        if kind == "peer":
            pass  # another instance, not the upstream
        elif reason is None:
            self.last_success = now
        else:
            self.last_error = (now, reason)
        if self.metrics is not None:
            self.metrics.upstream.labels(self.name, kind, outcome).inc()
            self.metrics.upstream_latency.labels(self.name, kind).observe(now - started)

    def refused(self, kind: str) -> None:
        """
        The fetch policy refused an exchange of C{kind}: counted, and not
        the upstream's health.
        """
        if self.metrics is not None:
            self.metrics.upstream.labels(self.name, kind, "refused").inc()


class Discard:
    """
    A body protocol that throws the body away (so the connection can be
    reused or closed cleanly).
    """

    def makeConnection(self, transport: object) -> None:
        pass

    def dataReceived(self, data: bytes) -> None:
        pass

    def connectionLost(self, reason: object) -> None:
        pass

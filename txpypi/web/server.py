"""
The connections of the clients: bounded in number, in time (a client that
takes no bytes, a request that trickles in) and in request body size; and
the site that counts every request and writes the access log.
"""

from __future__ import annotations

from io import BytesIO
from typing import Any

import attrs
from twisted.internet.interfaces import IAddress, IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.resource import IResource
from twisted.web.server import Request, Site

from txpypi.core.live import Live
from txpypi.web.accesslog import (
    LOGGER,
    AccessLogWriter,
    Entry,
    Stamps,
    client_address,
    combined,
    combined_parts,
    json_line,
)
from txpypi.web.answers import header
from txpypi.web.metrics import Metrics, route_of
from txpypi.web.quick import Dates, FileBody, Parses, QuickRequest, send_now

log = Logger(namespace="txpypi.app")
access_log = Logger(namespace="txpypi.access")


#: The largest request body accepted on a C{GET} or C{HEAD}, in bytes: no
#: route reads one.
MAX_GET_BODY = 4 * 1024
#: The largest request body accepted on any other method, in bytes: the
#: admin routes read none.  (Under Twisted's 100 000 bytes, past which it
#: would spool a body to a temporary file.)
MAX_REQUEST_BODY = 64 * 1024


@attrs.define
class ConnectionLimits:
    """
    The bounds on the clients' connections, shared by every listener of the
    process (every site that L{Proxy.site} makes), and read live: SIGHUP
    changes them.

    @ivar live: the live settings whose C{max_connections} (the most
        connections open at once; past it, a new connection is closed at
        once) and C{send_timeout} (seconds a client may take no bytes of a
        response before it is cut off; also the time a request may take to
        arrive from its first byte, and the idle timeout of a keep-alive
        connection between requests) it reads.
    @ivar open: the connections open now.
    """

    live: Live = attrs.field(factory=Live)
    open: int = 0
    #: Whether the refusals since the limit was last reached were logged.
    full_logged: bool = False

    @property
    def max_connections(self) -> int:
        return self.live.max_connections

    @property
    def send_timeout(self) -> float:
        return self.live.send_timeout


def _reset(transport: Any) -> None:
    """
    Abort a connection with a reset, not a FIN, so that nothing lingers in
    the kernel for a client that does not read: Twisted's TCP transport
    closes an aborted socket with C{SO_LINGER} 0 (what L{abort_client} sets
    by hand), and under TLS the TCP transport below is aborted.
    """
    transport.abortConnection()


def _peer(transport: Any) -> str:
    peer = transport.getPeer() if transport is not None else None
    return str(getattr(peer, "host", peer))


class ProxyRequest(Request):
    """
    A request whose body is held in memory and counted by its
    L{ProxyChannel}, which refuses one past L{MAX_REQUEST_BODY} bytes.
    """

    def gotLength(self, length: int | None) -> None:
        # Twisted spools a body of unknown (chunked) or large declared
        # length to a temporary file; the channel bounds it to a few KiB.
        self.content = BytesIO()

    def handleContentChunk(self, data: bytes) -> None:
        channel = self.channel
        if isinstance(channel, ProxyChannel) and not channel.body_received(len(data)):
            return
        super().handleContentChunk(data)


class ProxyChannel(HTTPChannel):
    """
    An HTTP/1.1 connection that no client can hold forever:

      - A client that takes no bytes of a response for C{send_timeout}
        seconds is cut off with a reset.  The channel is its transport's
        producer: the transport pauses it when the client stops taking
        bytes and resumes it when the client takes them again, so this
        covers every response, whatever wrote it.
      - A request (its line, headers and body) must arrive within
        C{send_timeout} seconds of its first byte, or it gets a C{408} and
        the connection is closed (a client trickling a byte at a time would
        otherwise reset the idle timeout forever); and a keep-alive
        connection idle for C{send_timeout} between requests is closed (the
        channel's idle timeout, C{timeOut}, set by L{ProxySite}).
      - A request body past L{MAX_GET_BODY} on C{GET} and C{HEAD}, or past
        L{MAX_REQUEST_BODY} on any other method, gets a C{413} and the
        connection is closed, before the body is read: a declared
        C{Content-Length} is checked once the headers are complete, and a
        chunked body is counted as it arrives.

    The limits are the site's L{ConnectionLimits}, read live.
    """

    site: ProxySite
    #: Cuts the client off once a pause lasted C{send_timeout}.
    _stalled: IDelayedCall | None = None
    #: Closes the connection if the request in progress is not all there
    #: in C{send_timeout}.
    _deadline: IDelayedCall | None = None
    _counted = False
    _refused = False
    _body_limit = MAX_REQUEST_BODY
    _body_seen = 0

    @property
    def _limits(self) -> ConnectionLimits:
        return self.site.connections

    def connectionMade(self) -> None:
        self._limits.open += 1
        self._counted = True
        super().connectionMade()

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        if self._counted:
            self._counted = False
            limits = self._limits
            limits.open -= 1
            if limits.open < limits.max_connections:
                limits.full_logged = False
        self._cancel_stalled()
        self._cancel_deadline()
        super().connectionLost(reason)

    # -- the client takes no bytes

    def pauseProducing(self) -> None:
        if self._stalled is None and not self._refused:
            self._stalled = self.callLater(self._limits.send_timeout, self._send_timed_out)
        super().pauseProducing()

    def resumeProducing(self) -> None:
        self._cancel_stalled()
        super().resumeProducing()

    def _cancel_stalled(self) -> None:
        if self._stalled is not None:
            if self._stalled.active():
                self._stalled.cancel()
            self._stalled = None

    def _send_timed_out(self) -> None:
        self._stalled = None
        seconds = self._limits.send_timeout
        log.info(
            "cut off {client}: it took no bytes for {seconds:g} s (send-timeout)",
            client=_peer(self.transport),
            seconds=seconds,
        )
        self.site.metrics.client_timeouts.labels("send").inc()
        _reset(self.transport)

    # -- the request arrives too slowly

    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            return
        if self._between_requests() and self.site.quick(self, data):
            self.resetTimeout()  # as the usual way does for each request's bytes
            return
        if self._deadline is None and not self._handlingRequest and data:
            self._deadline = self.callLater(self._limits.send_timeout, self._request_timed_out)
        super().dataReceived(data)

    @property
    def peer_host(self) -> str:
        """
        The client's address, as the access log writes it (looked up once).
        """
        found: str | None = getattr(self, "_peer_host", None)
        if found is None:
            peer = self.transport.getPeer() if self.transport is not None else None
            found = self._peer_host = str(getattr(peer, "host", "-"))
        return found

    def _between_requests(self) -> bool:
        """
        Whether the connection waits for a request's first byte: no request
        in progress or queued, nothing of one read, not paused (the quick
        lane's condition, L{txpypi.web.quick}).
        """
        return bool(
            not self._handlingRequest
            # Not after the stray empty line Twisted eats once per request.
            and getattr(self, "_HTTPChannel__first_line", 1) == 1
            and not self.requests
            and not self._buffer
            and self.line_mode
            and not self.paused
            and not self._receivedHeaderSize
            and self.persistent
        )

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None

    def _request_timed_out(self) -> None:
        self._deadline = None
        seconds = self._limits.send_timeout
        log.info(
            "closed the connection of {client}: its request took over {seconds:g} s to arrive (send-timeout)",
            client=_peer(self.transport),
            seconds=seconds,
        )
        self.site.metrics.client_timeouts.labels("request").inc()
        self._refuse(408, b"Request Timeout", f"the request did not arrive within {seconds:g} s")

    def allContentReceived(self) -> None:
        if self._refused:
            return
        self._cancel_deadline()
        super().allContentReceived()

    # -- bodies

    def allHeadersReceived(self) -> None:
        get = self._command in (b"GET", b"HEAD")
        self._body_limit = MAX_GET_BODY if get else MAX_REQUEST_BODY
        self._body_seen = 0
        if self.length is not None and self.length > self._body_limit:
            self._refuse_body()
            return
        super().allHeadersReceived()

    def rawDataReceived(self, data: bytes) -> None:
        if self._refused:
            return
        super().rawDataReceived(data)

    def body_received(self, size: int) -> bool:
        """
        Count C{size} more bytes of the request's body; C{False} once they
        are past the limit, and the request is refused.
        """
        if self._refused:
            return False
        self._body_seen += size
        if self._body_seen > self._body_limit:
            self._refuse_body()
            return False
        return True

    def _refuse_body(self) -> None:
        on = " on GET and HEAD" if self._body_limit == MAX_GET_BODY else ""
        reason = f"request body too large: at most {self._body_limit} bytes{on}"
        self._refuse(413, b"Content Too Large", reason)

    def _refuse(self, code: int, phrase: bytes, reason: str) -> None:
        """
        Answer C{code} with a one-line reason, count it, and close the
        connection without reading any more of it.
        """
        if self._refused:
            return
        self._refused = True
        self._cancel_deadline()
        path = getattr(self, "_path", b"") or b""
        self.site.metrics.finished.count(route_of(path.partition(b"?")[0]), str(code), None)
        body = (reason + "\n").encode()
        assert self.transport is not None
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (code, phrase, len(body), body)
        )
        self.loseConnection()


class RefusedConnection(Protocol):
    """
    A connection past L{ConnectionLimits.max_connections}: closed at once.
    (A factory may return L{None} instead, but the TLS wrapper would wrap
    it.)
    """

    def connectionMade(self) -> None:
        assert self.transport is not None
        _reset(self.transport)


#: The most quick-answer log lines (but for time and duration) a site
#: keeps made; past it, they are made again from nothing.
MAX_QUICK_LINES = 1024


def _text(value: bytes | None) -> str:
    return "-" if not value else value.decode("latin-1")


class ProxySite(Site):
    """
    The site: counts every request in the metrics and writes the access log
    line once the response is done.  Its connections are L{ProxyChannel}s,
    within the L{ConnectionLimits} it shares with the process's other
    sites.
    """

    protocol = ProxyChannel  # type: ignore[assignment]
    requestFactory = ProxyRequest

    def __init__(
        self,
        resource: IResource,
        clock: IReactorTime,
        metrics: Metrics,
        connections: ConnectionLimits | None = None,
        writer: AccessLogWriter | None = None,
        counted: bool = True,
    ) -> None:
        """
        @param connections: the bounds on the connections, and the live
            settings the site reads (its log format and the proxies it
            trusts for C{X-Forwarded-For}).
        @param writer: where access log lines go, buffered (without one,
            or with C{access-log: log}, as twisted.logger events).
        @param counted: whether its requests are counted in the metrics and
            the access log (not those of a worker's own socket).
        """
        self.counted = counted
        self.writer = writer
        self._stamps = Stamps()
        self._dates = Dates()
        self._parses = Parses()
        #: The quick answers' access log lines but for time and duration,
        #: for the trusted proxies they were made with.
        self._quick_lines: dict[tuple[Any, ...], tuple[str, str]] = {}
        self._quick_lines_trusting: tuple[str, ...] = ()
        #: Whether warm pages may take the quick lane (L{txpypi.web.quick}),
        #: and how many answers it gave.
        self.quick_lane = True
        self.quick_answers = 0
        # The clock is the reactor of the channels' timeouts too.
        super().__init__(resource, reactor=clock)
        self._clock = clock
        self._metrics = metrics
        self.connections = ConnectionLimits() if connections is None else connections
        self.displayTracebacks = False

    @property
    def log_format(self) -> str:
        return self.connections.live.log_format

    @log_format.setter
    def log_format(self, value: str) -> None:
        self.connections.live.log_format = value

    @property
    def trusted_proxies(self) -> tuple[str, ...]:
        return self.connections.live.trusted_proxies

    @property
    def metrics(self) -> Metrics:
        return self._metrics

    def buildProtocol(self, addr: IAddress | None) -> Any:
        limits = self.connections
        if limits.open >= limits.max_connections:
            self._metrics.connections_refused.inc()
            if not limits.full_logged:
                limits.full_logged = True
                log.warn(
                    "refusing new connections: {open} are open, the most max-connections allows",
                    open=limits.open,
                )
            return RefusedConnection()
        channel: ProxyChannel = super().buildProtocol(addr)
        channel.timeOut = limits.send_timeout  # type: ignore[assignment]  # idle timeout between requests
        return channel

    def acceptableProtocols(self) -> list[bytes]:
        """
        Only HTTP/1.1 in TLS's ALPN: the channel is not an HTTP/2 one, even
        where the h2 package would let Twisted offer it.
        """
        return [b"http/1.1"]

    def getResourceFor(self, request: Request) -> IResource:  # type: ignore[override]
        request.txpypi_started = self._clock.seconds()  # type: ignore[attr-defined]
        resource: IResource = super().getResourceFor(request)
        return resource

    def log(self, request: Request) -> None:  # type: ignore[override]
        if not self.counted:
            return
        now = self._clock.seconds()
        duration = now - getattr(request, "txpypi_started", now)
        cache = request.responseHeaders.getRawHeaders(b"x-cache")
        state = cache[0].decode() if cache else ""
        self._count(request.path, request.code, duration, state, request.sentLength)
        if self.log_format == "none":
            return
        self._write(self._entry(request, now, duration, state))

    def _write(self, entry: Entry) -> None:
        self._write_line(json_line(entry) if self.log_format == "json" else combined(entry, self._stamps))

    def _write_line(self, line: str) -> None:
        if self.writer is None or self.connections.live.access_log == LOGGER:
            access_log.info("{access}", access=line)
        else:
            self.writer.write(line)

    def quick(self, channel: ProxyChannel, data: bytes) -> bool:
        """
        Answer C{data} in the quick lane (L{txpypi.web.quick}) if it is one
        quick request for a warm page; C{False} leaves it to the usual way.
        """
        if not self.quick_lane:
            return False
        asked = self._parses(data)
        if asked is None:
            return False
        started = self._clock.seconds()
        try:
            lane = getattr(self.resource, "quick", None)
            found = None if lane is None else lane(asked.kind, asked.group)
            answer = None if found is None else found.quick(asked, self._dates)
        except Exception:
            # Nothing is sent yet: the usual way answers (a 500, say).
            log.failure("the quick lane failed on {uri}; answering the usual way", uri=asked.uri)
            return False
        if answer is None:
            return False
        code, head, body = answer
        sent = body.size if isinstance(body, FileBody) else len(body)
        self.quick_answers += 1
        transport: Any = channel.transport
        send_now(transport, head, body)
        now = self._clock.seconds()
        try:
            self._quick_logged(channel, asked, code, sent, now, now - started)
        except Exception:
            log.failure("the quick lane could not count or log {uri}", uri=asked.uri)
        return True

    def _quick_logged(
        self, channel: ProxyChannel, asked: QuickRequest, code: int, sent: int, now: float, duration: float
    ) -> None:
        self._count(asked.uri, code, duration, "HIT", sent)
        if self.log_format == "combined":
            self._write_line(self._quick_line(channel, asked, code, sent, now, duration))
        elif self.log_format != "none":
            self._write(
                attrs.evolve(self._quick_entry(channel, asked, code, sent), duration=duration, time=now)
            )

    def _quick_entry(self, channel: ProxyChannel, asked: QuickRequest, code: int, sent: int) -> Entry:
        """
        A quick answer's access log line as values, but for its time and
        duration (zero).
        """
        forwarded = asked.header(b"x-forwarded-for")
        return Entry(
            client=client_address(
                channel.peer_host,
                None if forwarded is None else forwarded.decode("latin-1"),
                self.trusted_proxies,
            ),
            method=asked.method.decode("latin-1"),
            path=asked.uri.decode("latin-1"),
            protocol="HTTP/1.1",
            status=code,
            size=sent,
            duration=0.0,
            cache="HIT",
            referer=_text(asked.header(b"referer")),
            user_agent=_text(asked.header(b"user-agent")),
            time=0.0,
        )

    def _quick_line(
        self, channel: ProxyChannel, asked: QuickRequest, code: int, sent: int, now: float, duration: float
    ) -> str:
        """
        A quick answer's combined line: all but its time and duration made
        once for each kind of answer (client, request, status, size,
        referer, user agent), at most L{MAX_QUICK_LINES} kept.
        """
        headers = asked.headers
        trusted = self.trusted_proxies
        if trusted is not self._quick_lines_trusting:  # SIGHUP changed them
            self._quick_lines.clear()
            self._quick_lines_trusting = trusted
        key = (
            channel.peer_host,
            asked.method,
            asked.uri,
            code,
            sent,
            headers.get(b"x-forwarded-for"),
            headers.get(b"referer"),
            headers.get(b"user-agent"),
        )
        parts = self._quick_lines.get(key)
        if parts is None:
            parts = combined_parts(self._quick_entry(channel, asked, code, sent))
            if len(self._quick_lines) >= MAX_QUICK_LINES:
                self._quick_lines.clear()
            self._quick_lines[key] = parts
        return parts[0] + self._stamps(now) + parts[1] + f"{duration:.6f}"

    def _count(self, path: bytes, code: int, duration: float, state: str, sent: int) -> None:
        """
        Count a finished request in the metrics: its route and status, its
        latency, and for a cache answer (C{state}: its C{X-Cache}) the
        C{sent} bytes served.
        """
        self._metrics.finished.count(route_of(path), str(code), duration, state, sent)

    def _entry(self, request: Request, now: float, duration: float, state: str) -> Entry:
        """
        The access log's line of a finished request, as values.
        """
        peer = request.getClientAddress()
        return Entry(
            client=client_address(
                getattr(peer, "host", "-"),
                header(request, b"x-forwarded-for"),
                self.trusted_proxies,
            ),
            method=request.method.decode("latin-1"),
            path=request.uri.decode("latin-1"),
            protocol=request.clientproto.decode("latin-1"),
            status=request.code,
            size=request.sentLength,
            duration=duration,
            cache=state,
            referer=header(request, b"referer") or "-",
            user_agent=header(request, b"user-agent") or "-",
            time=now,
        )

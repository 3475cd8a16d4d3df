"""
Talking to the upstream index: one pooled HTTP client, page fetches through
treq, and streamed file fetches through a plain Agent, following redirects
hop by hop, so that the bytes arrive exactly as the upstream sent them.

It only ever fetches the index URLs it builds from its configured base, and
file URLs that one of those index pages listed, as far as the upstream's
L{txpypi.core.fetchpolicy.FetchPolicy} allows: every connection, redirects
included, goes through the endpoints of L{txpypi.fetch.guarded}.
"""

from __future__ import annotations

import io
import zlib
from typing import Any
from urllib.parse import quote, urljoin

import attrs
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectError, DNSLookupError, TimeoutError
from twisted.internet.interfaces import IDelayedCall, IHostnameResolver, IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.python.failure import Failure
from twisted.web.client import Agent, BrowserLikePolicyForHTTPS, RedirectAgent, ResponseDone, ResponseFailed
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IPolicyForHTTPS, IResponse

from txpypi import __version__
from txpypi.concurrency.turns import Turns
from txpypi.core.fetchpolicy import (
    MAX_REDIRECTS,
    FetchPolicy,
    FileHost,
    ListedFile,
    Origin,
    Permit,
    Refused,
    is_strong,
)
from txpypi.core.simple.media import UPSTREAM_ACCEPT
from txpypi.fetch.guarded import Dialer, HopEndpoints, PageEndpoints, RefusalLog, TaggedPool

USER_AGENT = f"txpypi/{__version__}".encode()
#: Answers that redirect a GET.
REDIRECTS = frozenset({301, 302, 303, 307, 308})

#: The most bytes an index page body may have (once decompressed): past
#: it the fetch fails with a 502, so that neither a gzip bomb nor an
#: endless body can exhaust memory.  PyPI's root page, the biggest there
#: is, has some 40 MB of JSON.
MAX_PAGE_BYTES = 128 * 1024 * 1024


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


def _slash(url: str) -> str:
    return url if url.endswith("/") else url + "/"


@attrs.frozen
class Upstream:
    """
    A configured upstream simple index.
    """

    name: str
    url: str = attrs.field(converter=_slash)
    #: C{file-hosts}: with it, the only other hosts its files may come from.
    file_hosts: tuple[FileHost, ...] | None = None

    def policy(self) -> FetchPolicy:
        """
        What this upstream's files may be fetched from.
        """
        return FetchPolicy.for_upstream(self.url, self.file_hosts)

    def list_url(self) -> str:
        return self.url

    def project_url(self, project: str) -> str:
        return f"{self.url}{quote(project)}/"


@attrs.frozen
class FetchedPage:
    url: str
    body: bytes
    content_type: str
    etag: str | None
    last_modified: str | None
    #: The upstream answered 304 to our validators: there is no body.
    not_modified: bool = False


def _classify(failure_value: BaseException, url: str) -> UpstreamError:
    if isinstance(failure_value, Refused):
        return UpstreamError(502, str(failure_value))
    if isinstance(failure_value, (CancelledError, TimeoutError)):
        return UpstreamError(504, f"upstream timed out: {url}")
    if isinstance(failure_value, (ConnectError, DNSLookupError)):
        return UpstreamError(502, f"upstream unreachable: {url}: {failure_value.__class__.__name__}")
    if isinstance(failure_value, ResponseFailed):
        return UpstreamError(502, f"upstream connection failed: {url}")
    return UpstreamError(502, f"upstream error: {url}: {failure_value!r}")


@attrs.define
class UpstreamClient:
    """
    HTTP access to upstreams, sharing one persistent connection pool.
    """

    _reactor: Any
    connect_timeout: float = 10.0
    response_timeout: float = 30.0
    read_timeout: float = 60.0
    #: The slowest an upstream body may come, in bytes per second over each
    #: C{read_timeout} (0: no minimum).
    min_rate: float = 0.0
    _agent: IAgent | None = None
    metrics: Any = None
    #: When the upstream last answered as expected, and last failed (with why).
    last_success: float | None = None
    last_error: tuple[float, str] | None = None
    #: The configured upstreams: pages come from their origins (or over
    #: https from a public host), files as their policies allow.
    upstreams: tuple[Upstream, ...] = ()
    #: Whom TLS trusts (the system's CAs; a test may trust its own).
    tls: IPolicyForHTTPS = attrs.field(factory=BrowserLikePolicyForHTTPS)
    #: How host names are resolved (the reactor's resolver when L{None}).
    resolver: IHostnameResolver | None = None
    #: Remembers which refused URLs were logged.
    refusals: RefusalLog = attrs.field(factory=RefusalLog)
    _pool: TaggedPool = attrs.field(init=False)
    _pages: IAgent = attrs.field(init=False)
    _dialer: Dialer = attrs.field(init=False)
    _policies: dict[str, FetchPolicy] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._pool = TaggedPool(self._reactor, persistent=True)
        self._pool.maxPersistentPerHost = 16
        self._policies = {upstream.url: upstream.policy() for upstream in self.upstreams}
        self._dialer = Dialer(self._reactor, self.resolver, self.tls, self.connect_timeout, self.refusals)
        agent = self._agent
        if agent is None:
            # Every page connection, treq's redirects included, is made
            # through these endpoints, which apply the page rule.
            pages = PageEndpoints.of(self._dialer, (policy.origin for policy in self._policies.values()))
            agent = Agent.usingEndpointFactory(self._reactor, pages, pool=self._pool)
        # Redirects of pages are followed by Twisted's agent (no content
        # decoding: gzip is inflated, and bounded, by _Collect).
        self._pages = RedirectAgent(agent, redirectLimit=MAX_REDIRECTS)

    def _policy_for(self, upstream: str) -> FetchPolicy:
        policy = self._policies.get(upstream)
        return policy if policy is not None else FetchPolicy.for_upstream(upstream)

    def _file_agent(self, permit: Permit, upstream: Origin | None) -> IAgent:
        """
        An agent for one hop of a file fetch: it connects only as C{permit}
        allows (the pool is shared).
        """
        if self._agent is not None:
            return self._agent
        endpoints = HopEndpoints(self._dialer, permit, upstream)
        agent: IAgent = Agent.usingEndpointFactory(self._reactor, endpoints, pool=self._pool)
        return agent

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

    def _outcome(self, kind: str, outcome: str, started: float, reason: str | None = None) -> None:
        now: float = self._reactor.seconds()
        if kind == "peer":
            pass  # another instance, not the upstream
        elif reason is None:
            self.last_success = now
        else:
            self.last_error = (now, reason)
        if self.metrics is not None:
            self.metrics.upstream.labels(kind, outcome).inc()
            self.metrics.upstream_latency.labels(kind).observe(now - started)

    def close(self) -> Deferred[None]:
        d: Deferred[None] = self._pool.closeCachedConnections()
        return d

    async def fetch_page(
        self,
        url: str,
        etag: str | None = None,
        last_modified: str | None = None,
        limit: int | None = None,
    ) -> FetchedPage:
        """
        GET an index page, asking for JSON first, gzip-compressed; with the
        validators of a copy we hold, as a conditional GET.  The body is
        decompressed as it arrives, and must end as its framing says
        (C{Content-Length} or chunked): one that only ends because the
        upstream closed the connection cannot be told from a cut one.

        @param limit: the most bytes the body may have, decompressed
            (default L{MAX_PAGE_BYTES}).
        @raise UpstreamNotFound: on 404 (or 410).
        @raise UpstreamError: on anything else that is not a 200, on a body
            without a length, too big, cut, or not valid gzip.
        """
        headers = Headers(
            {
                b"Accept": [UPSTREAM_ACCEPT.encode()],
                b"Accept-Encoding": [b"gzip"],
                b"User-Agent": [USER_AGENT],
            }
        )
        if etag is not None:
            headers.setRawHeaders(b"If-None-Match", [etag.encode("latin-1")])
        if last_modified is not None:
            headers.setRawHeaders(b"If-Modified-Since", [last_modified.encode("latin-1")])
        started: float = self._reactor.seconds()
        try:
            d = self._pages.request(b"GET", url.encode(), headers)
            timer = self._reactor.callLater(self.response_timeout, d.cancel)
            try:
                response: IResponse = await d
            finally:
                if timer.active():
                    timer.cancel()
            if response.code == 200:
                encoding = (
                    b",".join(response.headers.getRawHeaders(b"content-encoding") or []).strip().lower()
                )
                if encoding not in (b"", b"identity", b"gzip", b"x-gzip"):
                    response.deliverBody(_Discard())
                    name = encoding.decode("latin-1")
                    raise UpstreamError(502, f"upstream sent {url} in an unknown encoding: {name}")
                collector = _Collect(
                    self._reactor,
                    self.read_timeout,
                    gzipped=encoding in (b"gzip", b"x-gzip"),
                    limit=MAX_PAGE_BYTES if limit is None else limit,
                    min_rate=self.min_rate,
                )
                response.deliverBody(collector)
                body = await collector.done
            else:
                response.deliverBody(_Discard())
        except UpstreamError as e:
            self._outcome("page", "error", started, e.reason)
            raise
        except Exception as e:
            error = _page_error(e, url)
            self._outcome("page", "timeout" if error.status == 504 else "error", started, error.reason)
            raise error from e
        if response.code in (404, 410):
            self._outcome("page", "not_found", started)
            raise UpstreamNotFound(url)
        if response.code == 304 and (etag is not None or last_modified is not None):
            self._outcome("page", "not_modified", started)
            return FetchedPage(url, b"", "", etag, last_modified, not_modified=True)
        if response.code != 200:
            reason = f"upstream answered {response.code} for {url}"
            self._outcome("page", "error", started, reason)
            raise UpstreamError(502, reason)
        self._outcome("page", "ok", started)
        h = response.headers
        return FetchedPage(
            url=str(response.request.absoluteURI.decode()),
            body=body,
            content_type=(h.getRawHeaders("content-type") or ["text/html"])[0],
            etag=(h.getRawHeaders("etag") or [None])[0],
            last_modified=(h.getRawHeaders("last-modified") or [None])[0],
        )

    async def open_file(
        self, target: ListedFile | str, extra: dict[bytes, bytes] | None = None, kind: str = "file"
    ) -> IResponse:
        """
        GET a file and return the response once its headers arrived; the
        caller reads the body with C{deliverBody}.

        Redirects are followed (at most L{MAX_REDIRECTS}), each hop only as
        the upstream's policy allows (L{FetchPolicy.file_hop}), and C{extra}
        headers go only to the listed URL's origin.  A peer is exempt from
        the policy, and never redirects.

        @param target: the file as an upstream's index listed it (a
            L{txpypi.fetch.wanted.Wanted}), or, for a peer, its URL.
        @param extra: more request headers.
        @param kind: C{"file"}, or C{"peer"} for a download in progress on
            another instance (counted apart, and not the upstream's health).
        @raise UpstreamNotFound: on 404 (or 410).
        @raise UpstreamError: on a failure or any other status than 200;
            502 when the policy refuses the URL or a redirect.
        """
        if isinstance(target, str):
            if kind != "peer":
                raise TypeError("open_file takes the file an index listed; a bare URL only for a peer")
            url, policy, strong = target, None, False
        else:
            url, policy = target.url, self._policy_for(target.upstream)
            strong = is_strong(target.expected_hash)
        started: float = self._reactor.seconds()
        d = Deferred.fromCoroutine(self._follow(url, policy, strong, extra or {}))
        timer = self._reactor.callLater(self.response_timeout, d.cancel)
        try:
            response: IResponse = await d
        except Refused as e:
            self.refusals.note(e)
            if self.metrics is not None:
                self.metrics.upstream.labels(kind, "refused").inc()
            raise UpstreamError(502, str(e)) from e
        except UpstreamError as e:
            self._outcome(kind, "error", started, e.reason)
            raise
        except Exception as e:
            error = _classify(e, url)
            self._outcome(kind, "timeout" if error.status == 504 else "error", started, error.reason)
            raise error from e
        finally:
            if timer.active():
                timer.cancel()
        if response.code in (404, 410):
            self._outcome(kind, "not_found", started)
            response.deliverBody(_Discard())
            raise UpstreamNotFound(url)
        if response.code != 200:
            reason = f"upstream answered {response.code} for {url}"
            self._outcome(kind, "error", started, reason)
            response.deliverBody(_Discard())
            raise UpstreamError(502, reason)
        self._outcome(kind, "ok", started)
        return response

    async def _follow(
        self, url: str, policy: FetchPolicy | None, strong: bool, extra: dict[bytes, bytes]
    ) -> IResponse:
        """
        GET C{url}, following redirects as C{policy} allows (none without
        one: a peer).

        @raise Refused: when the policy refuses a hop.
        """
        first = url
        first_origin: Origin | None = None
        came_from: Origin | None = None
        for _ in range(MAX_REDIRECTS + 1):
            if policy is None:
                try:
                    permit = Permit(Origin.of(url), checked=False)
                except ValueError as e:
                    raise Refused(url, str(e)) from None
            else:
                permit = policy.file_hop(url, strong, came_from)
            first_origin = first_origin or permit.origin
            headers = Headers({b"User-Agent": [USER_AGENT], b"Accept-Encoding": [b"identity"]})
            if permit.origin == first_origin:  # the proxy's own headers never go elsewhere
                for name, value in extra.items():
                    headers.setRawHeaders(name, [value])
            agent = self._file_agent(permit, None if policy is None else policy.origin)
            response: IResponse = await agent.request(b"GET", url.encode(), headers)
            if policy is None or response.code not in REDIRECTS:
                return response
            location = response.headers.getRawHeaders(b"location")
            response.deliverBody(_Discard())
            if not location:
                raise UpstreamError(502, f"upstream redirected {url} without a Location")
            came_from = permit.origin
            url = urljoin(url, location[0].decode("latin-1"))
        raise UpstreamError(502, f"upstream redirected {first} more than {MAX_REDIRECTS} times")


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


def _page_error(failure_value: BaseException, url: str) -> UpstreamError:
    if isinstance(failure_value, PageTooLarge):
        return UpstreamError(502, f"upstream page {url} is larger than {failure_value} bytes")
    if isinstance(failure_value, Unframed):
        return UpstreamError(
            502, f"upstream page {url} had no length and ended when the connection closed (maybe cut)"
        )
    if isinstance(failure_value, BadGzip):
        return UpstreamError(502, f"upstream page {url} is not valid gzip: {failure_value}")
    return _classify(failure_value, url)


class _Collect(Protocol):
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


class Limiter(Turns):
    """
    At most C{limit} upstream page requests at a time; the others wait
    their turn (see L{Turns}), then fail with a 504.
    """

    def __init__(self, clock: IReactorTime, limit: int) -> None:
        super().__init__(clock, limit, _waited_too_long)


def _waited_too_long(timeout: float, running: int) -> Exception:
    return UpstreamError(
        504, f"waited {timeout:g} s for one of the {running} upstream requests in progress to end"
    )


class _Discard:
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

"""
Talking to the upstream index: one pooled HTTP client, page fetches through
Twisted's redirecting agent, and streamed file fetches through a plain
Agent, following redirects hop by hop, so that the bytes arrive exactly as
the upstream sent them.

L{UpstreamClient} puts the parts together: L{txpypi.fetch.pagefetch} (pages),
L{txpypi.fetch.fileopen} (files), on the one pool of L{txpypi.fetch.agents},
their outcomes recorded by one L{txpypi.fetch.exchange.Health}.

It only ever fetches the index URLs it builds from its configured base, and
file URLs that one of those index pages listed, as far as the upstream's
L{txpypi.core.fetchpolicy.FetchPolicy} allows: every connection, redirects
included, goes through the endpoints of L{txpypi.fetch.guarded}.
"""

from __future__ import annotations

from urllib.parse import quote

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHostnameResolver, IReactorTime
from twisted.web.client import BrowserLikePolicyForHTTPS
from twisted.web.iweb import IAgent, IPolicyForHTTPS, IResponse

from txpypi.concurrency.turns import Turns
from txpypi.core.counting import UpstreamCounts
from txpypi.core.fetchpolicy import FetchPolicy, FileHost, ListedFile
from txpypi.core.live import Live
from txpypi.fetch.agents import Agents
from txpypi.fetch.exchange import (
    USER_AGENT,
    Credentials,
    Health,
    Timeouts,
    UpstreamError,
    UpstreamNotFound,
)
from txpypi.fetch.fileopen import REDIRECTS, FileOpener
from txpypi.fetch.guarded import IConnectingReactor, RefusalLog
from txpypi.fetch.pagebody import MAX_PAGE_BYTES
from txpypi.fetch.pagefetch import FetchedPage, PageFetcher

__all__ = [
    "MAX_PAGE_BYTES",
    "REDIRECTS",
    "USER_AGENT",
    "FetchedPage",
    "Limiter",
    "Upstream",
    "UpstreamClient",
    "UpstreamError",
    "UpstreamNotFound",
]


def _slash(url: str) -> str:
    return url if url.endswith("/") else url + "/"


def _header_value(instance: Upstream, attribute: attrs.Attribute[str | None], value: str | None) -> None:
    """
    An C{authorization} must be one header line (the message never shows it).
    """
    if value is None:
        return
    try:
        value.encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError(f"upstream {instance.name}: the authorization is not latin-1") from None
    if any(c in value for c in "\r\n\0") or not value.strip():
        raise ValueError(f"upstream {instance.name}: the authorization is not one header line")


@attrs.frozen
class Upstream:
    """
    A configured upstream simple index.
    """

    name: str
    url: str = attrs.field(converter=_slash)
    #: C{file-hosts}: with it, the only other hosts its files may come from.
    file_hosts: tuple[FileHost, ...] | None = None
    #: The C{Authorization} header value its own origin gets (basic auth or
    #: a bearer token), on pages and files; never shown.
    authorization: str | None = attrs.field(default=None, repr=False, validator=_header_value)

    def credentials(self) -> Credentials | None:
        """
        What its own origin is sent, if anything.
        """
        return None if self.authorization is None else Credentials.of(self.url, self.authorization)

    def policy(self) -> FetchPolicy:
        """
        What this upstream's files may be fetched from.
        """
        return FetchPolicy.for_upstream(self.url, self.file_hosts)

    def list_url(self) -> str:
        return self.url

    def project_url(self, project: str) -> str:
        return f"{self.url}{quote(project)}/"


class UpstreamClient:
    """
    HTTP access to upstreams, sharing one persistent connection pool: the
    page side and the file side, and the state C{/health} reads.
    """

    def __init__(
        self,
        reactor: IConnectingReactor,
        *,
        connect_timeout: float = 10.0,
        response_timeout: float = 30.0,
        read_timeout: float = 60.0,
        min_rate: float = 0.0,
        agent: IAgent | None = None,
        metrics: UpstreamCounts | None = None,
        upstreams: tuple[Upstream, ...] = (),
        tls: IPolicyForHTTPS | None = None,
        resolver: IHostnameResolver | None = None,
        refusals: RefusalLog | None = None,
        live: Live | None = None,
    ) -> None:
        """
        @param live: the live settings whose timeouts and minimum rate it
            reads (the proxy's, shared with its other parts); without one,
            C{response_timeout}, C{read_timeout} and C{min_rate} make one of
            its own.
        @param min_rate: the slowest an upstream body may come, in bytes per
            second over each C{read_timeout} (0: no minimum).
        @param agent: the one agent every request goes to (a test's).
        @param metrics: the proxy's metrics, or L{None}.
        @param upstreams: the configured upstreams: pages come from their
            origins (or over https from a public host), files as their
            policies allow; each one's C{authorization} goes to its own
            origin only.  The first one names the client in the metrics
            (C{upstream} when there is none).
        @param tls: whom TLS trusts (the system's CAs; a test may trust
            its own).
        @param resolver: how host names are resolved (the reactor's
            resolver when L{None}).
        @param refusals: remembers which refused URLs were logged.
        """
        self.upstreams = upstreams
        self._agent = agent  # a test's, which it may reach for again
        if live is None:
            live = Live(
                response_timeout=response_timeout, read_timeout=read_timeout, min_download_rate=min_rate
            )
        self._timeouts = Timeouts(live)
        self._health = Health(reactor, metrics, name=upstreams[0].name if upstreams else "upstream")
        refusals = RefusalLog() if refusals is None else refusals
        policies = {upstream.url: upstream.policy() for upstream in upstreams}
        credentials = {
            upstream.url: each for upstream in upstreams if (each := upstream.credentials()) is not None
        }
        self._agents = Agents.dialing(
            reactor,
            resolver,
            BrowserLikePolicyForHTTPS() if tls is None else tls,
            connect_timeout,
            refusals,
            (policy.origin for policy in policies.values()),
            agent,
        )
        self._pages = PageFetcher(reactor, self._agents.pages, self._timeouts, self._health, credentials)
        self._files = FileOpener(
            reactor, self._agents, self._timeouts, self._health, refusals, policies, credentials
        )

    # The live settings (a SIGHUP changes them) and the state /health reads.

    @property
    def response_timeout(self) -> float:
        return self._timeouts.response

    @response_timeout.setter
    def response_timeout(self, seconds: float) -> None:
        self._timeouts.live.response_timeout = seconds

    @property
    def read_timeout(self) -> float:
        return self._timeouts.read

    @read_timeout.setter
    def read_timeout(self, seconds: float) -> None:
        self._timeouts.live.read_timeout = seconds

    @property
    def min_rate(self) -> float:
        return self._timeouts.min_rate

    @min_rate.setter
    def min_rate(self, rate: float) -> None:
        self._timeouts.live.min_download_rate = rate

    @property
    def last_success(self) -> float | None:
        return self._health.last_success

    @property
    def last_error(self) -> tuple[float, str] | None:
        return self._health.last_error

    def state(self) -> str:
        """
        C{unknown} before any exchange, C{degraded} when the last one failed,
        else C{ok}.
        """
        return self._health.state()

    def close(self) -> Deferred[None]:
        return self._agents.close()

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
        return await self._pages.fetch(url, etag, last_modified, MAX_PAGE_BYTES if limit is None else limit)

    async def open_file(
        self, target: ListedFile | str, extra: dict[bytes, bytes] | None = None, kind: str = "file"
    ) -> IResponse:
        """
        GET a file and return the response once its headers arrived; the
        caller reads the body with C{deliverBody}.

        Redirects are followed (at most L{MAX_REDIRECTS}), each hop only as
        the upstream's policy allows (L{FetchPolicy.file_hop}), C{extra}
        headers go only to the listed URL's origin, and the upstream's
        C{authorization} only to the upstream's own origin.  A peer is exempt
        from the policy, never redirects, and gets no credentials.

        @param target: the file as an upstream's index listed it (a
            L{txpypi.fetch.wanted.Wanted}), or, for a peer, its URL.
        @param extra: more request headers.
        @param kind: C{"file"}, or C{"peer"} for a download in progress on
            another instance (counted apart, and not the upstream's health).
        @raise UpstreamNotFound: on 404 (or 410).
        @raise UpstreamError: on a failure or any other status than 200;
            502 when the policy refuses the URL or a redirect.
        """
        return await self._files.open(target, extra or {}, kind)


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

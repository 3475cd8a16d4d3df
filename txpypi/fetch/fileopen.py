"""
Opening a file on the upstream: a plain GET (the bytes exactly as sent),
redirects followed hop by hop as the upstream's fetch policy allows, under
the response timeout; the caller reads the body.
"""

from __future__ import annotations

from urllib.parse import urljoin

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.web.http_headers import Headers
from twisted.web.iweb import IResponse

from txpypi.core.fetchpolicy import MAX_REDIRECTS, FetchPolicy, ListedFile, Origin, Permit, Refused, is_strong
from txpypi.fetch.agents import Agents
from txpypi.fetch.exchange import (
    USER_AGENT,
    Credentials,
    Discard,
    Health,
    Timeouts,
    UpstreamError,
    UpstreamNotFound,
    answered_within,
    classify,
    outcome_of,
)
from txpypi.fetch.guarded import RefusalLog

#: Answers that redirect a GET.
REDIRECTS = frozenset({301, 302, 303, 307, 308})


def hop_headers(
    permit: Permit, first: Origin, extra: dict[bytes, bytes], credentials: Credentials | None = None
) -> Headers:
    """
    The headers of one hop: C{extra} only to the listed URL's origin, the
    upstream's C{credentials} only to the upstream's own origin (which may
    be neither the listed URL's nor the one before).
    """
    headers = Headers({b"User-Agent": [USER_AGENT], b"Accept-Encoding": [b"identity"]})
    if permit.origin == first:  # the proxy's own headers never go elsewhere
        for name, value in extra.items():
            headers.setRawHeaders(name, [value])
    if credentials is not None:
        credentials.add_to(headers, permit.origin)
    return headers


def peer_permit(url: str) -> Permit:
    """
    A peer's URL is exempt from the policy.

    @raise Refused: when it is not a plain http or https one.
    """
    try:
        return Permit(Origin.of(url), checked=False)
    except ValueError as e:
        raise Refused(url, str(e)) from None


@attrs.define
class FileOpener:
    """
    GETs files, each hop through an agent that connects only as the
    upstream's policy allows.
    """

    _clock: IReactorTime
    _agents: Agents
    _timeouts: Timeouts
    _health: Health
    _refusals: RefusalLog
    #: The policy of each configured upstream, by its URL.
    _policies: dict[str, FetchPolicy]
    #: The credentials of the upstreams that have some, by upstream URL.
    _credentials: dict[str, Credentials] = attrs.Factory(dict)

    async def open(self, target: ListedFile | str, extra: dict[bytes, bytes], kind: str) -> IResponse:
        """
        See L{txpypi.fetch.upstream.UpstreamClient.open_file}.
        """
        url, policy, strong = self._target(target, kind)
        credentials = None  # a peer never gets the upstream's
        if not isinstance(target, str) and kind != "peer":
            credentials = self._credentials.get(target.upstream)
        started = self._health.now()
        response = await self._answered(url, policy, strong, extra, credentials, kind, started)
        if response.code in (404, 410):
            self._health.record(kind, "not_found", started)
            response.deliverBody(Discard())
            raise UpstreamNotFound(url)
        if response.code != 200:
            reason = f"upstream answered {response.code} for {url}"
            self._health.record(kind, "error", started, reason)
            response.deliverBody(Discard())
            raise UpstreamError(502, reason)
        self._health.record(kind, "ok", started)
        return response

    def _target(self, target: ListedFile | str, kind: str) -> tuple[str, FetchPolicy | None, bool]:
        """
        The URL to GET, the policy its hops go by (none for a peer), and
        whether its hash is strong enough for any host.
        """
        if isinstance(target, str):
            if kind != "peer":
                raise TypeError("open_file takes the file an index listed; a bare URL only for a peer")
            return target, None, False
        policy = self._policies.get(target.upstream)
        if policy is None:
            policy = FetchPolicy.for_upstream(target.upstream)
        return target.url, policy, is_strong(target.expected_hash)

    async def _answered(
        self,
        url: str,
        policy: FetchPolicy | None,
        strong: bool,
        extra: dict[bytes, bytes],
        credentials: Credentials | None,
        kind: str,
        started: float,
    ) -> IResponse:
        """
        The last hop's response, under the response timeout; a failure
        recorded and raised as an L{UpstreamError}.
        """
        d = Deferred.fromCoroutine(self._follow(url, policy, strong, extra, credentials))
        try:
            return await answered_within(self._clock, self._timeouts.response, d)
        except Refused as e:
            self._refusals.note(e)
            self._health.refused(kind)
            raise UpstreamError(502, str(e)) from e
        except UpstreamError as e:
            self._health.record(kind, "error", started, e.reason)
            raise
        except Exception as e:
            error = classify(e, url)
            self._health.record(kind, outcome_of(error), started, error.reason)
            raise error from e

    async def _follow(
        self,
        url: str,
        policy: FetchPolicy | None,
        strong: bool,
        extra: dict[bytes, bytes],
        credentials: Credentials | None,
    ) -> IResponse:
        """
        GET C{url}, following redirects as C{policy} allows (none without
        one: a peer), with C{credentials} on each hop to the upstream's own
        origin.

        @raise Refused: when the policy refuses a hop.
        """
        first = url
        first_origin: Origin | None = None
        came_from: Origin | None = None
        for _ in range(MAX_REDIRECTS + 1):
            permit = peer_permit(url) if policy is None else policy.file_hop(url, strong, came_from)
            first_origin = first_origin or permit.origin
            agent = self._agents.hop(permit, None if policy is None else policy.origin)
            headers = hop_headers(permit, first_origin, extra, credentials)
            response: IResponse = await agent.request(b"GET", url.encode(), headers)
            if policy is None or response.code not in REDIRECTS:
                return response
            location = response.headers.getRawHeaders(b"location")
            response.deliverBody(Discard())
            if not location:
                raise UpstreamError(502, f"upstream redirected {url} without a Location")
            came_from = permit.origin
            url = urljoin(url, location[0].decode("latin-1"))
        raise UpstreamError(502, f"upstream redirected {first} more than {MAX_REDIRECTS} times")

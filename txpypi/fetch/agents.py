"""
The one connection pool of the upstream client, and the agents page and
file fetches use through it: every connection they make goes through the
endpoints of L{txpypi.fetch.guarded}.
"""

from __future__ import annotations

from collections.abc import Iterable

from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHostnameResolver
from twisted.web.client import Agent, RedirectAgent
from twisted.web.iweb import IAgent, IPolicyForHTTPS

from txpypi.core.fetchpolicy import MAX_REDIRECTS, Origin, Permit
from txpypi.fetch.guarded import (
    Dialer,
    HopEndpoints,
    IConnectingReactor,
    PageEndpoints,
    RefusalLog,
    TaggedPool,
)


class Agents:
    """
    The pool, the dialer, and the agents made on them.  A test may inject
    the one agent every request goes to instead.
    """

    def __init__(
        self,
        reactor: IConnectingReactor,
        dialer: Dialer,
        origins: Iterable[Origin],
        agent: IAgent | None = None,
    ) -> None:
        self._reactor = reactor
        self._dialer = dialer
        self._injected = agent
        self._pool = TaggedPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = 16
        if agent is None:
            # Every page connection, redirects included, is made through
            # these endpoints, which apply the page rule.
            pages = PageEndpoints.of(dialer, origins)
            agent = Agent.usingEndpointFactory(reactor, pages, pool=self._pool)
        # Redirects of pages are followed by Twisted's agent (no content
        # decoding: gzip is inflated, and bounded, by PageBody).
        self.pages: IAgent = RedirectAgent(agent, redirectLimit=MAX_REDIRECTS)

    @classmethod
    def dialing(
        cls,
        reactor: IConnectingReactor,
        resolver: IHostnameResolver | None,
        tls: IPolicyForHTTPS,
        connect_timeout: float,
        refusals: RefusalLog,
        origins: Iterable[Origin],
        agent: IAgent | None = None,
    ) -> Agents:
        """
        The agents of a new L{Dialer}.
        """
        dialer = Dialer(reactor, resolver, tls, connect_timeout, refusals)
        return cls(reactor, dialer, origins, agent)

    def hop(self, permit: Permit, upstream: Origin | None) -> IAgent:
        """
        An agent for one hop of a file fetch: it connects only as C{permit}
        allows (the pool is shared).
        """
        if self._injected is not None:
            return self._injected
        endpoints = HopEndpoints(self._dialer, permit, upstream)
        agent: IAgent = Agent.usingEndpointFactory(self._reactor, endpoints, pool=self._pool)
        return agent

    def close(self) -> Deferred[None]:
        """
        Close the pooled connections.
        """
        d: Deferred[None] = self._pool.closeCachedConnections()
        return d

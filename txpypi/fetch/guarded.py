"""
Guarded connections: the endpoints through which every upstream connection
is made, so that L{txpypi.core.fetchpolicy}'s rule holds at connect time, for
redirects too.  A checked host name is resolved here, its addresses are
checked, and the connection goes to a checked address (TLS still verifies
the certificate against the host name, SNI included): DNS cannot slip a
private address past the check.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Iterable, Sequence
from typing import Any

import attrs
from twisted.internet.address import IPv4Address as TwistedIPv4Address
from twisted.internet.address import IPv6Address as TwistedIPv6Address
from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.endpoints import HostnameEndpoint, wrapClientTLS
from twisted.internet.error import DNSLookupError
from twisted.internet.interfaces import (
    IAddress,
    IHostnameResolver,
    IHostResolution,
    IProtocol,
    IProtocolFactory,
    IReactorPluggableNameResolver,
    IReactorTCP,
    IReactorTime,
    IResolutionReceiver,
    IStreamClientEndpoint,
)
from twisted.logger import Logger
from twisted.web.client import URI, HTTPConnectionPool
from twisted.web.iweb import IAgentEndpointFactory, IPolicyForHTTPS
from zope.interface import implementer

from txpypi.core.fetchpolicy import (
    IPAddress,
    Origin,
    Permit,
    Refused,
    check_addresses,
    ip_literal,
    on_internal_network,
    page_hop,
)

log = Logger(namespace="txpypi.guarded")

#: How many refused URLs are remembered so that each is logged once.
MAX_LOGGED_REFUSALS = 1000


class IConnectingReactor(IReactorTCP, IReactorTime, IReactorPluggableNameResolver):
    """
    What L{HostnameEndpoint} needs of its reactor (its docstring says so;
    its annotation says C{Any}): TCP connections, time, a name resolver.
    The pool and the agents need no more.

    A type for annotations: reactors provide its parts, not it, so the one
    place that picks the global reactor casts it.
    """


@attrs.define
class RefusalLog:
    """
    Logs each refused URL once (remembering the last L{MAX_LOGGED_REFUSALS}).
    """

    limit: int = MAX_LOGGED_REFUSALS
    _logged: OrderedDict[str, None] = attrs.field(factory=OrderedDict)

    def note(self, refused: Refused) -> None:
        if refused.url in self._logged:
            self._logged.move_to_end(refused.url)
            return
        self._logged[refused.url] = None
        if len(self._logged) > self.limit:
            self._logged.popitem(last=False)
        log.warn("refused to fetch {url}: {rule}", url=refused.url, rule=refused.rule)


class TaggedPool(HTTPConnectionPool):
    """
    A connection pool that keeps connections made under different address
    rules apart (an endpoint's C{pool_tag}): a connection opened without a
    check, to the upstream or a peer, is never reused for a host that has
    to be checked.
    """

    def getConnection(self, key: Hashable, endpoint: IStreamClientEndpoint) -> Deferred[Any]:
        tagged = (key, getattr(endpoint, "pool_tag", None))
        d: Deferred[Any] = super().getConnection(tagged, endpoint)
        return d


def uri_origin(uri: URI) -> Origin:
    """
    The origin Twisted will connect to for C{uri}.

    @raise ValueError: when it is not a plain http or https one.
    """
    return Origin.make(uri.scheme.decode("ascii"), uri.host.decode("ascii"), uri.port)


@implementer(IResolutionReceiver)
class _Addresses:
    """
    Collects a resolution's addresses into C{done}.
    """

    def __init__(self, host: str) -> None:
        self.host = host
        self.done: Deferred[list[IPAddress]] = Deferred()
        self._found: list[IPAddress] = []

    def resolutionBegan(self, resolutionInProgress: IHostResolution) -> None:
        pass

    def addressResolved(self, address: IAddress) -> None:
        found = ip_literal(str(getattr(address, "host", "")))
        if found is not None:
            self._found.append(found)

    def resolutionComplete(self) -> None:
        if self.done.called:
            return  # cancelled meanwhile
        if self._found:
            self.done.callback(self._found)
        else:
            self.done.errback(DNSLookupError(f"no address for {self.host}"))


@attrs.frozen
class Dialer:
    """
    How the upstream client connects: the reactor, the name resolver (the
    reactor's when L{None}), the TLS trust and the connect timeout.
    """

    _reactor: IConnectingReactor
    _resolver: IHostnameResolver | None
    _tls: IPolicyForHTTPS
    _timeout: float
    refusals: RefusalLog

    def addresses(self, host: str) -> Deferred[list[IPAddress]]:
        """
        The addresses of C{host} (itself, if it is an IP address).
        """
        literal = ip_literal(host)
        if literal is not None:
            return succeed([literal])
        resolver = self._resolver if self._resolver is not None else self._reactor.nameResolver
        receiver = _Addresses(host)
        resolver.resolveHostName(receiver, host, 0)
        return receiver.done

    def endpoint(self, uri: URI, permit: Permit, upstream: Origin | None) -> IStreamClientEndpoint:
        """
        The endpoint for C{uri} under C{permit}: refusing, unless C{uri}'s
        origin is the one C{permit} allows.

        @param upstream: the upstream whose network a checked host may share.
        """
        url = uri.toBytes().decode("ascii", "replace")
        try:
            origin = uri_origin(uri)
        except ValueError as e:
            return self.refusing(Refused(url, str(e)))
        if origin != permit.origin:
            return self.refusing(Refused(url, f"not the origin that was checked ({permit.origin})"))
        if not permit.checked:
            literal = ip_literal(origin.host)
            if literal is not None:
                # No name to resolve: Twisted would still ask getaddrinfo,
                # in a thread, before every new connection.
                return _Tagged(self.at([literal], origin), "direct")
            endpoint: IStreamClientEndpoint = HostnameEndpoint(
                self._reactor, origin.host, origin.port, timeout=self._timeout
            )
            return _Tagged(self._secured(origin, endpoint), "direct")
        return GuardedEndpoint(self, url, permit, upstream)

    def at(self, addresses: list[IPAddress], origin: Origin) -> IStreamClientEndpoint:
        """
        An endpoint to C{origin}'s host at the checked C{addresses} only:
        L{HostnameEndpoint} (which tries them the "happy eyeballs" way)
        with a resolver that answers those addresses and nothing else.
        """
        reactor = _CheckedAddresses(self._reactor, _Answer(addresses))
        endpoint = HostnameEndpoint(reactor, origin.host, origin.port, timeout=self._timeout)
        return self._secured(origin, endpoint)

    def _secured(self, origin: Origin, endpoint: IStreamClientEndpoint) -> IStreamClientEndpoint:
        if origin.scheme != "https":
            return endpoint
        creator = self._tls.creatorForNetloc(origin.host.encode("ascii"), origin.port)
        return wrapClientTLS(creator, endpoint)

    def refusing(self, refused: Refused) -> IStreamClientEndpoint:
        self.refusals.note(refused)
        return _Refusing(refused)


@implementer(IStreamClientEndpoint)
@attrs.frozen
class _Tagged:
    """
    An endpoint with the tag of the pool connections it makes.
    """

    _endpoint: IStreamClientEndpoint
    pool_tag: Hashable

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        return self._endpoint.connect(protocolFactory)


@implementer(IStreamClientEndpoint)
@attrs.frozen
class _Refusing:
    """
    An endpoint that never connects: the policy refused the fetch.
    """

    refused: Refused

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        return fail(self.refused)


@implementer(IStreamClientEndpoint)
@attrs.frozen
class GuardedEndpoint:
    """
    Connects to a host only at an address that L{check_addresses} allows:
    resolve, check, then connect to the checked addresses.
    """

    _dialer: Dialer
    _url: str
    _permit: Permit
    _upstream: Origin | None

    @property
    def pool_tag(self) -> Hashable:
        shares = self._permit.internal_like_upstream and self._upstream is not None
        return ("checked", self._upstream if shares else None)

    def connect(self, protocolFactory: IProtocolFactory) -> Deferred[IProtocol]:
        return Deferred.fromCoroutine(self._connect(protocolFactory))

    async def _connect(self, factory: IProtocolFactory) -> IProtocol:
        origin = self._permit.origin
        addresses = await self._dialer.addresses(origin.host)
        internal = False
        if self._permit.internal_like_upstream and self._upstream is not None:
            try:
                internal = on_internal_network(await self._dialer.addresses(self._upstream.host))
            except DNSLookupError:
                internal = False  # the upstream's own network is unknown: public
        try:
            allowed = check_addresses(self._permit, self._url, addresses, internal)
        except Refused as e:
            self._dialer.refusals.note(e)
            raise
        protocol: IProtocol = await self._dialer.at(allowed, origin).connect(factory)
        return protocol


@implementer(IHostResolution)
@attrs.frozen
class _Resolution:
    name: str

    def cancel(self) -> None:
        pass  # it is over before it is returned


@implementer(IHostnameResolver)
@attrs.frozen
class _Answer:
    """
    A resolver that answers the same checked addresses for any name.
    """

    _addresses: list[IPAddress]

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Sequence[type[IAddress]] | None = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        resolution = _Resolution(hostName)
        resolutionReceiver.resolutionBegan(resolution)
        for address in self._addresses:
            kind = TwistedIPv4Address if address.version == 4 else TwistedIPv6Address
            if addressTypes is None or kind in addressTypes:
                resolutionReceiver.addressResolved(kind("TCP", str(address), portNumber))
        resolutionReceiver.resolutionComplete()
        return resolution


@implementer(IReactorPluggableNameResolver)
class _CheckedAddresses:
    """
    The reactor, but for its name resolver: L{HostnameEndpoint} takes the
    resolver from its reactor.
    """

    def __init__(self, reactor: IConnectingReactor, resolver: IHostnameResolver) -> None:
        self._reactor = reactor
        self._resolver = resolver

    @property
    def nameResolver(self) -> IHostnameResolver:
        return self._resolver

    def installNameResolver(self, resolver: IHostnameResolver) -> IHostnameResolver:
        raise NotImplementedError("the checked addresses are fixed")

    def __getattr__(self, name: str) -> Any:
        return getattr(self._reactor, name)


@implementer(IAgentEndpointFactory)
@attrs.frozen
class HopEndpoints:
    """
    The endpoints of one hop of a file fetch, which L{FetchPolicy.file_hop}
    allowed.
    """

    _dialer: Dialer
    _permit: Permit
    _upstream: Origin | None

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        return self._dialer.endpoint(uri, self._permit, self._upstream)


@implementer(IAgentEndpointFactory)
@attrs.frozen
class PageEndpoints:
    """
    The endpoints of page fetches, redirects included: an upstream's origin,
    or https to a public address (L{page_hop}).
    """

    _dialer: Dialer
    _origins: frozenset[Origin]

    @classmethod
    def of(cls, dialer: Dialer, origins: Iterable[Origin]) -> PageEndpoints:
        return cls(dialer, frozenset(origins))

    def endpointForURI(self, uri: URI) -> IStreamClientEndpoint:
        url = uri.toBytes().decode("ascii", "replace")
        try:
            permit = page_hop(self._origins, url, uri_origin(uri))
        except ValueError as e:
            return self._dialer.refusing(Refused(url, str(e)))
        except Refused as e:
            return self._dialer.refusing(e)
        return self._dialer.endpoint(uri, permit, None)

"""
What the proxy may fetch: pure decisions from a URL, the upstream's policy
and the addresses a host name resolved to.  No I/O and no Twisted here;
L{txpypi.fetch.guarded} applies these decisions at connect time.

The rule, for files:

  - the upstream's own origin (scheme, host and port of its URL) is always
    allowed, wherever it is;
  - another origin only for a file whose index lists a strong hash (see
    L{STRONG_HASHES}), since without one the proxy cannot tell what it got;
  - with C{file-hosts} set, only the hosts it names; without it, any host
    over https;
  - and then only at an address that is public, or on an internal network
    (loopback, private, CGNAT, ...) when the upstream itself is on one;
    never a link-local, multicast, unspecified or reserved address;
  - a redirect obeys the same rule at every hop, and never goes from https
    to http.

Pages: the upstream's origin, or https to a public address.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Sequence
from typing import Literal, Protocol
from urllib.parse import urlsplit

import attrs

#: How many redirects a file fetch follows before it fails (502).
MAX_REDIRECTS = 5

#: Hashes strong enough to trust a file from another origin than the
#: upstream's (the proxy checks the bytes against them); md5 and sha1 are not.
STRONG_HASHES = frozenset({"sha256", "sha512", "sha384", "sha3_256", "blake2b", "sha224"})

DEFAULT_PORTS = {"http": 80, "https": 443}

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
#: Where an address is: reachable from anywhere, on an internal network of
#: ours, or somewhere no file ever is (link-local: cloud metadata services).
Network = Literal["public", "internal", "forbidden"]

_HOST = re.compile(r"^[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?(\.[a-z0-9_]([a-z0-9_-]*[a-z0-9_])?)*\.?$")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
#: 0.0.0.0/8: "this network"; a connection to 0.0.0.0 reaches this host.
_THIS_NETWORK = ipaddress.ip_network("0.0.0.0/8")
_SHARED = ipaddress.ip_network("100.64.0.0/10")
_IPV4_COMPATIBLE = ipaddress.ip_network("::/96")


class Refused(Exception):
    """
    A fetch the policy does not allow: C{url} and the C{rule} it breaks.
    """

    def __init__(self, url: str, rule: str) -> None:
        super().__init__(f"refused to fetch {url}: {rule}")
        self.url = url
        self.rule = rule


class ListedFile(Protocol):
    """
    A file an upstream's index listed (L{txpypi.fetch.wanted.Wanted} is one).
    """

    @property
    def url(self) -> str: ...

    @property
    def upstream(self) -> str: ...

    @property
    def expected_hash(self) -> tuple[str, str] | None: ...


def is_strong(expected_hash: tuple[str, str] | None) -> bool:
    """
    Does the index's hash (as L{txpypi.core.names.strongest_hash} picks it) let
    the proxy trust a file from another origin?
    """
    return expected_hash is not None and expected_hash[0] in STRONG_HASHES


def ip_literal(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


@attrs.frozen
class Origin:
    """
    Scheme, host (lower case, IPv6 without brackets) and port.
    """

    scheme: str
    host: str
    port: int

    @classmethod
    def of(cls, url: str) -> Origin:
        """
        The origin of C{url}.

        @raise ValueError: with a one-line reason, for anything but a plain
            http or https URL with a host (user information is refused: it
            is where URL parsers disagree).
        """
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in DEFAULT_PORTS:
            raise ValueError("not an http or https URL")
        if "@" in parts.netloc:
            raise ValueError("user information in the URL")
        try:
            port = parts.port
        except ValueError:
            raise ValueError("a bad port in the URL") from None
        return cls.make(scheme, parts.hostname or "", port)

    @classmethod
    def make(cls, scheme: str, host: str, port: int | None) -> Origin:
        """
        An origin from its parts, checked.

        @raise ValueError: for a scheme other than http and https, or a host
            that is neither a DNS name nor an IP address.
        """
        scheme, host = scheme.lower(), host.lower()
        if scheme not in DEFAULT_PORTS:
            raise ValueError("not an http or https URL")
        if not host:
            raise ValueError("no host in the URL")
        if ip_literal(host) is None and (not host.isascii() or not _HOST.match(host)):
            raise ValueError(f"not a host name: {host!r}")
        if port is not None and not 0 < port < 65536:
            raise ValueError("a bad port in the URL")
        return cls(scheme, host, DEFAULT_PORTS[scheme] if port is None else port)

    @property
    def address(self) -> IPAddress | None:
        """
        The host, when it is an IP address.
        """
        return ip_literal(self.host)

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


@attrs.frozen
class FileHost:
    """
    One entry of C{file-hosts}: the origin it allows.
    """

    origin: Origin

    @classmethod
    def parse(cls, entry: str) -> FileHost:
        """
        C{host} or C{host:port} (https), or C{http://host[:port]} to allow
        plain http for that host (C{https://host[:port]} is also understood).

        @raise ValueError: with a one-line reason.
        """
        text = entry.strip()
        scheme, sep, rest = text.partition("://")
        if not sep:
            scheme, rest = "https", text
        rest = rest.removesuffix("/")
        if scheme.lower() not in DEFAULT_PORTS or not rest or any(c in rest for c in "/?#@ \\"):
            raise ValueError(f"expected host, host:port or http://host[:port], got {entry!r}")
        try:
            return cls(Origin.of(f"{scheme}://{rest}"))
        except ValueError as e:
            raise ValueError(f"{entry!r}: {e}") from None

    def __str__(self) -> str:
        origin = self.origin
        host = f"[{origin.host}]" if ":" in origin.host else origin.host
        port = "" if origin.port == DEFAULT_PORTS[origin.scheme] else f":{origin.port}"
        return f"{host}{port}" if origin.scheme == "https" else f"http://{host}{port}"


@attrs.frozen
class Permit:
    """
    A hop the policy allows: the one C{origin} it may connect to, and
    whether the addresses of its host are checked first (L{check_addresses}).
    """

    origin: Origin
    #: False for the upstream's own origin (and for peers): any address.
    checked: bool = True
    #: Whether a checked host may be on an internal network when the
    #: upstream is on one too (files: yes; pages: no).
    internal_like_upstream: bool = False


@attrs.frozen
class FetchPolicy:
    """
    What one upstream's files may be fetched from.
    """

    #: The upstream's origin.
    origin: Origin
    #: With C{file-hosts} set: the only other origins a file may come from.
    file_hosts: tuple[FileHost, ...] | None = None

    @classmethod
    def for_upstream(cls, url: str, file_hosts: Iterable[FileHost] | None = None) -> FetchPolicy:
        return cls(Origin.of(url), None if file_hosts is None else tuple(file_hosts))

    def file_hop(self, url: str, strong_hash: bool, came_from: Origin | None = None) -> Permit:
        """
        May a file be fetched from C{url}, reached from C{came_from} (the
        origin that redirected there, or L{None} for the listed URL)?

        @param strong_hash: whether the index lists a strong hash for it.
        @raise Refused: when it may not.
        """
        try:
            origin = Origin.of(url)
        except ValueError as e:
            raise Refused(url, str(e)) from None
        if came_from is not None and came_from.scheme == "https" and origin.scheme == "http":
            raise Refused(url, "a redirect from https to http")
        if origin == self.origin:
            return Permit(origin, checked=False)
        if not strong_hash:
            raise Refused(url, "not the upstream's origin, and the index lists no sha256 for the file")
        if self.file_hosts is not None:
            if not any(entry.origin == origin for entry in self.file_hosts):
                raise Refused(url, "not the upstream's origin, nor one of file-hosts")
        elif origin.scheme != "https":
            raise Refused(url, "not the upstream's origin, and not https")
        return Permit(origin, checked=True, internal_like_upstream=True)


def page_hop(origins: Iterable[Origin], url: str, origin: Origin) -> Permit:
    """
    May an index page (or a redirect on the way to one) be fetched from
    C{url}, whose origin is C{origin}: an upstream's origin, or https to a
    public address?

    @raise Refused: when it may not.
    """
    if origin in set(origins):
        return Permit(origin, checked=False)
    if origin.scheme != "https":
        raise Refused(url, "not the upstream's origin, and not https")
    return Permit(origin, checked=True, internal_like_upstream=False)


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """
    The IPv4 address that an IPv6 address stands for or tunnels to:
    IPv4-mapped, IPv4-compatible, 6to4, Teredo, NAT64.
    """
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address.teredo is not None:
        return address.teredo[1]
    if address in _NAT64 or (address in _IPV4_COMPATIBLE and int(address) > 1):
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def classify(address: IPAddress) -> tuple[Network, str]:
    """
    Where C{address} is, and what kind of address it is (for a reason).
    """
    if isinstance(address, ipaddress.IPv6Address):
        inner = _embedded_ipv4(address)
        if inner is not None:
            network, kind = classify(inner)
            return network, f"{kind} (as {inner})"
    if address.is_unspecified or address in _THIS_NETWORK:
        return "forbidden", "an unspecified address"
    if address.is_loopback:
        return "internal", "a loopback address"
    if address.is_link_local:
        return "forbidden", "a link-local address"
    if address.is_multicast:
        return "forbidden", "a multicast address"
    if address.is_reserved:
        return "forbidden", "a reserved address"
    if address in _SHARED:
        return "internal", "a shared (CGNAT) address"
    if isinstance(address, ipaddress.IPv6Address) and address.is_site_local:
        return "internal", "a private address"
    if not address.is_global:
        return "internal", "a private address"
    return "public", "a public address"


def on_internal_network(addresses: Sequence[IPAddress]) -> bool:
    """
    Is a host with these addresses (the upstream's) on an internal network:
    none of them public?
    """
    return bool(addresses) and all(classify(a)[0] != "public" for a in addresses)


def check_addresses(
    permit: Permit, url: str, addresses: Sequence[IPAddress], upstream_internal: bool
) -> list[IPAddress]:
    """
    The addresses of C{permit}'s host that may be connected to, in order.

    @param upstream_internal: whether the upstream is on an internal network
        (L{on_internal_network}).
    @raise Refused: when there is none.
    """
    if not permit.checked:
        return list(addresses)
    internal_ok = permit.internal_like_upstream and upstream_internal
    allowed = []
    refused: list[tuple[IPAddress, Network, str]] = []
    for address in addresses:
        network, kind = classify(address)
        if network == "public" or (network == "internal" and internal_ok):
            allowed.append(address)
        else:
            refused.append((address, network, kind))
    if allowed:
        return allowed
    host = permit.origin.host
    if not refused:
        raise Refused(url, f"{host} has no address")
    address, network, kind = refused[0]
    where = f"{address} is" if permit.origin.address is not None else f"{host} resolves to {address},"
    if network == "forbidden":
        raise Refused(url, f"{where} {kind}")
    if permit.internal_like_upstream:
        raise Refused(url, f"{where} {kind}, and the upstream is on a public network")
    raise Refused(url, f"{where} {kind}, not a public address")

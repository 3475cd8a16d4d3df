"""
Whom an upstream's TLS trusts: the system's CAs, only the CAs of a PEM file
(C{ca-file}), or nobody checked at all (C{verify: false}).

L{tls_policy} makes the L{IPolicyForHTTPS} an L{txpypi.fetch.upstream.UpstreamClient}
takes as C{tls=}, which applies to every host the client connects to;
L{upstream_tls} limits it to the upstream's own origin (files listed on, or
redirected to, another host are then checked against the system's CAs).
"""

from __future__ import annotations

import re
from ipaddress import ip_address

import attrs
from OpenSSL import SSL
from OpenSSL.crypto import Error as OpenSSLError
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from twisted.internet.ssl import Certificate, CertificateOptions, trustRootFromCertificates
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.web.client import BrowserLikePolicyForHTTPS
from twisted.web.iweb import IPolicyForHTTPS
from zope.interface import implementer

from txpypi.core.fetchpolicy import Origin

_PEM_CERTIFICATE = re.compile(rb"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.DOTALL)


def tls_policy(ca_file: str | None, verify: bool) -> IPolicyForHTTPS | None:
    """
    The TLS policy of an upstream.

    @param ca_file: a PEM file of the only CAs to trust (the host name is
        still checked), or L{None} for the system's.
    @param verify: whether the certificate is checked at all; when not,
        C{ca_file} is not read.
    @return: L{None} for the system default (a L{BrowserLikePolicyForHTTPS}),
        else the policy to pass as C{tls=}.
    @raise ValueError: with a one-line message naming C{ca_file}, when it
        cannot be read or holds no valid certificate.
    """
    if not verify:
        return Unverified()
    if ca_file is None:
        return None
    return BrowserLikePolicyForHTTPS(trustRoot=trustRootFromCertificates(load_certificates(ca_file)))


def upstream_tls(url: str, ca_file: str | None, verify: bool) -> IPolicyForHTTPS | None:
    """
    The policy of L{tls_policy} for the upstream at C{url}'s own origin
    only, and the system default for every other host.

    @return: L{None} when it is the system default everywhere.
    @raise ValueError: as L{tls_policy} does, or for a URL without an origin.
    """
    own = tls_policy(ca_file, verify)
    if own is None:
        return None
    return OwnOrigin(own, Origin.of(url))


@implementer(IPolicyForHTTPS)
@attrs.frozen
class OwnOrigin:
    """
    One policy for an upstream's own host and port, another (the system
    default) for every other.
    """

    _own: IPolicyForHTTPS
    _origin: Origin
    _elsewhere: IPolicyForHTTPS = attrs.Factory(BrowserLikePolicyForHTTPS)

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        host = hostname.decode("ascii", "replace").strip("[]").lower().rstrip(".")
        own = host == self._origin.host.rstrip(".") and port == self._origin.port
        creator: IOpenSSLClientConnectionCreator = (self._own if own else self._elsewhere).creatorForNetloc(
            hostname, port
        )
        return creator


def load_certificates(ca_file: str) -> list[Certificate]:
    """
    Every certificate of a PEM file.

    @raise ValueError: with a one-line message naming the file, when it
        cannot be read, holds no certificate, or one that does not parse.
    """
    try:
        with open(ca_file, "rb") as f:
            data = f.read()
    except OSError as e:
        raise ValueError(f"ca-file {ca_file}: cannot be read: {e.strerror or e}") from None
    blocks = _PEM_CERTIFICATE.findall(data)
    if not blocks:
        raise ValueError(f"ca-file {ca_file}: no PEM certificate in it")
    try:
        return [Certificate.loadPEM(block) for block in blocks]
    except (OpenSSLError, ValueError):
        raise ValueError(f"ca-file {ca_file}: a certificate in it is not valid") from None


@implementer(IPolicyForHTTPS)
class Unverified:
    """
    TLS without any certificate check (C{verify: false}): the connection is
    encrypted, but to whoever answers.  The host name is still sent (SNI).
    """

    def creatorForNetloc(self, hostname: bytes, port: int) -> IOpenSSLClientConnectionCreator:
        return UnverifiedCreator(hostname.decode("ascii"))


@implementer(IOpenSSLClientConnectionCreator)
class UnverifiedCreator:
    """
    Client connections for one host that check no certificate, sending the
    host's name in SNI unless it is an IP address (RFC 6066).
    """

    def __init__(self, hostname: str) -> None:
        self._context = CertificateOptions(verify=False).getContext()
        self._server_name = None if _is_address(hostname) else hostname.encode("idna")

    def clientConnectionForTLS(self, tlsProtocol: TLSMemoryBIOProtocol) -> SSL.Connection:
        connection = SSL.Connection(self._context, None)
        if self._server_name is not None:
            connection.set_tlsext_host_name(self._server_name)
        return connection


def _is_address(host: str) -> bool:
    try:
        ip_address(host.strip("[]"))
    except ValueError:
        return False
    return True

"""
The pure fetch policy: which URLs, redirects and addresses a file or page
may come from.
"""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from txpypi.core.fetchpolicy import (
    MAX_REDIRECTS,
    FetchPolicy,
    FileHost,
    Origin,
    Permit,
    Refused,
    check_addresses,
    classify,
    is_strong,
    on_internal_network,
    page_hop,
)

UPSTREAM = "https://pypi.example/simple/"


def policy(*file_hosts: str) -> FetchPolicy:
    hosts = tuple(FileHost.parse(h) for h in file_hosts) if file_hosts else None
    return FetchPolicy.for_upstream(UPSTREAM, hosts)


def refusal(call: object) -> str:
    assert callable(call)
    with pytest.raises(Refused) as caught:
        call()
    return str(caught.value)


# -- addresses


@pytest.mark.parametrize(
    "address, network",
    [
        ("8.8.8.8", "public"),
        ("2606:4700::1111", "public"),
        ("::ffff:8.8.8.8", "public"),
        ("127.0.0.1", "internal"),
        ("127.8.9.10", "internal"),
        ("10.1.2.3", "internal"),
        ("172.16.0.1", "internal"),
        ("192.168.1.1", "internal"),
        ("100.64.0.1", "internal"),  # CGNAT
        ("::1", "internal"),
        ("fd00::1", "internal"),
        ("::ffff:127.0.0.1", "internal"),  # IPv4-mapped
        ("::ffff:10.0.0.1", "internal"),
        ("::127.0.0.1", "internal"),  # IPv4-compatible
        ("2002:7f00:1::", "internal"),  # 6to4 of 127.0.0.1
        ("64:ff9b::7f00:1", "internal"),  # NAT64 of 127.0.0.1
        ("169.254.169.254", "forbidden"),  # cloud metadata
        ("::ffff:169.254.169.254", "forbidden"),
        ("64:ff9b::a9fe:a9fe", "forbidden"),
        ("fe80::1", "forbidden"),
        ("0.0.0.0", "forbidden"),
        ("0.1.2.3", "forbidden"),
        ("::", "forbidden"),
        ("::ffff:0.0.0.0", "forbidden"),
        ("224.0.0.1", "forbidden"),
        ("ff02::1", "forbidden"),
        ("255.255.255.255", "forbidden"),
        ("240.0.0.1", "forbidden"),
    ],
)
def test_addresses_are_classified(address: str, network: str) -> None:
    assert classify(ipaddress.ip_address(address))[0] == network


@settings(max_examples=300)
@given(st.ip_addresses())
def test_nothing_is_public_that_ipaddress_calls_not_global(address: ipaddress._BaseAddress) -> None:
    """
    Public means global, unicast and (for an IPv6 address standing for an
    IPv4 one) public as that IPv4 address too.
    """
    assert isinstance(address, ipaddress.IPv4Address | ipaddress.IPv6Address)
    if classify(address)[0] != "public":
        return
    assert address.is_global and not address.is_multicast
    inner: ipaddress.IPv4Address | None = None
    if isinstance(address, ipaddress.IPv6Address):
        inner = address.ipv4_mapped or address.sixtofour or (address.teredo or (None, None))[1]
        if inner is None and int(address) >> 32 in (0, 0x64FF9B << 64):  # IPv4-compatible, NAT64
            inner = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    if inner is None:
        assert not address.is_reserved
    else:
        assert inner.is_global and not inner.is_reserved and not inner.is_multicast


@settings(max_examples=200)
@given(st.ip_addresses(v=4))
def test_an_ipv4_mapped_address_is_where_its_ipv4_address_is(address: ipaddress.IPv4Address) -> None:
    mapped = ipaddress.IPv6Address(f"::ffff:{address}")
    assert classify(mapped)[0] == classify(address)[0]


def test_check_addresses_keeps_the_allowed_ones_in_order() -> None:
    permit = Permit(Origin.of("https://files.example/"), checked=True, internal_like_upstream=True)
    addresses = [ipaddress.ip_address(a) for a in ("127.0.0.1", "151.101.1.1", "10.0.0.1", "2a04:4e42::1")]
    public = check_addresses(permit, "https://files.example/f", addresses, upstream_internal=False)
    assert [str(a) for a in public] == ["151.101.1.1", "2a04:4e42::1"]
    everything_but_forbidden = check_addresses(permit, "u", addresses, upstream_internal=True)
    assert everything_but_forbidden == addresses


def test_check_addresses_refuses_with_the_address_and_why() -> None:
    permit = Permit(Origin.of("https://files.example/"), checked=True, internal_like_upstream=True)
    loopback = [ipaddress.ip_address("127.0.0.1")]
    message = refusal(lambda: check_addresses(permit, "https://files.example/f", loopback, False))
    assert message == (
        "refused to fetch https://files.example/f: files.example resolves to 127.0.0.1, "
        "a loopback address, and the upstream is on a public network"
    )
    # Link-local stays refused even when the upstream is internal.
    metadata = [ipaddress.ip_address("169.254.169.254")]
    assert "a link-local address" in refusal(lambda: check_addresses(permit, "u", metadata, True))
    # Pages never share the upstream's network.
    page = Permit(Origin.of("https://files.example/"), checked=True, internal_like_upstream=False)
    assert "not a public address" in refusal(lambda: check_addresses(page, "u", loopback, True))
    # An unchecked permit (the upstream's origin, a peer) takes any address.
    origin = Permit(Origin.of(UPSTREAM), checked=False)
    assert check_addresses(origin, "u", loopback, False) == loopback


def test_the_upstream_is_internal_when_none_of_its_addresses_is_public() -> None:
    def internal(*addresses: str) -> bool:
        return on_internal_network([ipaddress.ip_address(a) for a in addresses])

    assert internal("127.0.0.1") and internal("10.0.0.1", "fd00::1")
    assert not internal("151.101.1.1") and not internal("10.0.0.1", "151.101.1.1") and not internal()


# -- file URLs and redirects


def test_the_upstreams_own_origin_is_always_allowed_unchecked() -> None:
    for url in ("https://pypi.example/packages/a.whl", "HTTPS://PyPI.example:443/x/y.whl"):
        assert policy().file_hop(url, strong_hash=False) == Permit(Origin.of(UPSTREAM), checked=False)
    # Another port or scheme is another origin.
    refusal(lambda: policy().file_hop("https://pypi.example:8443/a.whl", strong_hash=False))
    refusal(lambda: policy().file_hop("http://pypi.example/a.whl", strong_hash=False))


def test_another_origin_needs_https_and_a_strong_hash() -> None:
    permit = policy().file_hop("https://files.example/a.whl", strong_hash=True)
    assert permit == Permit(Origin.of("https://files.example/"), checked=True, internal_like_upstream=True)
    assert refusal(
        lambda: policy().file_hop("http://169.254.169.254/latest/meta-data/", strong_hash=True)
    ) == (
        "refused to fetch http://169.254.169.254/latest/meta-data/: not the upstream's origin, and not https"
    )
    assert "lists no sha256" in refusal(
        lambda: policy().file_hop("https://files.example/a", strong_hash=False)
    )


def test_only_md5_and_sha1_are_too_weak() -> None:
    assert is_strong(("sha256", "ab")) and is_strong(("sha512", "ab"))
    assert not is_strong(None) and not is_strong(("md5", "ab")) and not is_strong(("sha1", "ab"))


def test_file_hosts_pin_the_other_origins() -> None:
    pinned = policy("files.example", "mirror.example:8443", "http://plain.example")
    assert pinned.file_hop("https://files.example/a", strong_hash=True).checked
    assert pinned.file_hop("https://mirror.example:8443/a", strong_hash=True).checked
    assert pinned.file_hop("http://plain.example/a", strong_hash=True).checked
    for url in ("https://other.example/a", "https://mirror.example/a", "http://files.example/a"):
        assert "nor one of file-hosts" in refusal(lambda url=url: pinned.file_hop(url, strong_hash=True))
    # Even a listed host needs a strong hash.
    assert "lists no sha256" in refusal(lambda: pinned.file_hop("https://files.example/a", strong_hash=False))
    # An empty list: the upstream's origin only.
    only_origin = FetchPolicy.for_upstream(UPSTREAM, ())
    refusal(lambda: only_origin.file_hop("https://files.example/a", strong_hash=True))
    assert not only_origin.file_hop(UPSTREAM + "a", strong_hash=False).checked


def test_a_redirect_never_goes_from_https_to_http() -> None:
    upstream = FetchPolicy.for_upstream("http://index.internal/simple/")
    came_from = Origin.of("https://files.example/")
    message = refusal(lambda: upstream.file_hop("http://index.internal/a", True, came_from))
    assert message.endswith(": a redirect from https to http")
    assert not upstream.file_hop("http://index.internal/a", True, Origin.of("http://index.internal/")).checked


@pytest.mark.parametrize(
    "url",
    [
        "ftp://pypi.example/a",
        "file:///etc/passwd",
        "https://user@files.example/a",
        "https://pypi.example:80@evil.example/a",
        "https://files.example:99999/a",
        "https:///a",
    ],
)
def test_odd_urls_are_refused(url: str) -> None:
    refusal(lambda: policy().file_hop(url, strong_hash=True))


def test_pages_come_from_the_upstream_or_over_https() -> None:
    origins = [Origin.of(UPSTREAM), Origin.of("http://index.internal/")]
    for url in (UPSTREAM, "http://index.internal/simple/a/"):
        assert not page_hop(origins, url, Origin.of(url)).checked
    https = page_hop(origins, "https://cdn.example/a/", Origin.of("https://cdn.example/"))
    assert https.checked and not https.internal_like_upstream
    message = refusal(lambda: page_hop(origins, "http://10.0.0.1/", Origin.of("http://10.0.0.1/")))
    assert message == "refused to fetch http://10.0.0.1/: not the upstream's origin, and not https"


def test_the_redirect_limit_is_small() -> None:
    assert 1 <= MAX_REDIRECTS <= 10


# -- file-hosts entries


@pytest.mark.parametrize(
    "entry, canonical, origin",
    [
        ("files.example", "files.example", "https://files.example:443"),
        ("Files.Example:8443", "files.example:8443", "https://files.example:8443"),
        ("https://files.example:443/", "files.example", "https://files.example:443"),
        ("http://10.0.0.5", "http://10.0.0.5", "http://10.0.0.5:80"),
        ("http://10.0.0.5:8080", "http://10.0.0.5:8080", "http://10.0.0.5:8080"),
        ("[::1]:8443", "[::1]:8443", "https://[::1]:8443"),
    ],
)
def test_file_host_entries(entry: str, canonical: str, origin: str) -> None:
    host = FileHost.parse(entry)
    assert str(host) == canonical and str(host.origin) == origin
    assert FileHost.parse(str(host)) == host


@pytest.mark.parametrize(
    "entry",
    ["", "ftp://files.example", "files.example/path", "user@files.example", "h:99999", "*.example", "a b"],
)
def test_bad_file_host_entries(entry: str) -> None:
    with pytest.raises(ValueError) as caught:
        FileHost.parse(entry)
    assert "\n" not in str(caught.value)


_LABEL = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)


@settings(max_examples=200)
@given(
    st.lists(_LABEL, min_size=1, max_size=4).map(".".join),
    st.none() | st.integers(1, 65535),
    st.sampled_from(["", "http://", "https://"]),
)
def test_file_host_entries_round_trip(host: str, port: int | None, scheme: str) -> None:
    entry = f"{scheme}{host}" + ("" if port is None else f":{port}")
    parsed = FileHost.parse(entry)
    assert FileHost.parse(str(parsed)) == parsed
    assert parsed.origin.host == host and parsed.origin.scheme == (scheme.removesuffix("://") or "https")

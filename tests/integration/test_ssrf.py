"""
The proxy fetches only what it should: file URLs that an index lists and
the redirects on the way are followed only to the upstream's origin, or over
https to a public host (or one of C{file-hosts}); a file without a strong
hash only from the upstream's origin; peers are exempt but never
redirected; and a refusal is a 502 that names the URL and the rule, logged
once, with nothing cached.

Real servers on loopback (plain and TLS with a trustme CA) where they can
run; a name that resolves to an internal address behind a public-looking
host name needs an injected resolver and a L{MemoryReactorClock}.
"""

from __future__ import annotations

from collections.abc import Iterator
from ipaddress import ip_address
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from treq.client import HTTPClient
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IHostnameResolver, IHostResolution, IResolutionReceiver
from twisted.internet.ssl import Certificate
from twisted.internet.testing import MemoryReactorClock
from twisted.logger import ILogObserver, LogEvent, globalLogPublisher
from twisted.web.client import BrowserLikePolicyForHTTPS, readBody
from twisted.web.iweb import IPolicyForHTTPS
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from zope.interface import implementer

from tests.conftest import TLS, Running, Served, get_reactor, listen
from txpypi.config import Settings
from txpypi.core.fetchpolicy import MAX_REDIRECTS, FileHost
from txpypi.core.peer import HEADER
from txpypi.fetch.guarded import RefusalLog
from txpypi.fetch.upstream import Upstream, UpstreamClient, UpstreamError
from txpypi.fetch.wanted import Wanted
from txpypi.testing import Dist, FakeUpstream, build_wheel

ALPHA = build_wheel("alpha", "1.0")
BETA = build_wheel("beta", "1.0")


class Recorder(Resource):
    """
    A server that records every request (path and headers), answers a
    C{302} for the paths in C{redirects}, and else C{200} with C{files[path]}
    (or a few bytes).
    """

    isLeaf = True

    def __init__(self, files: dict[str, bytes] | None = None) -> None:
        super().__init__()
        self.files = files or {}
        self.redirects: dict[str, str] = {}
        self.requests: list[tuple[str, dict[str, str]]] = []

    def paths(self) -> list[str]:
        return [path for path, _ in self.requests]

    def render(self, request: Request) -> bytes:  # type: ignore[override]
        path = request.path.decode()
        headers = {k.decode().lower(): v[0].decode() for k, v in request.requestHeaders.getAllRawHeaders()}
        self.requests.append((path, headers))
        if path in self.redirects:
            request.setResponseCode(302)
            request.setHeader("location", self.redirects[path])
            return b"moved"
        request.setHeader("content-type", "application/octet-stream")
        return self.files.get(path, b"payload")


@attrs.define
class Servers:
    """
    Servers started by a test on loopback, stopped at its end.
    """

    tls: TLS
    ports: list[Any] = attrs.field(factory=list)

    def plain(self, resource: Resource) -> int:
        port = listen(Site(resource))
        self.ports.append(port)
        return int(port.getHost().port)

    def secure(self, resource: Resource) -> int:
        port = listen(Site(resource), self.tls.endpoint())
        self.ports.append(port)
        return int(port.getHost().port)


@pytest.fixture
def servers(tls: TLS) -> Iterator[Servers]:
    started = Servers(tls)
    yield started
    for port in started.ports:
        pytest_twisted.blockon(port.stopListening())


@pytest.fixture
def refusals() -> Iterator[list[LogEvent]]:
    """
    The "refused to fetch" log events of the test.
    """
    events: list[LogEvent] = []

    @implementer(ILogObserver)
    def observe(event: LogEvent) -> None:
        if str(event.get("log_format", "")).startswith("refused to fetch"):
            events.append(event)

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


def cached_files(running: Running) -> list[Path]:
    root = Path(running.proxy.files._store.root) / "files"  # type: ignore[attr-defined]
    return sorted(p for p in root.rglob("*") if p.is_file())


def text(body: bytes) -> str:
    line = body.decode()
    assert line.count("\n") <= 1, "an error is one line"
    return line.strip()


@pytest.fixture(params=["json", "html"])
def fake(request: pytest.FixtureRequest) -> Iterator[Served]:
    upstream = FakeUpstream([ALPHA, BETA], mode=request.param)
    port = listen(Site(upstream))
    yield Served(upstream, port)
    pytest_twisted.blockon(port.stopListening())


async def get(http: HTTPClient, url: str) -> tuple[int, Any, bytes]:
    response = await http.get(url)
    return response.code, response.headers, await response.content()


# -- through the proxy


@pytest_twisted.ensureDeferred
async def test_a_hashless_file_on_an_internal_address_is_refused_and_never_cached(
    fake: Served, servers: Servers, proxy_factory: Any, http: HTTPClient, refusals: list[LogEvent]
) -> None:
    """
    The attack: the upstream's page lists, without a hash, a file at another
    loopback server (the cloud metadata service, say).  The proxy answers
    502 naming the URL and the rule, the internal server is never asked,
    nothing is cached, a second request is refused again, and the refusal
    is logged once.  The upstream's own files still work.
    """
    internal = Recorder()
    port = servers.plain(internal)
    target = f"http://127.0.0.1:{port}/latest/meta-data/{ALPHA.filename}"
    fake.fake.urls[ALPHA.filename] = target
    fake.fake.unhashed.add(ALPHA.filename)
    proxy: Running = proxy_factory(fake.url)

    for _ in range(2):
        code, headers, body = await get(http, f"{proxy.url}/files/alpha/{ALPHA.filename}")
        assert code == 502
        assert text(body) == (
            f"refused to fetch {target}: not the upstream's origin, "
            "and the index lists no sha256 for the file"
        )
        assert headers.getRawHeaders(b"x-cache") != [b"HIT"]
        assert headers.getRawHeaders(b"etag") is None
        assert b"max-age" not in (headers.getRawHeaders(b"cache-control") or [b""])[0]
    assert internal.requests == []
    assert cached_files(proxy) == []
    assert [e["url"] for e in refusals] == [target]

    code, _, body = await get(http, f"{proxy.url}/files/beta/{BETA.filename}")
    assert code == 200 and body == BETA.content


@pytest_twisted.ensureDeferred
async def test_a_file_with_a_sha256_over_http_to_another_origin_is_refused(
    fake: Served, servers: Servers, proxy_factory: Any, http: HTTPClient
) -> None:
    internal = Recorder({f"/{ALPHA.filename}": ALPHA.content})
    target = f"http://127.0.0.1:{servers.plain(internal)}/{ALPHA.filename}"
    fake.fake.urls[ALPHA.filename] = target
    proxy: Running = proxy_factory(fake.url)
    code, _, body = await get(http, f"{proxy.url}/files/alpha/{ALPHA.filename}")
    assert code == 502
    assert text(body) == f"refused to fetch {target}: not the upstream's origin, and not https"
    assert internal.requests == [] and cached_files(proxy) == []


@pytest_twisted.ensureDeferred
async def test_a_redirect_to_another_origin_over_http_is_refused(
    fake: Served, servers: Servers, proxy_factory: Any, http: HTTPClient
) -> None:
    internal = Recorder({f"/{ALPHA.filename}": ALPHA.content})
    target = f"http://127.0.0.1:{servers.plain(internal)}/{ALPHA.filename}"
    fake.fake.redirects[f"/packages/{ALPHA.filename}"] = target
    proxy: Running = proxy_factory(fake.url)
    code, _, body = await get(http, f"{proxy.url}/files/alpha/{ALPHA.filename}")
    assert code == 502
    assert text(body) == f"refused to fetch {target}: not the upstream's origin, and not https"
    assert internal.requests == [] and cached_files(proxy) == []
    assert fake.fake.requests[f"/packages/{ALPHA.filename}"] == 1


@pytest_twisted.ensureDeferred
async def test_too_many_redirects_are_a_502(fake: Served, proxy_factory: Any, http: HTTPClient) -> None:
    path = f"/packages/{ALPHA.filename}"
    fake.fake.redirects[path] = path  # round and round, on the upstream's own origin
    proxy: Running = proxy_factory(fake.url)
    code, _, body = await get(http, f"{proxy.url}/files/alpha/{ALPHA.filename}")
    assert code == 502 and f"more than {MAX_REDIRECTS} times" in text(body)
    assert fake.fake.requests[path] == MAX_REDIRECTS + 1


@pytest_twisted.ensureDeferred
async def test_a_page_redirect_to_another_origin_over_http_is_refused(
    fake: Served, servers: Servers, proxy_factory: Any, http: HTTPClient
) -> None:
    internal = Recorder()
    target = f"http://127.0.0.1:{servers.plain(internal)}/simple/alpha/"
    fake.fake.redirects["/simple/alpha/"] = target
    proxy: Running = proxy_factory(fake.url)
    code, _, body = await get(http, f"{proxy.url}/simple/alpha/")
    assert code == 502
    assert text(body) == f"refused to fetch {target}: not the upstream's origin, and not https"
    assert internal.requests == []


@pytest_twisted.ensureDeferred
async def test_file_hosts_pin_where_files_may_come_from(
    fake: Served, servers: Servers, proxy_factory: Any, http: HTTPClient
) -> None:
    """
    With C{file-hosts} set (here an http entry, for a mirror on loopback),
    a listed host serves files with a sha256, and another spelling of the
    same server is not listed, so it is refused; nor may a listed host
    serve a file without a hash.
    """
    gamma = build_wheel("gamma", "1.0")
    fake.fake.add(gamma)
    mirror = Recorder({f"/{d.filename}": d.content for d in (ALPHA, BETA, gamma)})
    port = servers.plain(mirror)
    fake.fake.urls[ALPHA.filename] = f"http://127.0.0.1:{port}/{ALPHA.filename}"
    fake.fake.urls[BETA.filename] = f"http://localhost:{port}/{BETA.filename}"
    fake.fake.urls[gamma.filename] = f"http://127.0.0.1:{port}/{gamma.filename}"
    fake.fake.unhashed.add(gamma.filename)
    proxy: Running = proxy_factory(fake.url, file_hosts=(f"http://127.0.0.1:{port}",))

    code, _, body = await get(http, f"{proxy.url}/files/alpha/{ALPHA.filename}")
    assert code == 200 and body == ALPHA.content
    code, _, body = await get(http, f"{proxy.url}/files/beta/{BETA.filename}")
    assert code == 502 and text(body).endswith(": not the upstream's origin, nor one of file-hosts")
    code, _, body = await get(http, f"{proxy.url}/files/gamma/{gamma.filename}")
    assert code == 502 and text(body).endswith("the index lists no sha256 for the file")
    assert mirror.paths() == [f"/{ALPHA.filename}"]
    assert fake.fake.file_requests() == 0


# -- the upstream client, against real servers (TLS with a trustme CA)


def trusting(tls: TLS) -> BrowserLikePolicyForHTTPS:
    return BrowserLikePolicyForHTTPS(trustRoot=Certificate.loadPEM(tls.ca.read_bytes()))


@attrs.define
class Client:
    client: UpstreamClient
    upstream: Upstream

    def wanted(self, url: str, dist: Dist = ALPHA, hash: tuple[str, str] | None = None) -> Wanted:
        expected = ("sha256", dist.sha256) if hash is None else hash
        return Wanted("k", dist.filename, self.upstream.url, url, expected, None)

    def unhashed(self, url: str) -> Wanted:
        return attrs.evolve(self.wanted(url), expected_hash=None)

    async def fetch(self, target: Wanted) -> bytes:
        response = await self.client.open_file(target)
        return bytes(await readBody(response))

    async def refused(self, target: Wanted, extra: dict[bytes, bytes] | None = None) -> str:
        with pytest.raises(UpstreamError) as caught:
            await self.client.open_file(target, extra)
        assert caught.value.status == 502
        return caught.value.reason


@pytest.fixture
def client_factory(tls: TLS) -> Iterator[Any]:
    made: list[UpstreamClient] = []

    def factory(upstream_url: str, file_hosts: tuple[str, ...] | None = None) -> Client:
        hosts = None if file_hosts is None else tuple(FileHost.parse(h) for h in file_hosts)
        upstream = Upstream("test", upstream_url, file_hosts=hosts)
        client = UpstreamClient(get_reactor(), upstreams=(upstream,), tls=trusting(tls))
        made.append(client)
        return Client(client, upstream)

    yield factory
    for client in made:
        pytest_twisted.blockon(client.close())


@pytest_twisted.ensureDeferred
async def test_https_on_the_upstreams_network_is_allowed_but_never_a_downgrade(
    servers: Servers, client_factory: Any
) -> None:
    """
    The upstream is on loopback, so an https file host on loopback is
    allowed; but the redirect from there back to http is refused, even to
    the upstream's own origin.
    """
    origin = Recorder()
    a = servers.plain(origin)
    files = Recorder({"/ok": b"the file"})
    b = servers.secure(files)
    origin.redirects["/f"] = f"https://localhost:{b}/f"
    files.redirects["/f"] = f"http://127.0.0.1:{a}/back"
    c: Client = client_factory(f"http://127.0.0.1:{a}/simple/")

    assert await c.fetch(c.wanted(f"https://localhost:{b}/ok")) == b"the file"
    reason = await c.refused(c.wanted(f"http://127.0.0.1:{a}/f"))
    assert reason == f"refused to fetch http://127.0.0.1:{a}/back: a redirect from https to http"
    assert origin.paths() == ["/f"] and files.paths() == ["/ok", "/f"]


@pytest_twisted.ensureDeferred
async def test_a_redirect_to_another_origin_carries_none_of_the_proxys_headers(
    servers: Servers, client_factory: Any
) -> None:
    origin = Recorder()
    a = servers.plain(origin)
    files = Recorder({"/f": b"the file"})
    b = servers.secure(files)
    origin.redirects["/f"] = f"https://localhost:{b}/f"
    c: Client = client_factory(f"http://127.0.0.1:{a}/simple/")
    extra = {HEADER: b"1700000000:" + b"0" * 64, b"Authorization": b"Bearer s3cret-token"}

    response = await c.client.open_file(c.wanted(f"http://127.0.0.1:{a}/f"), extra)
    assert await readBody(response) == b"the file"
    [(_, sent_home)] = origin.requests
    [(_, sent_away)] = files.requests
    assert sent_home["x-txpypi-peer"] and sent_home["authorization"] == "Bearer s3cret-token"
    assert "x-txpypi-peer" not in sent_away and "authorization" not in sent_away
    assert sent_away["user-agent"].startswith("txpypi/")


@pytest_twisted.ensureDeferred
async def test_file_hosts_allow_a_listed_https_host_and_refuse_any_other(
    servers: Servers, client_factory: Any
) -> None:
    files = Recorder({"/f": b"the file"})
    b = servers.secure(files)
    c: Client = client_factory("http://127.0.0.1:1/simple/", file_hosts=(f"localhost:{b}",))
    assert await c.fetch(c.wanted(f"https://localhost:{b}/f")) == b"the file"
    # The same server under a name that is not listed.
    reason = await c.refused(c.wanted(f"https://127.0.0.1:{b}/f"))
    assert (
        reason
        == f"refused to fetch https://127.0.0.1:{b}/f: not the upstream's origin, nor one of file-hosts"
    )
    assert files.paths() == ["/f"]


@pytest_twisted.ensureDeferred
async def test_a_file_without_a_strong_hash_comes_only_from_the_upstreams_origin(
    servers: Servers, client_factory: Any
) -> None:
    """
    Even over https to a listed host, and at every hop: a redirect from the
    upstream's origin to that host is refused too.
    """
    origin = Recorder({"/here": b"from the upstream"})
    a = servers.plain(origin)
    files = Recorder()
    b = servers.secure(files)
    origin.redirects["/away"] = f"https://localhost:{b}/f"
    c: Client = client_factory(f"http://127.0.0.1:{a}/simple/", file_hosts=(f"localhost:{b}",))

    away = f"https://localhost:{b}/f"
    assert (await c.refused(c.unhashed(away))).endswith("the index lists no sha256 for the file")
    assert "lists no sha256" in await c.refused(c.wanted(away, hash=("md5", "0" * 32)))
    assert "lists no sha256" in await c.refused(c.unhashed(f"http://127.0.0.1:{a}/away"))
    assert files.requests == []
    assert await c.fetch(c.unhashed(f"http://127.0.0.1:{a}/here")) == b"from the upstream"


@pytest_twisted.ensureDeferred
async def test_peers_are_exempt_but_never_redirected(servers: Servers, client_factory: Any) -> None:
    """
    A peer is another instance on a private network: the client fetches
    from it over plain http, but does not follow its redirects.
    """
    elsewhere = Recorder()
    q = servers.plain(elsewhere)
    peer = Recorder({"/_peer/default/alpha/a.whl": b"relayed"})
    p = servers.plain(peer)
    peer.redirects["/_peer/default/alpha/b.whl"] = f"http://127.0.0.1:{q}/b.whl"
    c: Client = client_factory("https://pypi.example/simple/")
    signed = {HEADER: b"1700000000:" + b"0" * 64}

    response = await c.client.open_file(f"http://127.0.0.1:{p}/_peer/default/alpha/a.whl", signed, "peer")
    assert await readBody(response) == b"relayed"
    with pytest.raises(UpstreamError) as caught:
        await c.client.open_file(f"http://127.0.0.1:{p}/_peer/default/alpha/b.whl", signed, "peer")
    assert caught.value.status == 502 and "answered 302" in caught.value.reason
    assert elsewhere.requests == []
    # A bare URL is only for peers.
    with pytest.raises(TypeError):
        await c.client.open_file(f"http://127.0.0.1:{p}/_peer/default/alpha/a.whl")


@pytest_twisted.ensureDeferred
async def test_page_redirects_obey_the_origin_rule(servers: Servers, client_factory: Any) -> None:
    """
    Within the upstream's origin, a page redirect is followed; to another
    origin over http, or over https to a loopback host (pages do not share
    the upstream's network), it is refused and never connected.
    """
    origin = Recorder({"/simple/new/": b"<html></html>"})
    a = servers.plain(origin)
    internal = Recorder()
    q = servers.plain(internal)
    secure = Recorder()
    b = servers.secure(secure)
    origin.redirects["/simple/old/"] = "/simple/new/"
    origin.redirects["/simple/plain/"] = f"http://127.0.0.1:{q}/simple/plain/"
    origin.redirects["/simple/tls/"] = f"https://localhost:{b}/simple/tls/"
    c: Client = client_factory(f"http://127.0.0.1:{a}/simple/")

    page = await c.client.fetch_page(f"http://127.0.0.1:{a}/simple/old/")
    assert page.body == b"<html></html>"
    with pytest.raises(UpstreamError) as caught:
        await c.client.fetch_page(f"http://127.0.0.1:{a}/simple/plain/")
    assert caught.value.reason == (
        f"refused to fetch http://127.0.0.1:{q}/simple/plain/: not the upstream's origin, and not https"
    )
    with pytest.raises(UpstreamError) as caught:
        await c.client.fetch_page(f"http://127.0.0.1:{a}/simple/tls/")
    assert caught.value.reason == (
        f"refused to fetch https://localhost:{b}/simple/tls/: localhost resolves to 127.0.0.1, "
        "a loopback address, not a public address"
    )
    assert internal.requests == [] and secure.requests == []


# -- at connect time: what a name resolves to (no public address reachable here)


@implementer(IHostResolution)
@attrs.define
class _Resolution:
    name: str

    def cancel(self) -> None:
        pass


@implementer(IHostnameResolver)
@attrs.define
class FakeResolver:
    """
    Resolves names from a table, at once.
    """

    table: dict[str, list[str]]
    asked: list[str] = attrs.field(factory=list)

    def resolveHostName(
        self,
        resolutionReceiver: IResolutionReceiver,
        hostName: str,
        portNumber: int = 0,
        addressTypes: Any = None,
        transportSemantics: str = "TCP",
    ) -> IHostResolution:
        self.asked.append(hostName)
        resolution = _Resolution(hostName)
        resolutionReceiver.resolutionBegan(resolution)
        for address in self.table.get(hostName, []):
            kind = IPv6Address if ":" in address else IPv4Address
            resolutionReceiver.addressResolved(kind("TCP", address, portNumber))
        resolutionReceiver.resolutionComplete()
        return resolution


@implementer(IPolicyForHTTPS)
@attrs.define
class RecordingPolicy:
    """
    The system's TLS policy, recording the names it is asked to verify.
    """

    asked: list[tuple[bytes, int]] = attrs.field(factory=list)

    def creatorForNetloc(self, hostname: bytes, port: int) -> Any:
        self.asked.append((hostname, port))
        return BrowserLikePolicyForHTTPS().creatorForNetloc(hostname, port)


def unit_client(
    table: dict[str, list[str]], upstream_url: str = "https://pypi.example/simple/", tls: Any = None
) -> Any:
    reactor = MemoryReactorClock()
    resolver = FakeResolver({"pypi.example": ["151.101.0.223"], **table})
    upstream = Upstream("pypi", upstream_url)
    client = UpstreamClient(reactor, upstreams=(upstream,), resolver=resolver, tls=tls or RecordingPolicy())
    return reactor, resolver, client, upstream


def failure_of(d: Deferred[Any]) -> UpstreamError:
    """
    The L{UpstreamError} C{d} already failed with.
    """
    out: list[Any] = []
    d.addErrback(out.append)
    assert out, "not failed yet"
    error = out[0].value
    assert isinstance(error, UpstreamError)
    return error


def start(client: UpstreamClient, upstream: Upstream, url: str) -> Deferred[Any]:
    wanted = Wanted("k", ALPHA.filename, upstream.url, url, ("sha256", ALPHA.sha256), None)
    return Deferred.fromCoroutine(client.open_file(wanted))


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "169.254.169.254",
        "::1",
        "::ffff:127.0.0.1",
        "100.64.0.7",
        "0.0.0.0",
        "fd12::1",
    ],
)
def test_a_public_looking_name_that_resolves_internally_is_never_connected(address: str) -> None:
    """
    The upstream is on a public address; the file is listed with a sha256
    on an https host whose name resolves to an internal address: refused
    once resolved, before any connection.
    """
    reactor, resolver, client, upstream = unit_client({"files.example": [address]})
    d = start(client, upstream, "https://files.example/alpha.whl")
    error = failure_of(d)
    assert error.status == 502
    assert error.reason.startswith(
        f"refused to fetch https://files.example/alpha.whl: files.example resolves to {ip_address(address)},"
    )
    assert reactor.tcpClients == [] and "files.example" in resolver.asked


def test_a_public_address_is_connected_to_as_resolved_with_tls_for_the_name() -> None:
    """
    The connection goes to the checked address (only the public one of a
    mixed answer), and TLS is set up for the host name (SNI and the
    certificate's name).
    """
    tls = RecordingPolicy()
    reactor, _, client, upstream = unit_client(
        {"files.example": ["127.0.0.1", "151.101.1.1", "10.0.0.1"]}, tls=tls
    )
    d = start(client, upstream, "https://files.example/alpha.whl")
    assert [c[:2] for c in reactor.tcpClients] == [("151.101.1.1", 443)]
    assert tls.asked == [(b"files.example", 443)]
    d.addErrback(lambda _: None).cancel()  # the test is over


def test_the_upstreams_ip_address_is_connected_to_with_no_lookup() -> None:
    """
    An upstream named by its address is connected to at once: no name to
    resolve, so no getaddrinfo in a thread before each connection (the
    hand-driven reactor here has no threads at all).
    """
    reactor, resolver, client, upstream = unit_client({}, upstream_url="http://10.0.0.9:8080/simple/")
    d = start(client, upstream, "http://10.0.0.9:8080/packages/alpha.whl")
    assert [c[:2] for c in reactor.tcpClients] == [("10.0.0.9", 8080)]
    assert resolver.asked == []
    d.addErrback(lambda _: None).cancel()  # the test is over


def test_an_internal_upstream_may_keep_its_files_on_another_internal_host() -> None:
    reactor, _, client, upstream = unit_client(
        {"index.corp": ["10.0.0.2"], "files.corp": ["10.0.0.3"], "meta.corp": ["169.254.169.254"]},
        upstream_url="https://index.corp/simple/",
    )
    d = start(client, upstream, "https://files.corp/alpha.whl")
    assert [c[:2] for c in reactor.tcpClients] == [("10.0.0.3", 443)]
    d.addErrback(lambda _: None).cancel()  # the test is over
    refused = start(client, upstream, "https://meta.corp/latest/meta-data/")
    assert "169.254.169.254, a link-local address" in failure_of(refused).reason
    assert len(reactor.tcpClients) == 1


def test_each_refused_url_is_logged_once_and_the_memory_is_bounded() -> None:
    from txpypi.core.fetchpolicy import Refused

    logged: list[str] = []

    @implementer(ILogObserver)
    def observe(event: LogEvent) -> None:
        if str(event.get("log_format", "")).startswith("refused to fetch"):
            logged.append(event["url"])

    globalLogPublisher.addObserver(observe)
    try:
        log = RefusalLog(limit=2)
        for url in ("a", "a", "b", "a", "c", "b", "a"):
            log.note(Refused(url, "rule"))
    finally:
        globalLogPublisher.removeObserver(observe)
    # "b" was forgotten when "c" came (the limit is 2), and "a" after it.
    assert logged == ["a", "b", "c", "b", "a"]


# -- configuration


def test_file_hosts_from_the_command_line_and_yaml(tmp_path: Path) -> None:
    from twisted.python.usage import UsageError

    from txpypi.services import ReloadService
    from txpypi.tap import Options

    options = Options()
    options.parseOptions(["--file-host", "files.example", "--file-host", "http://10.0.0.5:8080"])
    assert options.settings.file_hosts == ("files.example", "http://10.0.0.5:8080")
    config = tmp_path / "txpypi.yaml"
    config.write_text("file-hosts:\n  - Mirror.Example:8443\n  - https://files.example/\n")
    options = Options()
    options.parseOptions(["--config", str(config)])
    assert options.settings.file_hosts == ("mirror.example:8443", "files.example")
    config.write_text("file-hosts: []\n")
    options = Options()
    options.parseOptions(["--config", str(config)])
    assert options.settings.file_hosts == ()  # the upstream's origin only
    assert Options().settings.file_hosts is None and "file_hosts" in ReloadService.FIXED

    for bad in ("ftp://files.example", "files.example/path", "user@files.example", "files.example:0"):
        with pytest.raises(UsageError) as caught:
            Options().parseOptions(["--file-host", bad])
        assert str(caught.value).startswith("file-host: ") and "\n" not in str(caught.value)
    config.write_text("file-hosts: files.example:notaport\n")
    with pytest.raises(UsageError) as caught:
        Options().parseOptions(["--config", str(config)])
    assert str(caught.value).startswith("file-hosts: ") and "\n" not in str(caught.value)
    # The upstream's origin must be one the policy can name (and a password
    # in it is not echoed).
    with pytest.raises(UsageError) as caught:
        Options().parseOptions(["--upstream", "https://me:pa55word@index.example/simple/"])
    assert str(caught.value) == "upstream: user information in the URL"
    config.write_text("file-hosts: {a: 1}\n")
    with pytest.raises(UsageError, match="^file-hosts: expected a list"):
        Options().parseOptions(["--config", str(config)])


def test_the_proxy_gives_its_upstream_the_file_hosts(tmp_path: Path) -> None:
    from txpypi.tap import build

    settings = Settings(listen=(), cache_dir=str(tmp_path), file_hosts=("files.example",))
    _, proxy = build(settings, MemoryReactorClock())
    upstream = proxy.pages.upstream
    assert upstream.file_hosts == (FileHost.parse("files.example"),)
    assert proxy.files._client.upstreams == (upstream,)

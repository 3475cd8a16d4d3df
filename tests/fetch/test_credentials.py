"""
An upstream's credentials and TLS, against real servers on loopback: the
C{Authorization} header goes to the upstream's own origin only (pages and
file hops; never another origin, a redirect's next hop there, or a peer),
and never shows in a reason or a log line; C{ca-file} and C{verify: false}
decide whom TLS trusts (L{txpypi.fetch.tls}).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
import trustme
from twisted.logger import ILogObserver, LogEvent, formatEvent, globalLogPublisher
from twisted.web.client import readBody
from twisted.web.iweb import IPolicyForHTTPS
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from zope.interface import implementer

from tests.conftest import TLS, get_reactor, listen
from txpypi.core.fetchpolicy import FileHost
from txpypi.fetch.tls import tls_policy, upstream_tls
from txpypi.fetch.upstream import Upstream, UpstreamClient, UpstreamError
from txpypi.fetch.wanted import Wanted
from txpypi.testing import FakeUpstream, build_wheel

ALPHA = build_wheel("alpha", "1.0")
SECRET = "Basic dXNlcjpzM2NyZXQtcGFzc3dvcmQ="  # user:s3cret-password
#: What of the secret must never show: the header value, and its token.
NEVER = (SECRET, SECRET.split()[1])


class Gate(Resource):
    """
    Records the C{Authorization} of every request (by path), answers 401
    to one without C{required} (when set), and else hands it to C{inner}.
    """

    isLeaf = True

    def __init__(self, inner: Resource, required: str | None = None) -> None:
        super().__init__()
        self.inner = inner
        self.required = required
        self.seen: list[tuple[str, str | None]] = []

    def render(self, request: Request) -> bytes | int:  # type: ignore[override]
        got = request.getHeader(b"authorization")
        value = None if got is None else got.decode("latin-1")
        self.seen.append((request.path.decode(), value))
        if self.required is not None and value != self.required:
            request.setResponseCode(401)
            request.setHeader("www-authenticate", 'Basic realm="private"')
            return b"unauthorized"
        result: bytes | int = self.inner.render(request)
        return result


class Files(Resource):
    """
    Answers C{302} for the paths in C{redirects}, else C{200} with
    C{files[path]}.
    """

    isLeaf = True

    def __init__(self, files: dict[str, bytes] | None = None) -> None:
        super().__init__()
        self.files = files or {}
        self.redirects: dict[str, str] = {}

    def render(self, request: Request) -> bytes:  # type: ignore[override]
        path = request.path.decode()
        if path in self.redirects:
            request.setResponseCode(302)
            request.setHeader("location", self.redirects[path])
            return b"moved"
        if path not in self.files:
            request.setResponseCode(404)
            return b"not found"
        request.setHeader("content-type", "application/octet-stream")
        return self.files[path]


@attrs.define
class Loopback:
    """
    Servers and clients a test started, stopped and closed at its end.
    """

    tls: TLS
    ports: list[Any] = attrs.field(factory=list)
    clients: list[UpstreamClient] = attrs.field(factory=list)

    def serve(self, resource: Resource, endpoint: str = "tcp:0:interface=127.0.0.1") -> int:
        port = listen(Site(resource), endpoint)
        self.ports.append(port)
        return int(port.getHost().port)

    def client(self, *upstreams: Upstream, tls: IPolicyForHTTPS | None = None) -> UpstreamClient:
        made = UpstreamClient(get_reactor(), upstreams=upstreams, tls=tls)
        self.clients.append(made)
        return made


@pytest.fixture
def loopback(tls: TLS) -> Iterator[Loopback]:
    started = Loopback(tls)
    yield started
    for client in started.clients:
        pytest_twisted.blockon(client.close())
    for port in started.ports:
        pytest_twisted.blockon(port.stopListening())


@pytest.fixture
def logged() -> Iterator[list[LogEvent]]:
    """
    Every log event of the test.
    """
    events: list[LogEvent] = []

    @implementer(ILogObserver)
    def observe(event: LogEvent) -> None:
        events.append(event)

    globalLogPublisher.addObserver(observe)
    yield events
    globalLogPublisher.removeObserver(observe)


def wanted(
    upstream: Upstream, url: str, expected: tuple[str, str] | None = ("sha256", ALPHA.sha256)
) -> Wanted:
    return Wanted("k", ALPHA.filename, upstream.url, url, expected, None)


async def fetch(client: UpstreamClient, target: Wanted | str, kind: str = "file") -> bytes:
    response = await client.open_file(target, kind=kind)
    return bytes(await readBody(response))


async def failed(d: Any) -> UpstreamError:
    with pytest.raises(UpstreamError) as caught:
        await d
    return caught.value


# -- credentials


@pytest_twisted.ensureDeferred
async def test_a_page_reaches_an_upstream_that_requires_its_authorization(loopback: Loopback) -> None:
    """
    An upstream that answers 401 without credentials serves its page to a
    client configured with them, which sends them exactly.
    """
    gate = Gate(FakeUpstream([ALPHA]), required=SECRET)
    url = f"http://127.0.0.1:{loopback.serve(gate)}/simple/"
    without = loopback.client(Upstream("private", url))
    error = await failed(without.fetch_page(url + "alpha/"))
    assert error.status == 502 and "401" in error.reason
    client = loopback.client(Upstream("private", url, authorization=SECRET))
    page = await client.fetch_page(url + "alpha/")
    assert ALPHA.filename.encode() in page.body
    assert gate.seen == [("/simple/alpha/", None), ("/simple/alpha/", SECRET)]


@pytest_twisted.ensureDeferred
async def test_file_hops_on_the_upstreams_origin_carry_it(loopback: Loopback) -> None:
    """
    A file listed on the upstream's own origin gets the credentials, and so
    does the next hop of a redirect that stays on that origin.
    """
    gate = Gate(Files({"/packages/b": ALPHA.content}), required=SECRET)
    origin = f"http://127.0.0.1:{loopback.serve(gate)}"
    gate.inner.redirects["/packages/a"] = "/packages/b"  # type: ignore[attr-defined]
    upstream = Upstream("private", f"{origin}/simple/", authorization=SECRET)
    client = loopback.client(upstream)
    assert await fetch(client, wanted(upstream, f"{origin}/packages/a")) == ALPHA.content
    assert gate.seen == [("/packages/a", SECRET), ("/packages/b", SECRET)]


@pytest_twisted.ensureDeferred
async def test_a_file_listed_on_another_origin_gets_none(loopback: Loopback) -> None:
    """
    Another port is another origin: a file the upstream's page lists there
    is fetched without the upstream's credentials (the file's URL is not
    where they belong, whatever the page says).
    """
    upstream_gate = Gate(FakeUpstream([ALPHA]))
    upstream_port = loopback.serve(upstream_gate)
    mirror = Gate(Files({"/f": ALPHA.content}))
    mirror_origin = f"http://127.0.0.1:{loopback.serve(mirror)}"
    upstream = Upstream(
        "private",
        f"http://127.0.0.1:{upstream_port}/simple/",
        file_hosts=(FileHost.parse(mirror_origin),),
        authorization=SECRET,
    )
    client = loopback.client(upstream)
    assert await fetch(client, wanted(upstream, f"{mirror_origin}/f")) == ALPHA.content
    assert mirror.seen == [("/f", None)] and upstream_gate.seen == []


@pytest_twisted.ensureDeferred
async def test_a_file_redirect_to_another_origin_drops_it_on_that_hop(loopback: Loopback) -> None:
    """
    The upstream redirects a file to another origin: the first hop carries
    the credentials, the second does not; a hop that comes back to the
    upstream's origin carries them again.
    """
    gate = Gate(Files({"/back": ALPHA.content}), required=SECRET)
    origin = f"http://127.0.0.1:{loopback.serve(gate)}"
    elsewhere = Gate(Files())
    other = f"http://127.0.0.1:{loopback.serve(elsewhere)}"
    gate.inner.redirects["/f"] = f"{other}/away"  # type: ignore[attr-defined]
    elsewhere.inner.redirects["/away"] = f"{origin}/back"  # type: ignore[attr-defined]
    upstream = Upstream(
        "private", f"{origin}/simple/", file_hosts=(FileHost.parse(other),), authorization=SECRET
    )
    client = loopback.client(upstream)
    assert await fetch(client, wanted(upstream, f"{origin}/f")) == ALPHA.content
    assert elsewhere.seen == [("/away", None)]
    assert gate.seen == [("/f", SECRET), ("/back", SECRET)]


@pytest_twisted.ensureDeferred
async def test_a_page_redirect_to_another_origin_drops_it(loopback: Loopback) -> None:
    """
    Pages follow redirects through Twisted's agent: one from the upstream's
    origin to another configured upstream's origin (another port) arrives
    there without the first upstream's credentials.
    """
    page = FakeUpstream([ALPHA])
    second = Gate(page)
    second_url = f"http://127.0.0.1:{loopback.serve(second)}/simple/"
    first = Gate(FakeUpstream([]))
    first.inner.redirects["/simple/alpha/"] = second_url + "alpha/"  # type: ignore[attr-defined]
    first_url = f"http://127.0.0.1:{loopback.serve(first)}/simple/"
    client = loopback.client(
        Upstream("private", first_url, authorization=SECRET), Upstream("public", second_url)
    )
    fetched = await client.fetch_page(first_url + "alpha/")
    assert ALPHA.filename.encode() in fetched.body and fetched.url == second_url + "alpha/"
    assert first.seen == [("/simple/alpha/", SECRET)]
    assert second.seen == [("/simple/alpha/", None)]


@pytest_twisted.ensureDeferred
async def test_a_peer_never_gets_the_upstreams_credentials(loopback: Loopback) -> None:
    """
    Even on the upstream's own origin, a download from a peer goes without
    them.
    """
    gate = Gate(Files({"/_peer/f": b"from a peer"}))
    origin = f"http://127.0.0.1:{loopback.serve(gate)}"
    client = loopback.client(Upstream("private", f"{origin}/simple/", authorization=SECRET))
    assert await fetch(client, f"{origin}/_peer/f", kind="peer") == b"from a peer"
    assert gate.seen == [("/_peer/f", None)]


@pytest_twisted.ensureDeferred
async def test_the_credentials_never_show(loopback: Loopback, logged: list[LogEvent]) -> None:
    """
    Not in a repr, nor in the reason or log line of a 401, a refused file,
    or an unreachable upstream.
    """
    gate = Gate(FakeUpstream([ALPHA]), required="Basic something-else")
    origin = f"http://127.0.0.1:{loopback.serve(gate)}"
    upstream = Upstream("private", f"{origin}/simple/", authorization=SECRET)
    client = loopback.client(upstream)
    reasons = [
        (await failed(client.fetch_page(f"{origin}/simple/alpha/"))).reason,
        (await failed(client.open_file(wanted(upstream, f"{origin}/packages/{ALPHA.filename}")))).reason,
        (await failed(client.open_file(wanted(upstream, "http://127.0.0.1:1/f", None)))).reason,
    ]
    closed = Upstream("closed", "http://127.0.0.1:1/simple/", authorization=SECRET)
    reasons.append((await failed(loopback.client(closed).fetch_page(closed.url + "alpha/"))).reason)
    assert [("401" in r) for r in reasons] == [True, True, False, False]
    assert "refused to fetch" in reasons[2] and "unreachable" in reasons[3]
    assert any("refused to fetch" in formatEvent(e) for e in logged)
    shown = [repr(upstream), repr(client._files), repr(client._pages), *reasons]
    shown += [formatEvent(e) for e in logged] + [repr(e) for e in logged]
    assert not [text for text in shown for secret in NEVER if secret in text]


def test_an_authorization_that_is_not_one_header_line_is_refused_without_showing_it() -> None:
    with pytest.raises(ValueError) as caught:
        Upstream("private", "https://private.test/simple/", authorization="Bearer a\r\nX-Evil: 1")
    assert str(caught.value) == "upstream private: the authorization is not one header line"


# -- TLS


@pytest.fixture(scope="module")
def other_name(tmp_path_factory: pytest.TempPathFactory) -> TLS:
    """
    A CA of its own and a certificate for C{other.test} only.
    """
    directory = tmp_path_factory.mktemp("other")
    ca = trustme.CA()
    server = ca.issue_cert("other.test")
    paths = TLS(directory / "ca.pem", directory / "key.pem", directory / "cert.pem")
    ca.cert_pem.write_to_path(str(paths.ca))
    server.private_key_pem.write_to_path(str(paths.key))
    server.cert_chain_pems[0].write_to_path(str(paths.cert))
    return paths


async def tls_page(loopback: Loopback, tls: IPolicyForHTTPS | None, host: str = "localhost") -> bytes:
    port = loopback.serve(FakeUpstream([ALPHA]), loopback.tls.endpoint())
    url = f"https://{host}:{port}/simple/"
    page = await loopback.client(Upstream("private", url), tls=tls).fetch_page(url + "alpha/")
    return page.body


@pytest_twisted.ensureDeferred
async def test_a_ca_file_is_trusted_and_the_system_default_is_not(loopback: Loopback) -> None:
    assert ALPHA.filename.encode() in await tls_page(loopback, tls_policy(str(loopback.tls.ca), True))
    assert tls_policy(None, True) is None
    error = await failed(tls_page(loopback, None))
    assert error.status == 502


@pytest_twisted.ensureDeferred
async def test_a_ca_file_still_checks_the_host_name(loopback: Loopback, other_name: TLS) -> None:
    """
    A certificate from the trusted CA, for another name, is refused.
    """
    port = loopback.serve(FakeUpstream([ALPHA]), other_name.endpoint())
    url = f"https://localhost:{port}/simple/"
    client = loopback.client(Upstream("private", url), tls=tls_policy(str(other_name.ca), True))
    error = await failed(client.fetch_page(url + "alpha/"))
    assert error.status == 502


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1"])  # with SNI, and without (an address)
@pytest_twisted.ensureDeferred
async def test_verify_false_checks_no_certificate(loopback: Loopback, other_name: TLS, host: str) -> None:
    """
    Without verification any certificate will do: one from a CA nobody
    trusts, for another name.
    """
    port = loopback.serve(FakeUpstream([ALPHA]), other_name.endpoint())
    url = f"https://{host}:{port}/simple/"
    page = await loopback.client(Upstream("private", url), tls=tls_policy(None, False)).fetch_page(
        url + "alpha/"
    )
    assert ALPHA.filename.encode() in page.body


def test_an_unusable_ca_file_is_a_one_line_error_naming_it(tmp_path: Path) -> None:
    empty = tmp_path / "empty.pem"
    empty.write_text("no certificate here\n")
    broken = tmp_path / "broken.pem"
    broken.write_text("-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n")
    missing = tmp_path / "missing.pem"
    for path, says in [(missing, "cannot be read"), (empty, "no PEM certificate"), (broken, "not valid")]:
        with pytest.raises(ValueError) as caught:
            tls_policy(str(path), True)
        message = str(caught.value)
        assert message.startswith(f"ca-file {path}: ") and says in message and "\n" not in message
    assert tls_policy(str(missing), False) is not None  # not read when nothing is checked


@pytest_twisted.ensureDeferred
async def test_upstream_tls_is_for_the_upstreams_own_origin_only(loopback: Loopback, other_name: TLS) -> None:
    """
    With L{upstream_tls}, C{verify: false} holds on the upstream's origin
    only: a file on another origin (the same server by another name) is
    checked against the system's CAs, and refused; L{tls_policy} alone
    would have taken it.
    """
    port = loopback.serve(Files({"/f": ALPHA.content}), other_name.endpoint())
    upstream = Upstream("private", f"https://127.0.0.1:{port}/simple/")
    own, elsewhere = (
        wanted(upstream, f"https://127.0.0.1:{port}/f"),
        wanted(upstream, f"https://localhost:{port}/f"),
    )
    assert upstream_tls(upstream.url, None, True) is None
    scoped = loopback.client(upstream, tls=upstream_tls(upstream.url, None, False))
    assert await fetch(scoped, own) == ALPHA.content
    error = await failed(scoped.open_file(elsewhere))
    assert error.status == 502 and "connection failed" in error.reason
    everywhere = loopback.client(upstream, tls=tls_policy(None, False))
    assert await fetch(everywhere, elsewhere) == ALPHA.content

"""
The upstream client's page fetches over a real twisted.web Agent and the
fake upstream (through iosim, on a L{Clock}): framing, gzip and the size
limit; and the L{Limiter} that caps page requests in progress.
"""

from __future__ import annotations

import gzip
from typing import Any

import pytest
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.web.resource import Resource
from twisted.web.server import Request

import txpypi.fetch.upstream
from txpypi.fetch.upstream import Limiter, UpstreamClient, UpstreamError
from txpypi.testing import FakeUpstream, build_wheel

PAGE = "http://upstream.test/simple/alpha/"


def run(coroutine: Any) -> Any:
    """
    The result of a coroutine that completes at once (iosim is synchronous),
    or the exception it raised.
    """
    out: list[Any] = []
    Deferred.fromCoroutine(coroutine).addBoth(out.append)
    assert out, "did not complete synchronously"
    if hasattr(out[0], "value"):
        return out[0].value
    return out[0]


def client_for(resource: Resource, clock: Clock | None = None) -> UpstreamClient:
    return UpstreamClient(clock or Clock(), agent=RequestTraversalAgent(resource))


def test_a_close_delimited_page_is_refused() -> None:
    """
    A page body with neither a Content-Length nor chunking ends only when
    the upstream closes the connection: it cannot be told from one cut
    short, so it is a 502, never a page (today half an HTML page parsed as
    a page with fewer files).
    """
    fake = FakeUpstream([build_wheel("alpha", "1.0"), build_wheel("alpha", "2.0")], mode="html")
    fake.page_faults["alpha"] = "close-delimited"
    error = run(client_for(fake).fetch_page(PAGE))
    assert isinstance(error, UpstreamError) and error.status == 502
    assert "no length" in error.reason and "\n" not in error.reason


class _Pages(Resource):
    """
    Answers every page with C{body} and the given headers, then finishes.
    """

    isLeaf = True

    def __init__(self, body: bytes, **headers: str) -> None:
        super().__init__()
        self.body = body
        self.headers = headers

    def render_GET(self, request: Request) -> bytes | int:
        for name, value in self.headers.items():
            request.setHeader(name.replace("_", "-"), value)
        return self.body


@pytest.mark.parametrize(
    "body, reason",
    [
        (gzip.compress(b"<html>" * 1000)[:-20], "not valid gzip"),  # cut inside the stream
        (b"not gzip at all", "not valid gzip"),
    ],
)
def test_broken_gzip_is_a_502(body: bytes, reason: str) -> None:
    error = run(client_for(_Pages(body, content_encoding="gzip")).fetch_page(PAGE))
    assert isinstance(error, UpstreamError) and error.status == 502 and reason in error.reason


def test_an_unknown_encoding_is_a_502() -> None:
    error = run(client_for(_Pages(b"x", content_encoding="br")).fetch_page(PAGE))
    assert isinstance(error, UpstreamError) and error.status == 502 and "encoding" in error.reason


class _Asked(_Pages):
    def render_GET(self, request: Request) -> bytes | int:
        self.accept_encoding = request.getHeader(b"accept-encoding")
        return super().render_GET(request)


def test_gzip_is_asked_for_and_concatenated_members_are_one_body() -> None:
    """
    Pages are asked for gzip-compressed and inflated here (not by treq's
    decoder, which stops at the first gzip member and has no limit).
    """
    members = gzip.compress(b"<html><body>") + gzip.compress(b"</body></html>")
    upstream = _Asked(members, content_encoding="gzip")
    page = run(client_for(upstream).fetch_page(PAGE))
    assert upstream.accept_encoding == b"gzip"
    assert page.body == b"<html><body></body></html>"


def test_a_gzip_bomb_stops_at_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """
    A small gzip body that inflates past MAX_PAGE_BYTES fails with a 502
    naming the limit, having inflated no more than that.
    """
    monkeypatch.setattr(txpypi.fetch.upstream, "MAX_PAGE_BYTES", 1024 * 1024)
    fake = FakeUpstream([build_wheel("alpha", "1.0")])
    fake.page_faults["alpha"] = "gzip-bomb"
    assert len(fake._gzip_bomb()) < 64 * 1024  # inflates to 2 MiB
    error = run(client_for(fake).fetch_page(PAGE))
    assert isinstance(error, UpstreamError) and error.status == 502
    assert "larger than 1048576 bytes" in error.reason


def test_an_identity_body_past_the_limit_is_a_502() -> None:
    error = run(client_for(_Pages(b"x" * 5000)).fetch_page(PAGE, limit=4096))
    assert isinstance(error, UpstreamError) and error.status == 502 and "4096" in error.reason
    assert run(client_for(_Pages(b"x" * 4096)).fetch_page(PAGE, limit=4096)).body == b"x" * 4096


# -- the limiter


def test_limiter_queues_past_its_limit_and_times_out() -> None:
    clock = Clock()
    limiter = Limiter(clock, 2)
    got: list[Any] = []
    for _ in range(4):
        limiter.acquire(30).addBoth(got.append)
    assert got == [None, None] and limiter.running == 2 and limiter.waiting == 2
    limiter.release()
    assert got == [None, None, None] and limiter.running == 2 and limiter.waiting == 1
    clock.advance(29.9)
    assert len(got) == 3
    limiter.limit = 3  # SIGHUP raised it: the one in line goes
    assert got[3] is None and limiter.running == 3 and limiter.waiting == 0
    limiter.acquire(5).addBoth(got.append)
    clock.advance(5)
    error = got[4].value
    assert isinstance(error, UpstreamError) and error.status == 504
    assert "5 s" in error.reason and "\n" not in error.reason
    assert limiter.running == 3 and limiter.waiting == 0 and clock.getDelayedCalls() == []

"""
The one map from an exception to what a client is told, and the text
answers built from it: every resource and route answers its errors through
L{status_of}, so each exception's status, reason and headers are pinned
here once.
"""

from __future__ import annotations

import pytest
from twisted.web.server import Request
from twisted.web.test.requesthelper import DummyChannel
from werkzeug.exceptions import Conflict, MethodNotAllowed
from werkzeug.exceptions import NotFound as NoRoute

from txpypi.cache.files import Busy, NotListed
from txpypi.cache.pages import NotFound
from txpypi.core.names import BadName
from txpypi.fetch.upstream import UpstreamError
from txpypi.fetch.wanted import FlightFailed
from txpypi.storage.outages import Unavailable
from txpypi.web.answers import Answer, error_text, finish_error, status_of

RETRY_AFTER_5 = (b"retry-after", b"5")
RETRY_AFTER_7 = (b"retry-after", b"7")


@pytest.mark.parametrize(
    "error,answer",
    [
        (NotFound(), Answer(404, "no such project: x")),
        (NotListed("not in the index"), Answer(404, "no such project: x")),
        (
            Busy("too many downloads", retry_after=7),
            Answer(503, "too many downloads", ((b"retry-after", b"7"),)),
        ),
        (
            Busy("the proxy is shutting down"),
            Answer(503, "the proxy is shutting down", ((b"retry-after", b"5"),)),
        ),
        (UpstreamError(504, "the upstream timed out"), Answer(504, "the upstream timed out")),
        (FlightFailed(502, "hash mismatch"), Answer(502, "hash mismatch")),
        (Unavailable("redis: connection refused"), Answer(503, "the store: redis: connection refused")),
        (BadName("not a valid project name"), Answer(400, "not a valid project name")),
        (NoRoute(), Answer(404, "not found")),
        (MethodNotAllowed(), Answer(405, "method not allowed")),
    ],
    ids=lambda value: type(value).__name__,
)
def test_each_error_has_its_status_reason_and_headers(error: Exception, answer: Answer) -> None:
    """
    Each exception the layers below raise for a client's request maps to
    its status, its reason (what was asked, or what the error says) and
    its extra headers.
    """
    assert status_of(error, missing="no such project: x", unavailable="the store") == answer


def test_the_defaults_name_nothing_in_particular() -> None:
    """
    Without a subject: C{not found}, and C{unavailable: ...} (the Klein
    routes' words).
    """
    assert status_of(NotFound()) == Answer(404, "not found")
    assert status_of(Unavailable("sqlite: disk I/O error")) == Answer(
        503, "unavailable: sqlite: disk I/O error"
    )


@pytest.mark.parametrize(
    "error",
    [RuntimeError("a bug"), KeyError("x"), OSError("disk"), Conflict()],
    ids=lambda value: type(value).__name__,
)
def test_an_unexpected_error_has_no_answer(error: Exception) -> None:
    """
    Anything else (a bug, another of Klein's HTTP errors) is the caller's to log and
    answer C{500} or C{502}: the map has no status for it.
    """
    assert status_of(error) is None


def request() -> Request:
    channel = DummyChannel()
    req = Request(channel, False)
    req.gotLength(0)
    req.method, req.uri, req.clientproto = b"GET", b"/files/x/y", b"HTTP/1.1"
    return req


def test_an_error_answer_carries_its_headers_and_no_cache_lifetime() -> None:
    """
    The answer of a mapped error is its status, its one-line reason, its
    extra headers, and none of the caching headers set for the answer it
    replaces.
    """
    req = request()
    req.setHeader(b"etag", b'"abc"')
    req.setHeader(b"cache-control", b"public, max-age=365000000, immutable")
    req.setHeader(b"accept-ranges", b"bytes")
    body = error_text(req, Busy("all download slots are taken", retry_after=3))
    headers = req.responseHeaders
    assert (req.code, body) == (503, b"all download slots are taken\n")
    assert headers.getRawHeaders(b"retry-after") == [b"3"]
    assert headers.getRawHeaders(b"cache-control") == [b"no-store"]
    assert headers.getRawHeaders(b"etag") is None and headers.getRawHeaders(b"accept-ranges") is None
    assert headers.getRawHeaders(b"content-length") == [b"%d" % len(body)]


def test_finishing_with_an_error_writes_it_once() -> None:
    """
    L{finish_error} answers the mapped error and finishes the request.
    """
    req = request()
    transport = req.channel.transport
    finish_error(req, UpstreamError(502, "the upstream answered 500"), missing="unused")
    written = transport.written.getvalue()
    assert req.finished and req.code == 502
    assert written.startswith(b"HTTP/1.1 502 ") and written.endswith(b"\r\n\r\nthe upstream answered 500\n")


def test_an_unmapped_error_is_not_answered_as_if_it_were_expected() -> None:
    """
    Asking for the answer of an error the map does not know is a bug of the
    caller's, caught at once.
    """
    with pytest.raises(AssertionError):
        error_text(request(), RuntimeError("a bug"))

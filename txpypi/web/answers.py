"""
Short answers: one-line plain-text bodies, the one map from an exception to
the status, reason and headers a client is told, and running a request's
coroutine so that a client that leaves cancels it.

Every resource and route answers its errors through L{status_of}, so that
an exception means the same status wherever it surfaces; an error answer
never carries a cache lifetime or a validator (L{text}).
"""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any

import attrs
from twisted.internet.defer import CancelledError, Deferred
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import NOT_DONE_YET, Request
from werkzeug.exceptions import HTTPException

from txpypi.cache.files import Busy, NotListed
from txpypi.cache.pages import NotFound
from txpypi.cache.policy import PolicyRefused, ProjectBlocked
from txpypi.core.names import BadName
from txpypi.fetch.upstream import UpstreamError
from txpypi.fetch.wanted import FlightFailed
from txpypi.storage.outages import Unavailable
from txpypi.web.sender import abort_client

log = Logger(namespace="txpypi.app")

#: Headers that make an answer cacheable or revalidatable: an error answer
#: never carries them, so that no cache in front keeps an error.
CACHING_HEADERS = (b"cache-control", b"etag", b"last-modified", b"expires", b"age", b"accept-ranges")


@attrs.frozen
class Answer:
    """
    What a client is told about an error.

    @ivar code: the status.
    @ivar reason: the one-line body.
    @ivar headers: headers the answer carries besides, such as
        C{Retry-After}.
    """

    code: int
    reason: str
    headers: tuple[tuple[bytes, bytes], ...] = ()


def status_of(
    error: BaseException, *, missing: str = "not found", unavailable: str = "unavailable"
) -> Answer | None:
    """
    The answer for C{error}, or L{None} for an unexpected one (a bug, or a
    failure with no meaning for the client: the caller logs it and answers
    C{500}, or C{502} for a file that could not be read).

    @param missing: the reason of a C{404} for what was asked (the project,
        the file).
    @param unavailable: what a C{503} for a store that is down starts with.
    """
    if isinstance(error, ProjectBlocked):
        return Answer(404, error.refusal.reason)
    if isinstance(error, PolicyRefused):
        return Answer(403, error.refusal.reason)
    if isinstance(error, (NotFound, NotListed)):
        return Answer(404, missing)
    if isinstance(error, Busy):
        return Answer(503, error.reason, ((b"retry-after", b"%d" % error.retry_after),))
    if isinstance(error, (UpstreamError, FlightFailed)):
        return Answer(error.status, error.reason)
    if isinstance(error, Unavailable):
        return Answer(503, f"{unavailable}: {error}")
    if isinstance(error, BadName):
        return Answer(400, str(error))
    if isinstance(error, HTTPException) and error.code in (404, 405):
        # Klein's: no route for the path, or none for the method.
        return Answer(error.code, "not found" if error.code == 404 else "method not allowed")
    return None


def text(request: Request, code: int, reason: str) -> bytes:
    """
    A one-line plain-text answer.  An error (C{4xx}, C{5xx}) drops whatever
    caching headers were set for the answer it replaces, and says
    C{no-store}.
    """
    request.setResponseCode(code)
    headers = request.responseHeaders
    headers.removeHeader(b"content-encoding")  # the text is sent as it is
    if code >= 400:
        for name in CACHING_HEADERS:
            headers.removeHeader(name)
        headers.setRawHeaders(b"cache-control", [b"no-store"])
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    body = (reason + "\n").encode("utf-8", "replace")
    request.setHeader(b"content-length", b"%d" % len(body))
    return body


def answer_text(request: Request, answer: Answer) -> bytes:
    """
    The body of L{Answer} C{answer}, its status and headers set.
    """
    for name, value in answer.headers:
        request.setHeader(name, value)
    return text(request, answer.code, answer.reason)


def client_gone(request: Request) -> bool:
    """
    Whether there is nobody left to answer: the client went away (Twisted
    drops the request's channel then), or the answer is already complete.
    """
    return bool(request.finished) or getattr(request, "channel", None) is None


def finish_text(request: Request, code: int, reason: str) -> None:
    """
    Answer and finish with a one-line text, if anybody is still there; an
    answer already started is cut off instead, so that no body looks
    complete.
    """
    finish_answer(request, Answer(code, reason))


def finish_answer(request: Request, answer: Answer) -> None:
    """
    L{finish_text} for an L{Answer}.
    """
    if client_gone(request):
        return
    if request.startedWriting:
        # Too late for a status: never let a body look complete.
        abort_client(request)
        return
    request.write(answer_text(request, answer))
    request.finish()


def _expected(error: BaseException, missing: str, unavailable: str) -> Answer:
    answer = status_of(error, missing=missing, unavailable=unavailable)
    assert answer is not None, f"no status for {error!r}"
    return answer


def error_text(
    request: Request, error: BaseException, *, missing: str = "not found", unavailable: str = "unavailable"
) -> bytes:
    """
    The body of the answer to the expected C{error} (one that L{status_of}
    maps), its status and headers set.
    """
    return answer_text(request, _expected(error, missing, unavailable))


def finish_error(
    request: Request, error: BaseException, *, missing: str = "not found", unavailable: str = "unavailable"
) -> None:
    """
    Answer the expected C{error} (one that L{status_of} maps) and finish.
    """
    finish_answer(request, _expected(error, missing, unavailable))


def moved(request: Request, location: str) -> bytes:
    """
    A C{301} to C{location}, keeping the request's query.
    """
    query = request.uri.partition(b"?")[2]
    target = location.encode() + (b"?" + query if query else b"")
    request.setHeader(b"location", target)
    return text(request, 301, f"moved to {target.decode('latin-1')}")


def header(request: Request, name: bytes) -> str | None:
    """
    A request header as text, or L{None}.
    """
    value = request.getHeader(name)
    return None if value is None else value.decode("latin-1")


def segment(raw: bytes) -> str:
    """
    A path segment as text.

    @raise BadName: it is not UTF-8.
    """
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadName("path is not valid UTF-8") from None


def run(request: Request, coroutine: Coroutine[Any, Any, None]) -> int:
    """
    Answer C{request} with C{coroutine}; a client that leaves cancels it
    (so that it stops waiting for a download slot, say: what it shares with
    other requests is not cancelled for them).
    """

    def crashed(failure: Failure) -> None:
        if failure.check(CancelledError):
            return  # the client left
        log.failure("request for {path} crashed", failure, path=request.path)
        finish_text(request, 500, "internal error")

    answering = Deferred.fromCoroutine(coroutine)
    answering.addErrback(crashed)
    request.notifyFinish().addErrback(lambda _: answering.cancel())
    return NOT_DONE_YET

"""
C{/simple/} and C{/simple/<project>/}: index pages from the page cache, in
the representation the client negotiated, sent a slice at a time.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar
from urllib.parse import quote

import attrs
from twisted.internet.interfaces import IPushProducer
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request
from zope.interface import implementer

from txpypi.cache.groups import Group
from txpypi.cache.pages import HIT, STALE, CachedPage, NotFound, PageCache, Representation
from txpypi.cache.policy import PolicedGroup
from txpypi.core.httpheaders import accepts_gzip, etag_matches
from txpypi.core.names import BadName, is_normalized, normalize
from txpypi.core.simple.media import negotiate
from txpypi.fetch.upstream import UpstreamError
from txpypi.web.answers import client_gone, error_text, finish_error, header, moved, run, segment, text
from txpypi.web.quick import NOT_MODIFIED, OK, Dates, QuickRequest, header_lines

#: Page bodies go to a client this many bytes at a time, each once its
#: connection took the one before; a body this size or smaller is one write.
PAGE_SLICE = 64 * 1024

#: How many distinct C{Accept} / C{Accept-Encoding} values (of at most 256
#: bytes each: longer ones are worked out every time) have their answer kept.
NEGOTIATED_ENTRIES = 1024
#: The longest header value whose answer is kept, in bytes.
NEGOTIATED_LENGTH = 256

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


@implementer(IPushProducer)
class PageSender:
    """
    Sends one page body to one client, a slice at a time as its connection
    takes them: a push producer that the transport pauses while its buffer
    is full and resumes once it drained, so that a client that stops
    reading holds a slice or two in the transport, never a copy of the
    body.  A body kept gzip-compressed only is inflated slice by slice for a
    client that does not accept gzip.  The sender holds a reference to the
    shared body, and lets go of it when done, stopped or disconnected.
    """

    def __init__(self, request: Request, representation: Representation) -> None:
        self._request = request
        self._data: bytes | None = representation.data
        self._inflater = zlib.decompressobj(wbits=31) if representation.inflate else None
        self._offset = 0
        self._paused = False
        self._sending = False
        self.sent = 0

    def start(self) -> None:
        self._request.registerProducer(self, True)
        self._request.notifyFinish().addErrback(lambda _: self.stopProducing())
        self.resumeProducing()

    def _next(self, data: bytes) -> bytes:
        """
        The next slice to send (C{b""} at the end).
        """
        inflater = self._inflater
        while True:
            if inflater is not None and inflater.unconsumed_tail:
                return inflater.decompress(inflater.unconsumed_tail, PAGE_SLICE)
            piece = data[self._offset : self._offset + PAGE_SLICE]
            self._offset += len(piece)
            if inflater is None or not piece:
                return piece if inflater is None else inflater.flush()
            out = inflater.decompress(piece, PAGE_SLICE)
            if out:
                return out

    def resumeProducing(self) -> None:
        self._paused = False
        if self._sending:
            return  # resumed from inside our own write: the loop goes on
        self._sending = True
        try:
            while not self._paused and self._data is not None:
                piece = self._next(self._data)
                if not piece:
                    self._release()
                    self._request.unregisterProducer()
                    self._request.finish()
                    return
                self.sent += len(piece)
                self._request.write(piece)
        finally:
            self._sending = False

    def pauseProducing(self) -> None:
        self._paused = True

    def stopProducing(self) -> None:
        self._release()

    def _release(self) -> None:
        self._data = None
        self._inflater = None

    @property
    def holding(self) -> bool:
        """
        Whether it still holds the body (it is neither done nor stopped).
        """
        return self._data is not None


@attrs.define
class Negotiated(Generic[K, V]):
    """
    The answers of a negotiation, by the request headers it read: the same
    few C{Accept} values come again and again.  At most C{max_entries} are
    kept, each of a key at most L{NEGOTIATED_LENGTH} bytes long (a longer
    one is worked out every time), so that no client can grow it.
    """

    _decide: Callable[[K], V]
    max_entries: int = NEGOTIATED_ENTRIES
    _kept: dict[K, V] = attrs.field(factory=dict)

    def get(self, key: K, length: int) -> V:
        """
        The answer for C{key}, whose header values are C{length} bytes long.
        """
        try:
            return self._kept[key]
        except KeyError:
            pass
        answer = self._decide(key)
        if len(self._kept) < self.max_entries and length <= NEGOTIATED_LENGTH:
            self._kept[key] = answer
        return answer


def _latin1(value: bytes | None) -> str | None:
    return None if value is None else value.decode("latin-1")


def _content_type(key: tuple[bytes | None, bytes | None]) -> str | None:
    accept, fmt = key
    return negotiate(_latin1(accept), _latin1(fmt))


def _gzip(header: bytes) -> bool:
    return accepts_gzip(header.decode("latin-1"))


def _leading(content_type: str, state: str, max_age: int) -> list[tuple[bytes, bytes]]:
    return [
        (b"content-type", content_type.encode()),
        (b"vary", b"Accept, Accept-Encoding"),
        (b"x-cache", state.encode()),
        (b"cache-control", b"max-age=%d" % max_age),
    ]


def _validators(page: CachedPage, representation: Representation) -> list[tuple[bytes, bytes]]:
    found = [(b"etag", representation.etag.encode())]
    serial = getattr(page.model, "last_serial", None)
    if serial is not None:  # what mirroring tools read, as the upstream said it
        found.append((b"x-pypi-last-serial", b"%d" % serial))
    return found


def _lengths(representation: Representation, gzipped: bool) -> list[tuple[bytes, bytes]]:
    found = [(b"content-encoding", b"gzip")] if gzipped else []
    return [*found, (b"content-length", b"%d" % representation.length)]


@attrs.frozen
class _Built:
    """
    One representation's header lines, built once for the quick lane:
    those before C{X-Cache} and C{Cache-Control} (which change), the
    validators after them, and the lengths; and the body, or L{None} for
    one too big to send whole.
    """

    leading: bytes
    validators: bytes
    lengths: bytes
    etag: str
    body: bytes | None

    @classmethod
    def of(cls, page: CachedPage, content_type: str, gzipped: bool) -> _Built:
        representation = page.representation(content_type, gzipped)
        small = not representation.inflate and representation.length <= PAGE_SLICE
        return cls(
            leading=header_lines(_leading(content_type, "", 0)[:2]),
            validators=header_lines(_validators(page, representation)),
            lengths=header_lines(_lengths(representation, gzipped)),
            etag=representation.etag,
            body=representation.data if small else None,
        )


def _max_age(left: float) -> int:
    """
    The C{max-age} of a page with C{left} seconds of freshness.
    """
    return max(0, math.ceil(left))


class SimpleResource(Resource):
    """
    C{/simple/} and C{/simple/<project>/} in PEP 503 HTML or PEP 691 JSON.
    """

    isLeaf = True

    def __init__(self, pages: PageCache | Group | PolicedGroup) -> None:
        super().__init__()
        self._pages = pages
        self._negotiated: Negotiated[tuple[bytes | None, bytes | None], str | None] = Negotiated(
            _content_type
        )
        self._accepts_gzip: Negotiated[bytes, bool] = Negotiated(_gzip)

    def _content_type(self, request: Request) -> str | None:
        accept = request.getHeader(b"accept")
        formats = request.args.get(b"format") if request.args else None
        fmt = formats[0] if formats else None
        return self._negotiated.get((accept, fmt), len(accept or b"") + len(fmt or b""))

    def _gzip(self, request: Request) -> bool:
        value = request.getHeader(b"accept-encoding")
        return False if value is None else self._accepts_gzip.get(value, len(value))

    def render_GET(self, request: Request) -> bytes | int:
        postpath = request.postpath or []
        prefix = "/" + "/".join(p.decode("latin-1") for p in request.prepath or [])
        if not postpath:
            return moved(request, prefix + "/")
        if len(postpath) > 2 or (len(postpath) == 2 and postpath[1]):
            return text(request, 404, "not a Simple API path")
        try:
            raw = segment(postpath[0])
            project = normalize(raw) if raw else None
        except BadName as e:
            return error_text(request, e)
        if project is not None and (raw != project or len(postpath) == 1):
            return moved(request, f"{prefix}/{quote(project)}/")
        content_type = self._content_type(request)
        if content_type is None:
            return text(request, 406, "none of the Simple API's content types is acceptable")
        page = self._pages.fresh(project)
        if page is not None:
            body = self._respond(request, page, content_type, HIT)
            return NOT_DONE_YET if body is None else body
        return run(request, self._fetch(request, project, content_type))

    def render_HEAD(self, request: Request) -> bytes | int:
        return self.render_GET(request)

    async def _fetch(self, request: Request, project: str | None, content_type: str) -> None:
        try:
            page, state = await self._pages.get(project)
        except (NotFound, UpstreamError) as e:
            missing = "not cached, and offline" if self._pages.offline else "no such project"
            finish_error(request, e, missing=f"{missing}: {project}")
            return
        if client_gone(request):
            return
        body = self._respond(request, page, content_type, state)
        if body is None:
            return  # a PageSender has it
        if body:
            request.write(body)
        request.finish()

    def _respond(self, request: Request, page: CachedPage, content_type: str, state: str) -> bytes | None:
        """
        Set the answer's status and headers; return a small body to write
        (C{b""}: none, for C{HEAD} and C{304}), or L{None} when a
        L{PageSender} was started for a big one.
        """
        gzipped = self._gzip(request)
        representation = page.representation(content_type, gzipped)
        headers = request.responseHeaders
        for name, value in _leading(content_type, state, self._max_age(page)):
            headers.setRawHeaders(name, [value])
        for name, value in _validators(page, representation):
            headers.setRawHeaders(name, [value])
        if state == STALE:
            headers.setRawHeaders(b"age", [b"%d" % max(0, int(self._pages.age(page)))])
        if etag_matches(header(request, b"if-none-match"), representation.etag):
            request.setResponseCode(304)
            return b""
        for name, value in _lengths(representation, gzipped):
            headers.setRawHeaders(name, [value])
        if request.method == b"HEAD":
            return b""
        if not representation.inflate and representation.length <= PAGE_SLICE:
            return representation.data
        PageSender(request, representation).start()
        return None

    def _max_age(self, page: CachedPage) -> int:
        return _max_age(self._pages.remaining(page))

    def quick(self, asked: QuickRequest, dates: Dates) -> tuple[int, bytes, bytes] | None:
        """
        The whole answer to a quick request (see L{txpypi.web.quick}) for a
        page fresh in memory and small: its status, its head and its body;
        L{None} for anything the usual way answers.  The same bytes as
        L{_respond} sends, but for the cost.
        """
        if not is_normalized(asked.project):
            return None  # redirected or refused, the usual way
        project = asked.project.decode("ascii")
        if getattr(self._pages, "active", False):
            return None  # a policy in force: its views and exemption notes go the usual way
        accept = asked.header(b"accept")
        content_type = self._negotiated.get((accept, None), len(accept or b""))
        if content_type is None:
            return None
        found = self._pages.fresh_left(project)
        if found is None:
            return None
        page, left = found
        encodings = asked.header(b"accept-encoding")
        gzipped = False if encodings is None else self._accepts_gzip.get(encodings, len(encodings))
        built = page.answers.get((content_type, gzipped))
        if built is None:
            built = page.answers[(content_type, gzipped)] = _Built.of(page, content_type, gzipped)
        assert isinstance(built, _Built)
        if built.body is None:
            return None  # a big one, sent in slices
        middle = b"X-Cache: HIT\r\nCache-Control: max-age=%d\r\n" % _max_age(left)
        matches = asked.header(b"if-none-match")
        if matches is not None and etag_matches(matches.decode("latin-1"), built.etag):
            # Twisted says the empty body's length of a GET (not of a HEAD),
            # as the usual way shows.
            length = b"" if asked.method == b"HEAD" else b"Content-Length: 0\r\n"
            out = NOT_MODIFIED + dates() + built.leading + middle + built.validators + length + b"\r\n"
            return 304, out, b""
        head = OK + dates() + built.leading + middle + built.validators + built.lengths + b"\r\n"
        if asked.method == b"HEAD":
            return 200, head, b""
        return 200, head, built.body

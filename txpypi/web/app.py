"""
The HTTP face of the proxy.

Hot paths (C{/simple/...} index pages and C{/files/...} downloads) are plain
twisted.web resources with pre-rendered bodies; everything else goes to a
Klein app whose routes are methods on L{Proxy}.
"""

from __future__ import annotations

import hmac
import json
import math
import zlib
from collections.abc import Callable, Coroutine, Hashable
from io import BytesIO
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import attrs
from klein import Klein
from twisted.internet.defer import CancelledError, Deferred, DeferredList, succeed
from twisted.internet.interfaces import IAddress, IDelayedCall, IPushProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.http import HTTPChannel
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from txpypi import __version__
from txpypi.cache.files import Busy, FileCache, NotListed, Opened
from txpypi.cache.pages import HIT, STALE, CachedPage, NotFound, PageCache, Representation
from txpypi.concurrency.waiters import SingleFlight
from txpypi.core.fileplan import FilePlan, plan_file, range_applies
from txpypi.core.httpheaders import accepts_gzip, etag_matches
from txpypi.core.index import negotiate
from txpypi.core.names import BadName, check_filename, normalize
from txpypi.core.peer import HEADER as PEER_HEADER
from txpypi.core.peer import verify
from txpypi.fetch.flight import Flight
from txpypi.fetch.reader import FlightReader
from txpypi.fetch.upstream import UpstreamError
from txpypi.fetch.wanted import ByteSource, FlightFailed
from txpypi.storage.outages import CHECK_WAIT, Outage, Unavailable, describe
from txpypi.storage.stores import IRedirectable
from txpypi.web.accesslog import Entry, client_address, combined, json_line
from txpypi.web.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from txpypi.web.metrics import Metrics, route_of
from txpypi.web.sender import CHUNK, Sender, abort_client
from txpypi.web.statuspage import StatusFigures, render_status

log = Logger(namespace="txpypi.app")

FILE_CACHE_CONTROL = b"public, max-age=365000000, immutable"


#: Headers that make an answer cacheable or revalidatable: an error answer
#: never carries them, so that no cache in front keeps an error.
_CACHING_HEADERS = (b"cache-control", b"etag", b"last-modified", b"expires", b"age", b"accept-ranges")


def _text(request: Request, code: int, reason: str) -> bytes:
    """
    A one-line plain-text answer.  An error (C{4xx}, C{5xx}) drops whatever
    caching headers were set for the answer it replaces, and says
    C{no-store}.
    """
    request.setResponseCode(code)
    headers = request.responseHeaders
    headers.removeHeader(b"content-encoding")  # the text is sent as it is
    if code >= 400:
        for name in _CACHING_HEADERS:
            headers.removeHeader(name)
        headers.setRawHeaders(b"cache-control", [b"no-store"])
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    body = (reason + "\n").encode("utf-8", "replace")
    request.setHeader(b"content-length", b"%d" % len(body))
    return body


def client_gone(request: Request) -> bool:
    """
    Whether there is nobody left to answer: the client went away (Twisted
    drops the request's channel then), or the answer is already complete.
    """
    return bool(request.finished) or getattr(request, "channel", None) is None


def _finish_text(request: Request, code: int, reason: str) -> None:
    if client_gone(request):
        return
    if request.startedWriting:
        # Too late for a status: never let a body look complete.
        abort_client(request)
        return
    body = _text(request, code, reason)
    request.write(body)
    request.finish()


def _redirect(request: Request, location: str) -> bytes:
    query = request.uri.partition(b"?")[2]
    target = location.encode() + (b"?" + query if query else b"")
    request.setHeader(b"location", target)
    return _text(request, 301, f"moved to {target.decode('latin-1')}")


def _header(request: Request, name: bytes) -> str | None:
    value = request.getHeader(name)
    return None if value is None else value.decode("latin-1")


def _segment(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise BadName("path is not valid UTF-8") from None


def _run(request: Request, coroutine: Coroutine[Any, Any, None]) -> int:
    """
    Answer C{request} with C{coroutine}; a client that leaves cancels it
    (so that it stops waiting for a download slot, say: what it shares with
    other requests is not cancelled for them).
    """

    def crashed(failure: Any) -> None:
        if failure.check(CancelledError):
            return  # the client left
        log.failure("request for {path} crashed", failure, path=request.path)
        _finish_text(request, 500, "internal error")

    answering = Deferred.fromCoroutine(coroutine)
    answering.addErrback(crashed)
    request.notifyFinish().addErrback(lambda _: answering.cancel())
    return NOT_DONE_YET


#: Page bodies go to a client this many bytes at a time, each once its
#: connection took the one before; a body this size or smaller is one write.
PAGE_SLICE = 64 * 1024


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


#: How many distinct C{Accept} / C{Accept-Encoding} values (of at most 256
#: bytes each: longer ones are worked out every time) have their answer kept.
NEGOTIATED_ENTRIES = 1024


class SimpleResource(Resource):
    """
    C{/simple/} and C{/simple/<project>/} in PEP 503 HTML or PEP 691 JSON.
    """

    isLeaf = True

    def __init__(self, pages: PageCache) -> None:
        super().__init__()
        self._pages = pages
        self._negotiated: dict[tuple[bytes | None, bytes | None], str | None] = {}
        self._accepts_gzip: dict[bytes, bool] = {}

    def _content_type(self, request: Request) -> str | None:
        accept = request.getHeader(b"accept")
        formats = request.args.get(b"format") if request.args else None
        fmt = formats[0] if formats else None
        cache_key = (accept, fmt)
        try:
            return self._negotiated[cache_key]
        except KeyError:
            pass
        chosen = negotiate(
            None if accept is None else accept.decode("latin-1"),
            None if fmt is None else fmt.decode("latin-1"),
        )
        if len(self._negotiated) < NEGOTIATED_ENTRIES and len(accept or b"") + len(fmt or b"") <= 256:
            self._negotiated[cache_key] = chosen
        return chosen

    def render_GET(self, request: Request) -> bytes | int:
        postpath = request.postpath or []
        prefix = "/" + "/".join(p.decode("latin-1") for p in request.prepath or [])
        if not postpath:
            return _redirect(request, prefix + "/")
        if len(postpath) > 2 or (len(postpath) == 2 and postpath[1]):
            return _text(request, 404, "not a Simple API path")
        try:
            raw = _segment(postpath[0])
            project = normalize(raw) if raw else None
        except BadName as e:
            return _text(request, 400, str(e))
        if project is not None and (raw != project or len(postpath) == 1):
            return _redirect(request, f"{prefix}/{quote(project)}/")
        content_type = self._content_type(request)
        if content_type is None:
            return _text(request, 406, "none of the Simple API's content types is acceptable")
        page = self._pages.fresh(project)
        if page is not None:
            body = self._respond(request, page, content_type, HIT)
            return NOT_DONE_YET if body is None else body
        return _run(request, self._fetch(request, project, content_type))

    def render_HEAD(self, request: Request) -> bytes | int:
        return self.render_GET(request)

    async def _fetch(self, request: Request, project: str | None, content_type: str) -> None:
        try:
            page, state = await self._pages.get(project)
        except NotFound:
            if self._pages.offline:
                _finish_text(request, 404, f"not cached, and offline: {project}")
            else:
                _finish_text(request, 404, f"no such project: {project}")
            return
        except UpstreamError as e:
            _finish_text(request, e.status, e.reason)
            return
        if client_gone(request):
            return
        body = self._respond(request, page, content_type, state)
        if body is None:
            return  # a PageSender has it
        if body:
            request.write(body)
        request.finish()

    def _gzip(self, request: Request) -> bool:
        header = request.getHeader(b"accept-encoding")
        if header is None:
            return False
        try:
            return self._accepts_gzip[header]
        except KeyError:
            pass
        answer = accepts_gzip(header.decode("latin-1"))
        if len(self._accepts_gzip) < NEGOTIATED_ENTRIES and len(header) <= 256:
            self._accepts_gzip[header] = answer
        return answer

    def _respond(self, request: Request, page: CachedPage, content_type: str, state: str) -> bytes | None:
        """
        Set the answer's status and headers; return a small body to write
        (C{b""}: none, for C{HEAD} and C{304}), or L{None} when a
        L{PageSender} was started for a big one.
        """
        gzipped = self._gzip(request)
        representation = page.representation(content_type, gzipped)
        max_age = max(0, math.ceil(self._pages.remaining(page)))
        headers = request.responseHeaders
        headers.setRawHeaders(b"content-type", [content_type.encode()])
        headers.setRawHeaders(b"vary", [b"Accept, Accept-Encoding"])
        headers.setRawHeaders(b"x-cache", [state.encode()])
        headers.setRawHeaders(b"cache-control", [b"max-age=%d" % max_age])
        headers.setRawHeaders(b"etag", [representation.etag.encode()])
        if state == STALE:
            headers.setRawHeaders(b"age", [b"%d" % max(0, int(self._pages.age(page)))])
        if etag_matches(_header(request, b"if-none-match"), representation.etag):
            request.setResponseCode(304)
            return b""
        if gzipped:
            headers.setRawHeaders(b"content-encoding", [b"gzip"])
        headers.setRawHeaders(b"content-length", [b"%d" % representation.length])
        if request.method == b"HEAD":
            return b""
        if not representation.inflate and representation.length <= PAGE_SLICE:
            return representation.data
        PageSender(request, representation).start()
        return None


class FilesResource(Resource):
    """
    C{/files/<project>/<filename>}: a file the project's index listed, from
    the cache or streamed from the upstream while it is cached.

    One owner per reader: the reader that L{FileCache.open} hands out is
    this resource's until it is given to a L{Sender} (which closes it when
    it ends); on every other path (HEAD, 304, 416, an error, a client gone)
    it is closed here, in one C{finally}.
    """

    isLeaf = True

    def __init__(self, files: FileCache, redirect_ttl: Callable[[], float | None] = lambda: None) -> None:
        """
        @param redirect_ttl: gives the lifetime of the presigned URLs that
            cached hits are redirected to, or L{None} to send every file
            through the proxy (read per request: SIGHUP may change it).
        """
        super().__init__()
        self._files = files
        self._redirect_ttl = redirect_ttl

    def render_GET(self, request: Request) -> bytes | int:
        postpath = request.postpath or []
        if len(postpath) != 2:
            return _text(request, 404, "file paths are /files/<project>/<filename>")
        try:
            raw_project = _segment(postpath[0])
            project = normalize(raw_project)
            filename = check_filename(_segment(postpath[1]))
        except BadName as e:
            return _text(request, 400, str(e))
        if raw_project != project:
            return _text(request, 404, f"project names in file paths are normalized: {project}")
        return _run(request, self._serve(request, project, filename))

    def render_HEAD(self, request: Request) -> bytes | int:
        return self.render_GET(request)

    async def _open(self, request: Request, project: str, filename: str, **how: bool) -> Opened | None:
        """
        Open the file, or answer the error and return L{None}.
        """
        try:
            return await self._files.open(project, filename, **how)
        except (NotListed, NotFound):
            _finish_text(request, 404, f"{project} has no file {filename}")
        except Busy as e:
            request.setHeader(b"retry-after", b"%d" % e.retry_after)
            _finish_text(request, 503, e.reason)
        except (UpstreamError, FlightFailed) as e:
            _finish_text(request, e.status, e.reason)
        return None

    async def _serve(self, request: Request, project: str, filename: str) -> None:
        head = request.method == b"HEAD"
        opened = await self._open(request, project, filename, fetch=not head)
        if opened is None:
            return
        source = opened.source
        try:
            if client_gone(request):
                return
            if not head and opened.hit and IRedirectable.providedBy(source):
                assert source is not None
                if await self._redirect(request, source, opened.sha256, project, filename):
                    return
                if client_gone(request):
                    return
            plan = self._plan(request, head, opened)
            first = b""
            if plan.body and source is not None:
                try:
                    first = await _first_read(source, plan)
                except Exception as e:
                    source.close()
                    source = None
                    if not opened.hit:
                        _finish_text(request, *_read_error(e))
                        return
                    # Nothing is sent yet: a cached file that cannot be read
                    # (its store failing, or the object gone) comes from the
                    # upstream instead.  Its record stays.
                    log.warn(
                        "cannot read cached {filename} ({error}); serving it from the upstream",
                        filename=filename,
                        error=describe(e),
                    )
                    opened = await self._open(request, project, filename, fetch=True, use_store=False)
                    if opened is None:
                        return
                    source = opened.source
                    if client_gone(request):
                        return
                    plan = self._plan(request, head, opened)
                    if plan.body and source is not None:
                        try:
                            first = await _first_read(source, plan)
                        except Exception as e2:
                            _finish_text(request, *_read_error(e2))
                            return
            if client_gone(request):
                return
            if plan.error:
                for name, value in plan.headers:
                    request.setHeader(name, value)
                _finish_text(request, plan.status, f"range not satisfiable: the file has {opened.size} bytes")
                return
            self._headers(request, opened, plan)
            if not plan.body or source is None:
                request.finish()
                return
            sender = Sender(request, source, plan.start, plan.end, first)
            source = None  # the sender's now: it closes it when it ends
        finally:
            if source is not None:
                source.close()
        self._files.senders.add(sender)
        try:
            await sender.start()
        finally:
            self._files.senders.discard(sender)
        size = opened.size
        whole = plan.start == 0 and (size is None or sender.sent == size)
        if whole and request.finished and not filename.endswith(".metadata"):
            self._files.downloaded(project, filename)

    @staticmethod
    def _plan(request: Request, head: bool, opened: Opened) -> FilePlan:
        return plan_file(
            head=head,
            size=opened.size,
            etag=None if opened.sha256 is None else f'"{opened.sha256}"',
            if_none_match=_header(request, b"if-none-match"),
            range_header=_header(request, b"range"),
            if_range=_header(request, b"if-range"),
        )

    @staticmethod
    def _headers(request: Request, opened: Opened, plan: FilePlan) -> None:
        request.setResponseCode(plan.status)
        headers = request.responseHeaders
        headers.setRawHeaders(b"content-type", [b"application/octet-stream"])
        headers.setRawHeaders(b"x-cache", [b"HIT" if opened.hit else b"MISS"])
        headers.setRawHeaders(b"cache-control", [FILE_CACHE_CONTROL])
        if opened.sha256 is not None:
            headers.setRawHeaders(b"etag", [f'"{opened.sha256}"'.encode()])
        for name, value in plan.headers:
            headers.setRawHeaders(name, [value])

    async def _redirect(
        self, request: Request, source: ByteSource, sha256: str | None, project: str, filename: str
    ) -> bool:
        """
        With C{--s3-redirect}, answer a cached hit with a C{302} to a
        presigned URL of the object, which honours C{Range} itself; C{False}
        when the proxy must send the file itself: redirects are off, the
        client's C{If-None-Match} names the file (a C{304} from here), its
        C{If-Range} names another version (the store's ETag is not ours, so
        only we can tell), or the URL could not be made.  The caller keeps
        the reader either way.
        """
        ttl = self._redirect_ttl()
        if ttl is None:
            return False
        etag = None if sha256 is None else f'"{sha256}"'
        if etag is not None and etag_matches(_header(request, b"if-none-match"), etag):
            return False
        if not range_applies(_header(request, b"if-range"), etag):
            return False
        try:
            url = await IRedirectable(source).url(ttl)
        except Exception:
            self._files.count_store_error("files")
            log.failure("could not presign a URL for {filename}; sending it through", filename=filename)
            return False
        if client_gone(request):
            return True
        headers = request.responseHeaders
        headers.setRawHeaders(b"location", [url.encode("ascii")])
        headers.setRawHeaders(b"x-cache", [b"HIT"])
        headers.setRawHeaders(b"cache-control", [b"no-store"])  # the URL expires
        request.write(_text(request, 302, "found in the file store"))
        request.finish()
        if request.getHeader(b"range") is None and not filename.endswith(".metadata"):
            self._files.downloaded(project, filename)
        return True


async def _first_read(source: ByteSource, plan: FilePlan) -> bytes:
    """
    The answer's first bytes, read before its status is sent, so that a
    source that fails at once still gets a clean error answer (or another
    source), not a cut connection.
    """
    length = CHUNK if plan.end is None else min(CHUNK, plan.end - plan.start)
    if length <= 0:
        return b""
    data = await source.read(plan.start, length)
    if not data and plan.end is not None:
        raise FlightFailed(502, "file ended before the range did")
    return data


def _read_error(error: Exception) -> tuple[int, str]:
    """
    The answer for a file whose first read failed.
    """
    if isinstance(error, (FlightFailed, UpstreamError)):
        return error.status, error.reason
    if isinstance(error, Unavailable):
        return 503, f"the file store is unavailable: {error}"
    log.failure("reading a file failed", Failure(error))
    return 502, "could not read the file"


class PeerResource(Resource):
    """
    C{/_peer/<group>/<project>/<filename>}: a download in progress here,
    streamed to another instance of the cluster whose client asked for the
    same file.  Only requests signed with the cluster's secret are answered
    (see L{txpypi.core.peer}); the file must be downloading here, so nothing is
    ever fetched for a peer.
    """

    isLeaf = True

    def __init__(self, files: FileCache, clock: IReactorTime) -> None:
        super().__init__()
        self._files = files
        self._clock = clock

    def render_GET(self, request: Request) -> bytes | int:
        secret = self._files.peer_secret
        if secret is None:
            return _text(request, 404, "this instance has no peers")
        path = (request.path or b"").decode("latin-1")
        if not verify(secret, path, _header(request, PEER_HEADER), self._clock.seconds()):
            return _text(request, 403, "peer requests must be signed with the cluster's secret")
        postpath = request.postpath or []
        if len(postpath) != 3:
            return _text(request, 404, "peer paths are /_peer/<group>/<project>/<filename>")
        try:
            group, project, filename = (_segment(part) for part in postpath)
        except BadName as e:
            return _text(request, 400, str(e))
        flight = self._files.peer_reader(group, project, filename)
        if flight is None:
            return _text(request, 404, f"{filename} is not downloading here")
        return _run(request, self._serve(request, flight))

    async def _serve(self, request: Request, flight: Flight) -> None:
        reader: FlightReader | None = flight.reader()
        try:
            try:
                await flight.wait_started()
            except FlightFailed as e:
                _finish_text(request, e.status, e.reason)
                return
            if client_gone(request):
                return
            request.setHeader(b"content-type", b"application/octet-stream")
            if flight.size is not None:
                request.setHeader(b"content-length", b"%d" % flight.size)
            assert reader is not None
            sender = Sender(request, reader)
            reader = None  # the sender's now
        finally:
            if reader is not None:
                reader.close()
        self._files.senders.add(sender)
        try:
            await sender.start()
        finally:
            self._files.senders.discard(sender)


class Root(Resource):
    """
    Dispatches the hot paths to cheap resources and everything else to Klein.
    """

    def __init__(self, simple: Resource, files: Resource, peer: Resource, fallback: IResource) -> None:
        super().__init__()
        self._simple = simple
        self._files = files
        self._peer = peer
        self._fallback = fallback

    def getChildWithDefault(self, path: bytes, request: Request) -> IResource:  # type: ignore[override]
        if path == b"simple":
            return self._simple
        if path == b"files":
            return self._files
        if path == b"_peer":
            return self._peer
        # Give Klein the whole path back.
        assert request.prepath is not None and request.postpath is not None
        request.postpath.insert(0, request.prepath.pop())
        return self._fallback


#: The largest request body accepted on a C{GET} or C{HEAD}, in bytes: no
#: route reads one.
MAX_GET_BODY = 4 * 1024
#: The largest request body accepted on any other method, in bytes: the
#: admin routes read none.  (Under Twisted's 100 000 bytes, past which it
#: would spool a body to a temporary file.)
MAX_REQUEST_BODY = 64 * 1024


@attrs.define
class ConnectionLimits:
    """
    The bounds on the clients' connections, shared by every listener of the
    process (every site that L{Proxy.site} makes), and read live: SIGHUP
    changes them.

    @ivar max_connections: the most connections open at once; past it, a
        new connection is closed at once.
    @ivar send_timeout: seconds a client may take no bytes of a response
        before it is cut off; also the time a request may take to arrive
        from its first byte, and the idle timeout of a keep-alive
        connection between requests.
    @ivar open: the connections open now.
    """

    max_connections: int = 1024
    send_timeout: float = 60.0
    open: int = 0
    #: Whether the refusals since the limit was last reached were logged.
    full_logged: bool = False


def _reset(transport: Any) -> None:
    """
    Abort a connection with a reset, not a FIN, so that nothing lingers in
    the kernel for a client that does not read: Twisted's TCP transport
    closes an aborted socket with C{SO_LINGER} 0 (what L{abort_client} sets
    by hand), and under TLS the TCP transport below is aborted.
    """
    transport.abortConnection()


def _peer(transport: Any) -> str:
    peer = transport.getPeer() if transport is not None else None
    return str(getattr(peer, "host", peer))


class ProxyRequest(Request):
    """
    A request whose body is held in memory and counted by its
    L{ProxyChannel}, which refuses one past L{MAX_REQUEST_BODY} bytes.
    """

    def gotLength(self, length: int | None) -> None:
        # Twisted spools a body of unknown (chunked) or large declared
        # length to a temporary file; the channel bounds it to a few KiB.
        self.content = BytesIO()

    def handleContentChunk(self, data: bytes) -> None:
        channel = self.channel
        if isinstance(channel, ProxyChannel) and not channel.body_received(len(data)):
            return
        super().handleContentChunk(data)


class ProxyChannel(HTTPChannel):
    """
    An HTTP/1.1 connection that no client can hold forever:

      - A client that takes no bytes of a response for C{send_timeout}
        seconds is cut off with a reset.  The channel is its transport's
        producer: the transport pauses it when the client stops taking
        bytes and resumes it when the client takes them again, so this
        covers every response, whatever wrote it.
      - A request (its line, headers and body) must arrive within
        C{send_timeout} seconds of its first byte, or it gets a C{408} and
        the connection is closed (a client trickling a byte at a time would
        otherwise reset the idle timeout forever); and a keep-alive
        connection idle for C{send_timeout} between requests is closed (the
        channel's idle timeout, C{timeOut}, set by L{ProxySite}).
      - A request body past L{MAX_GET_BODY} on C{GET} and C{HEAD}, or past
        L{MAX_REQUEST_BODY} on any other method, gets a C{413} and the
        connection is closed, before the body is read: a declared
        C{Content-Length} is checked once the headers are complete, and a
        chunked body is counted as it arrives.

    The limits are the site's L{ConnectionLimits}, read live.
    """

    site: ProxySite
    #: Cuts the client off once a pause lasted C{send_timeout}.
    _stalled: IDelayedCall | None = None
    #: Closes the connection if the request in progress is not all there
    #: in C{send_timeout}.
    _deadline: IDelayedCall | None = None
    _counted = False
    _refused = False
    _body_limit = MAX_REQUEST_BODY
    _body_seen = 0

    @property
    def _limits(self) -> ConnectionLimits:
        return self.site.connections

    def connectionMade(self) -> None:
        self._limits.open += 1
        self._counted = True
        super().connectionMade()

    def connectionLost(self, reason: Failure) -> None:  # type: ignore[override]
        if self._counted:
            self._counted = False
            limits = self._limits
            limits.open -= 1
            if limits.open < limits.max_connections:
                limits.full_logged = False
        self._cancel_stalled()
        self._cancel_deadline()
        super().connectionLost(reason)

    # -- the client takes no bytes

    def pauseProducing(self) -> None:
        if self._stalled is None and not self._refused:
            self._stalled = self.callLater(self._limits.send_timeout, self._send_timed_out)
        super().pauseProducing()

    def resumeProducing(self) -> None:
        self._cancel_stalled()
        super().resumeProducing()

    def _cancel_stalled(self) -> None:
        if self._stalled is not None:
            if self._stalled.active():
                self._stalled.cancel()
            self._stalled = None

    def _send_timed_out(self) -> None:
        self._stalled = None
        seconds = self._limits.send_timeout
        log.info(
            "cut off {client}: it took no bytes for {seconds:g} s (send-timeout)",
            client=_peer(self.transport),
            seconds=seconds,
        )
        self.site.metrics.client_timeouts.labels("send").inc()
        _reset(self.transport)

    # -- the request arrives too slowly

    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            return
        if self._deadline is None and not self._handlingRequest and data:
            self._deadline = self.callLater(self._limits.send_timeout, self._request_timed_out)
        super().dataReceived(data)

    def _cancel_deadline(self) -> None:
        if self._deadline is not None:
            if self._deadline.active():
                self._deadline.cancel()
            self._deadline = None

    def _request_timed_out(self) -> None:
        self._deadline = None
        seconds = self._limits.send_timeout
        log.info(
            "closed the connection of {client}: its request took over {seconds:g} s to arrive (send-timeout)",
            client=_peer(self.transport),
            seconds=seconds,
        )
        self.site.metrics.client_timeouts.labels("request").inc()
        self._refuse(408, b"Request Timeout", f"the request did not arrive within {seconds:g} s")

    def allContentReceived(self) -> None:
        if self._refused:
            return
        self._cancel_deadline()
        super().allContentReceived()

    # -- bodies

    def allHeadersReceived(self) -> None:
        get = self._command in (b"GET", b"HEAD")
        self._body_limit = MAX_GET_BODY if get else MAX_REQUEST_BODY
        self._body_seen = 0
        if self.length is not None and self.length > self._body_limit:
            self._refuse_body()
            return
        super().allHeadersReceived()

    def rawDataReceived(self, data: bytes) -> None:
        if self._refused:
            return
        super().rawDataReceived(data)

    def body_received(self, size: int) -> bool:
        """
        Count C{size} more bytes of the request's body; C{False} once they
        are past the limit, and the request is refused.
        """
        if self._refused:
            return False
        self._body_seen += size
        if self._body_seen > self._body_limit:
            self._refuse_body()
            return False
        return True

    def _refuse_body(self) -> None:
        on = " on GET and HEAD" if self._body_limit == MAX_GET_BODY else ""
        reason = f"request body too large: at most {self._body_limit} bytes{on}"
        self._refuse(413, b"Content Too Large", reason)

    def _refuse(self, code: int, phrase: bytes, reason: str) -> None:
        """
        Answer C{code} with a one-line reason, count it, and close the
        connection without reading any more of it.
        """
        if self._refused:
            return
        self._refused = True
        self._cancel_deadline()
        path = getattr(self, "_path", b"") or b""
        self.site.metrics.requests.labels(route_of(path.partition(b"?")[0]), str(code)).inc()
        body = (reason + "\n").encode()
        assert self.transport is not None
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\n"
            b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (code, phrase, len(body), body)
        )
        self.loseConnection()


class RefusedConnection(Protocol):
    """
    A connection past L{ConnectionLimits.max_connections}: closed at once.
    (A factory may return L{None} instead, but the TLS wrapper would wrap
    it.)
    """

    def connectionMade(self) -> None:
        assert self.transport is not None
        _reset(self.transport)


class ProxySite(Site):
    """
    The site: counts every request in the metrics and writes the access log
    line once the response is done.  Its connections are L{ProxyChannel}s,
    within the L{ConnectionLimits} it shares with the process's other
    sites.
    """

    protocol = ProxyChannel  # type: ignore[assignment]
    requestFactory = ProxyRequest

    def __init__(
        self,
        resource: IResource,
        clock: Any,
        metrics: Metrics,
        log_format: str = "combined",
        trusted_proxies: frozenset[str] = frozenset(),
        connections: ConnectionLimits | None = None,
    ) -> None:
        # The clock is the reactor of the channels' timeouts too.
        super().__init__(resource, reactor=clock)
        self._clock = clock
        self._metrics = metrics
        self.log_format = log_format
        self.trusted_proxies = trusted_proxies
        self.connections = ConnectionLimits() if connections is None else connections
        self.displayTracebacks = False

    @property
    def metrics(self) -> Metrics:
        return self._metrics

    def buildProtocol(self, addr: IAddress | None) -> Any:
        limits = self.connections
        if limits.open >= limits.max_connections:
            self._metrics.connections_refused.inc()
            if not limits.full_logged:
                limits.full_logged = True
                log.warn(
                    "refusing new connections: {open} are open, the most max-connections allows",
                    open=limits.open,
                )
            return RefusedConnection()
        channel: ProxyChannel = super().buildProtocol(addr)
        channel.timeOut = limits.send_timeout  # type: ignore[assignment]  # idle timeout between requests
        return channel

    def acceptableProtocols(self) -> list[bytes]:
        """
        Only HTTP/1.1 in TLS's ALPN: the channel is not an HTTP/2 one, even
        where the h2 package would let Twisted offer it.
        """
        return [b"http/1.1"]

    def getResourceFor(self, request: Request) -> IResource:  # type: ignore[override]
        request.txpypi_started = self._clock.seconds()  # type: ignore[attr-defined]
        resource: IResource = super().getResourceFor(request)
        return resource

    def log(self, request: Request) -> None:  # type: ignore[override]
        now: float = self._clock.seconds()
        duration = now - getattr(request, "txpypi_started", now)
        route = route_of(request.path)
        code = request.code
        self._metrics.requests.labels(route, str(code)).inc()
        self._metrics.latency.labels(route).observe(duration)
        cache = request.responseHeaders.getRawHeaders(b"x-cache")
        state = cache[0].decode() if cache else ""
        size = request.sentLength
        if state:
            kind = "file" if route in ("file", "metadata") else "page"
            self._metrics.cache.labels(kind, state.lower()).inc()
            if code in (200, 206):
                self._metrics.bytes_served.labels("upstream" if state == "MISS" else "cache").inc(size)
        if self.log_format == "none":
            return
        peer = request.getClientAddress()
        entry = Entry(
            client=client_address(
                getattr(peer, "host", "-"),
                _header(request, b"x-forwarded-for"),
                self.trusted_proxies,
            ),
            method=request.method.decode("latin-1"),
            path=request.uri.decode("latin-1"),
            protocol=request.clientproto.decode("latin-1"),
            status=code,
            size=size,
            duration=duration,
            cache=state,
            referer=_header(request, b"referer") or "-",
            user_agent=_header(request, b"user-agent") or "-",
            time=now,
        )
        line = json_line(entry) if self.log_format == "json" else combined(entry)
        access_log.info("{access}", access=line)


access_log = Logger(namespace="txpypi.access")

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

#: How long C{/} and C{/stats} keep a download-statistics query, and
#: C{/health} its probe of the stores, in seconds.
MEMO_TTL = 1.0
#: The most distinct query results kept (C{/stats?project=} takes any
#: name).
MEMO_ENTRIES = 128


@attrs.define
class Memo(Generic[K, V]):
    """
    The results of slow calls, kept for C{ttl} seconds per key.  Callers of
    one key while its call runs share it (a L{SingleFlight}: one whose
    client goes away cancels only its own wait).  Failures are not kept.
    At most C{max_entries} results are kept, the oldest dropped first; the
    calls running at once are as many as the requests waiting for them at
    most, which C{--max-connections} bounds.
    """

    _clock: IReactorTime
    ttl: float = MEMO_TTL
    max_entries: int = MEMO_ENTRIES
    _kept: dict[K, tuple[float, V]] = attrs.field(factory=dict)
    _flights: SingleFlight[K, V] = attrs.field(factory=SingleFlight)

    def get(self, key: K, call: Callable[[], Coroutine[Any, Any, V]]) -> Deferred[V]:
        kept = self._kept.get(key)
        if kept is not None and self._clock.seconds() < kept[0]:
            return succeed(kept[1])
        return self._flights.run(key, lambda: self._keep(key, call))

    async def _keep(self, key: K, call: Callable[[], Coroutine[Any, Any, V]]) -> V:
        value = await call()
        now = self._clock.seconds()
        for old in [k for k, (until, _) in self._kept.items() if until <= now or k == key]:
            del self._kept[old]
        while len(self._kept) >= self.max_entries:
            del self._kept[next(iter(self._kept))]
        self._kept[key] = (now + self.ttl, value)
        return value


@attrs.define(slots=False)
class Proxy:
    """
    The proxy: its caches, and the Klein routes that are not hot paths.
    """

    pages: PageCache
    files: FileCache
    clock: Any
    metrics: Metrics = attrs.field(factory=Metrics.create)
    admin_token: str | None = None
    log_format: str = "combined"
    trusted_proxies: frozenset[str] = frozenset()
    #: With C{--s3-redirect}: the lifetime of presigned URLs for cached hits.
    s3_redirect_ttl: float | None = None
    sites: list[ProxySite] = attrs.field(factory=list)
    #: The stores watched for outages (L{txpypi.storage.outages}), for C{/health}.
    outages: tuple[Outage, ...] = ()
    #: The bounds on client connections, shared by all of its sites.
    connections: ConnectionLimits = attrs.field(factory=ConnectionLimits)
    app = Klein()

    def __attrs_post_init__(self) -> None:
        self.metrics.watch(self._state)
        # One query per second at most, however many ask (see MEMO_TTL).
        self._top: Memo[int, list[tuple[str, int]]] = Memo(self.clock)
        self._project_rows: Memo[str, list[tuple[str, str, int]]] = Memo(self.clock)
        self._probed: Memo[None, dict[str, Any] | None] = Memo(self.clock)

    def _state(self) -> dict[str, float]:
        files = self.files
        return {
            "txpypi_cache_bytes": files.size or 0,
            "txpypi_cache_files": files.count or 0,
            "txpypi_cache_max_bytes": files.max_size or 0,
            "txpypi_downloads_in_flight": len(files.flights),
            "txpypi_download_clients": sum(f.clients for f in files.flights.values()),
            "evictions": files.evictions,
            "txpypi_connections_open": self.connections.open,
        }

    def site(self) -> ProxySite:
        root = Root(
            SimpleResource(self.pages),
            FilesResource(self.files, lambda: self.s3_redirect_ttl),
            PeerResource(self.files, self.clock),
            self.app.resource(),
        )
        site = ProxySite(
            root, self.clock, self.metrics, self.log_format, self.trusted_proxies, self.connections
        )
        self.sites.append(site)
        return site

    def _sample(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    @app.route("/", methods=["GET", "HEAD"])
    async def home(self, request: Request) -> bytes:
        """
        The status page, for people: plain HTML, no JavaScript.
        """
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        host = (request.getHeader(b"host") or b"localhost").decode("latin-1")
        scheme = "https" if request.isSecure() else "http"
        index = f"{scheme}://{host}/simple/"
        client = self.files._client
        state = "offline" if self.pages.offline else client.state()
        hits = sum(self._sample("txpypi_cache_answers_total", kind=k, result="hit") for k in ("page", "file"))
        misses = sum(
            self._sample("txpypi_cache_answers_total", kind=k, result="miss") for k in ("page", "file")
        )
        saved = self._sample("txpypi_served_bytes_total", source="cache")
        figures = StatusFigures(
            version=__version__,
            upstream=self.pages.upstream.url,
            upstream_state=state,
            files=self.files.count,
            size=self.files.size or 0,
            max_size=self.files.max_size,
            hit_ratio=None if hits + misses == 0 else hits / (hits + misses),
            saved=int(saved),
            in_flight=len(self.files.flights),
            top=await self._top.get(10, lambda: self.files.top_projects(10)),
            index_url=index,
        )
        return render_status(figures)

    @app.route("/stats", methods=["GET"])
    async def stats(self, request: Request) -> bytes:
        """
        Download counts as JSON: the top projects (C{?top=N}, default 20), and
        one project's versions and files with C{?project=NAME}.
        """
        args = request.args or {}
        try:
            top = min(1000, max(1, int((args.get(b"top") or [b"20"])[0])))
        except ValueError:
            return _text(request, 400, "top must be a number")
        top_rows = await self._top.get(top, lambda: self.files.top_projects(top))
        body: dict[str, Any] = {"top": [{"project": p, "downloads": n} for p, n in top_rows]}
        project = args.get(b"project")
        if project:
            try:
                name = normalize(project[0].decode("utf-8", "replace"))
            except BadName as e:
                return _text(request, 400, str(e))
            rows = await self._project_rows.get(name, lambda: self.files.project_downloads(name))
            versions: dict[str, int] = {}
            for version, _, n in rows:
                versions[version] = versions.get(version, 0) + n
            body["project"] = {
                "name": name,
                "downloads": sum(n for _, _, n in rows),
                "versions": versions,
                "files": {f: n for _, f, n in rows},
            }
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(body, indent=2).encode() + b"\n"

    @app.route("/metrics", methods=["GET"])
    def metrics_page(self, request: Request) -> bytes:
        request.setHeader(b"content-type", METRICS_CONTENT_TYPE.encode())
        return self.metrics.render()

    @app.route("/health", methods=["GET"])
    async def health(self, request: Request) -> bytes:
        """
        The proxy's state as JSON.  C{200} while it can serve, even degraded
        (the upstream or a store failing: files then come from the upstream
        uncached, and a Redis outage must not take every instance out of a
        load balancer at once); C{503} when a store it cannot do without
        (its local SQLite database) fails.
        """
        client = self.files._client
        upstream: dict[str, Any] = {
            "url": self.pages.upstream.url,
            "state": "offline" if self.pages.offline else client.state(),
            "last_success": client.last_success,
            "last_error": None
            if client.last_error is None
            else {"at": client.last_error[0], "reason": client.last_error[1]},
        }
        unwatched_metadata = await self._probed.get(None, self._probe_stores)
        watched = {o.store: o for o in self.outages}
        file_store: dict[str, Any] = {"state": "ok"}
        if "files" in watched:
            file_store = watched["files"].health()
        spool_error = self.files.spool_error()
        if spool_error and file_store["state"] == "ok":
            file_store = {"state": "degraded", "reason": spool_error}
        if "metadata" in watched:
            metadata = watched["metadata"].health()
        else:
            metadata = unwatched_metadata or {"state": "ok"}
        fatal = watched["metadata"].fatal if "metadata" in watched else True
        serving = metadata["state"] == "ok" or not fatal
        degraded = upstream["state"] == "degraded" or file_store["state"] != "ok" or metadata["state"] != "ok"
        body = {
            "status": "failing" if not serving else "degraded" if degraded else "ok",
            "version": __version__,
            "upstream": upstream,
            "file_store": file_store,
            "metadata_store": metadata,
            "cache": {"bytes": self.files.size, "files": self.files.count, "max_bytes": self.files.max_size},
        }
        request.setResponseCode(200 if serving else 503)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(body, indent=2).encode() + b"\n"

    async def _probe_stores(self) -> dict[str, Any] | None:
        """
        Ask each watched store now (waiting 1 s at most, and not at all for
        one known down), so that one that just failed shows at once; and
        ping an unwatched metadata store, whose state this returns.
        """
        await DeferredList([Deferred.fromCoroutine(o.check(CHECK_WAIT)) for o in self.outages])
        if any(o.store == "metadata" for o in self.outages):
            return None
        try:
            await self.files.metadata_ping()
        except Exception as e:
            return {"state": "failing", "reason": repr(e)}
        return {"state": "ok"}

    # -- administration: only with the bearer token

    def _refused(self, request: Request) -> bytes | None:
        """
        The answer when the request may not administer, else L{None}.
        """
        if self.admin_token is None:
            return _text(request, 404, "not found: no admin token is configured")
        given = _header(request, b"authorization") or ""
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), self.admin_token.encode()
        ):
            request.setHeader(b"www-authenticate", b'Bearer realm="txpypi"')
            return _text(request, 401, "a valid admin bearer token is required")
        return None

    @app.route("/cache/", methods=["DELETE"])
    async def forget_list(self, request: Request) -> bytes:
        """
        Forget the project list: the cache of C{/simple/}, as
        C{/cache/<project>} is that of C{/simple/<project>/}.
        """
        refused = self._refused(request)
        if refused is not None:
            return refused
        await self.pages.forget(None)
        return _text(request, 200, "forgot the project list")

    @app.route("/cache/<project>", methods=["DELETE"])
    async def forget_project(self, request: Request, project: str) -> bytes:
        """
        Forget one project's index page.  C{/cache/list} was the route of
        the project list, and a project is named C{list}: it forgets both,
        which is harmless, so neither shadows the other.
        """
        refused = self._refused(request)
        if refused is not None:
            return refused
        try:
            name = normalize(project)
        except BadName as e:
            return _text(request, 400, str(e))
        await self.pages.forget(name)
        if project == "list":
            await self.pages.forget(None)
            both = "forgot the index page of list and the project list (that is DELETE /cache/ now)"
            return _text(request, 200, both)
        return _text(request, 200, f"forgot the index page of {name}")

    @app.route("/cache/<project>/<filename>", methods=["DELETE"])
    async def purge_file(self, request: Request, project: str, filename: str) -> bytes:
        refused = self._refused(request)
        if refused is not None:
            return refused
        try:
            name = normalize(project)
            check_filename(filename)
        except BadName as e:
            return _text(request, 400, str(e))
        if not await self.files.purge(name, filename):
            return _text(request, 404, f"{name} has no cached file {filename}")
        return _text(request, 200, f"purged {filename}")

    @app.handle_errors(Exception)  # type: ignore[arg-type]
    def error(self, request: Request, failure: Any) -> bytes:
        code = getattr(failure.value, "code", None)
        if code in (404, 405):
            return _text(request, code, "not found" if code == 404 else "method not allowed")
        if failure.check(Unavailable):
            # A store is down (its outage is logged once): say so, briefly.
            return _text(request, 503, f"unavailable: {failure.value}")
        log.failure("error in {path}", failure, path=request.path)
        return _text(request, 500, "internal error")

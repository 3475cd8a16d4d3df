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
from collections.abc import Callable, Coroutine
from typing import Any
from urllib.parse import quote

import attrs
from klein import Klein
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.web.resource import IResource, Resource
from twisted.web.server import NOT_DONE_YET, Request, Site
from zope.interface import implementer

from txpypi import __version__
from txpypi.accesslog import Entry, client_address, combined, json_line
from txpypi.download import ByteSource, Flight, FlightFailed, FlightReader, Sender, abort_client
from txpypi.files import FileCache, NotListed
from txpypi.httpheaders import Unsatisfiable, accepts_gzip, etag_matches, parse_range
from txpypi.index import negotiate
from txpypi.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from txpypi.metrics import Metrics, route_of
from txpypi.names import BadName, check_filename, normalize
from txpypi.outages import CHECK_WAIT, Outage, Unavailable
from txpypi.pages import HIT, STALE, CachedPage, NotFound, PageCache, Representation
from txpypi.peer import HEADER as PEER_HEADER
from txpypi.peer import verify
from txpypi.statuspage import StatusFigures, render_status
from txpypi.stores import IRedirectable
from txpypi.upstream import UpstreamError

log = Logger()

FILE_CACHE_CONTROL = b"public, max-age=365000000, immutable"


def _text(request: Request, code: int, reason: str) -> bytes:
    """
    A one-line plain-text answer.
    """
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"text/plain; charset=utf-8")
    body = (reason + "\n").encode("utf-8", "replace")
    request.setHeader(b"content-length", b"%d" % len(body))
    return body


def _finish_text(request: Request, code: int, reason: str) -> None:
    if request._disconnected or request.finished:
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
    def crashed(failure: Any) -> None:
        log.failure("request for {path} crashed", failure, path=request.path)
        _finish_text(request, 500, "internal error")

    Deferred.fromCoroutine(coroutine).addErrback(crashed)
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
        if len(self._negotiated) < 1024:
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
        if request._disconnected:
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
        if len(self._accepts_gzip) < 1024:
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

    async def _serve(self, request: Request, project: str, filename: str) -> None:
        head = request.method == b"HEAD"
        try:
            opened = await self._files.open(project, filename, fetch=not head)
        except (NotListed, NotFound):
            _finish_text(request, 404, f"{project} has no file {filename}")
            return
        except (UpstreamError, FlightFailed) as e:
            _finish_text(request, e.status, e.reason)
            return
        source = opened.source
        if request._disconnected:
            if source is not None:
                source.close()
            return
        if not head and opened.hit and IRedirectable.providedBy(source):
            assert source is not None
            if await self._redirect(request, source, opened.sha256, project, filename):
                return
            if request._disconnected:
                source.close()
                return
        headers = request.responseHeaders
        headers.setRawHeaders(b"content-type", [b"application/octet-stream"])
        headers.setRawHeaders(b"x-cache", [b"HIT" if opened.hit else b"MISS"])
        headers.setRawHeaders(b"cache-control", [FILE_CACHE_CONTROL])
        etag = None if opened.sha256 is None else f'"{opened.sha256}"'
        if etag is not None:
            headers.setRawHeaders(b"etag", [etag.encode()])
        size = opened.size
        start, end = 0, size
        if size is not None:
            headers.setRawHeaders(b"accept-ranges", [b"bytes"])
        if etag is not None and etag_matches(_header(request, b"if-none-match"), etag):
            request.setResponseCode(304)
            source = None
        elif size is not None and not head and self._range_applies(request, etag):
            try:
                wanted = parse_range(_header(request, b"range"), size)
            except Unsatisfiable:
                headers.setRawHeaders(b"content-range", [b"bytes */%d" % size])
                if source is not None:
                    source.close()
                _finish_text(request, 416, f"range not satisfiable: the file has {size} bytes")
                return
            if wanted is not None:
                start, end = wanted
                request.setResponseCode(206)
                headers.setRawHeaders(b"content-range", [b"bytes %d-%d/%d" % (start, end - 1, size)])
                if isinstance(source, FlightReader):
                    source.stop = end  # hold the range's last byte until verified
        if end is not None:
            headers.setRawHeaders(b"content-length", [b"%d" % (end - start)])
        if source is None or head or request.code == 304:
            if source is not None:
                source.close()
            request.finish()
            return
        sender = Sender(request, source, start, end)
        self._files.senders.add(sender)
        try:
            await sender.start()
        finally:
            self._files.senders.discard(sender)
        whole = start == 0 and (size is None or sender.sent == size)
        if whole and request.finished and not filename.endswith(".metadata"):
            self._files.downloaded(project, filename)

    async def _redirect(
        self, request: Request, source: ByteSource, sha256: str | None, project: str, filename: str
    ) -> bool:
        """
        With C{--s3-redirect}, answer a cached hit with a C{302} to a
        presigned URL of the object, which honours C{Range} itself; C{False}
        when the proxy must send the file itself: redirects are off, the
        client's C{If-None-Match} names the file (a C{304} from here), its
        C{If-Range} names another version (the store's ETag is not ours, so
        only we can tell), or the URL could not be made.
        """
        ttl = self._redirect_ttl()
        if ttl is None:
            return False
        etag = None if sha256 is None else f'"{sha256}"'
        if etag is not None and etag_matches(_header(request, b"if-none-match"), etag):
            return False
        if not self._range_applies(request, etag):
            return False
        try:
            url = await IRedirectable(source).url(ttl)
        except Exception:
            self._files._store_error("files")
            log.failure("could not presign a URL for {filename}; sending it through", filename=filename)
            return False
        source.close()
        if request._disconnected:
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

    @staticmethod
    def _range_applies(request: Request, etag: str | None) -> bool:
        """
        A C{Range} counts unless an C{If-Range} names another version.
        """
        if_range = _header(request, b"if-range")
        return if_range is None or (etag is not None and if_range.strip() == etag)


class PeerResource(Resource):
    """
    C{/_peer/<group>/<project>/<filename>}: a download in progress here,
    streamed to another instance of the cluster whose client asked for the
    same file.  Only requests signed with the cluster's secret are answered
    (see L{txpypi.peer}); the file must be downloading here, so nothing is
    ever fetched for a peer.
    """

    isLeaf = True

    def __init__(self, files: FileCache, clock: Any) -> None:
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
        reader = flight.reader()
        try:
            await flight.wait_started()
        except FlightFailed as e:
            reader.close()
            _finish_text(request, e.status, e.reason)
            return
        request.setHeader(b"content-type", b"application/octet-stream")
        if flight.size is not None:
            request.setHeader(b"content-length", b"%d" % flight.size)
        sender = Sender(request, reader)
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


class ProxySite(Site):
    """
    The site: counts every request in the metrics and writes the access log
    line once the response is done.
    """

    def __init__(
        self,
        resource: IResource,
        clock: Any,
        metrics: Metrics,
        log_format: str = "combined",
        trusted_proxies: frozenset[str] = frozenset(),
    ) -> None:
        super().__init__(resource)
        self._clock = clock
        self._metrics = metrics
        self.log_format = log_format
        self.trusted_proxies = trusted_proxies
        self.displayTracebacks = False

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
    #: The stores watched for outages (L{txpypi.outages}), for C{/health}.
    outages: tuple[Outage, ...] = ()
    app = Klein()

    def __attrs_post_init__(self) -> None:
        self.metrics.watch(self._state)

    def _state(self) -> dict[str, float]:
        files = self.files
        return {
            "txpypi_cache_bytes": files.size or 0,
            "txpypi_cache_files": files.count or 0,
            "txpypi_cache_max_bytes": files.max_size or 0,
            "txpypi_downloads_in_flight": len(files.flights),
            "txpypi_download_clients": sum(f.clients for f in files.flights.values()),
            "evictions": files.evictions,
        }

    def site(self) -> ProxySite:
        root = Root(
            SimpleResource(self.pages),
            FilesResource(self.files, lambda: self.s3_redirect_ttl),
            PeerResource(self.files, self.clock),
            self.app.resource(),
        )
        site = ProxySite(root, self.clock, self.metrics, self.log_format, self.trusted_proxies)
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
            top=await self.files.top_projects(10),
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
        body: dict[str, Any] = {
            "top": [{"project": p, "downloads": n} for p, n in await self.files.top_projects(top)]
        }
        project = args.get(b"project")
        if project:
            try:
                name = normalize(project[0].decode("utf-8", "replace"))
            except BadName as e:
                return _text(request, 400, str(e))
            rows = await self.files.project_downloads(name)
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
        # Ask each watched store now (waiting 1 s at most, and not at all
        # for one known down): one that just failed shows at once.
        await DeferredList([Deferred.fromCoroutine(o.check(CHECK_WAIT)) for o in self.outages])
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
            try:
                await self.files.metadata_ping()
                metadata = {"state": "ok"}
            except Exception as e:
                metadata = {"state": "failing", "reason": repr(e)}
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

    @app.route("/cache/list", methods=["DELETE"])
    async def forget_list(self, request: Request) -> bytes:
        refused = self._refused(request)
        if refused is not None:
            return refused
        await self.pages.forget(None)
        return _text(request, 200, "forgot the project list")

    @app.route("/cache/<project>", methods=["DELETE"])
    async def forget_project(self, request: Request, project: str) -> bytes:
        refused = self._refused(request)
        if refused is not None:
            return refused
        try:
            name = normalize(project)
        except BadName as e:
            return _text(request, 400, str(e))
        await self.pages.forget(name)
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

"""
C{/files/<project>/<filename>}: a file from the cache, or streamed from the
upstream while it is cached.  The HTTP rules of the answer (validators,
ranges, HEAD, C{304}, C{416}, whether a presigned URL may answer) are the
pure plan of L{txpypi.core.fileplan}; this resource acts on it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import attrs
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import Resource
from twisted.web.server import Request

from txpypi.cache.files import Busy, FileCache, NotListed, Opened
from txpypi.cache.groupfiles import GroupFiles
from txpypi.cache.pages import NotFound
from txpypi.cache.policy import PolicyRefused
from txpypi.cache.provenance import PROVENANCE_TYPE
from txpypi.core.fileplan import FilePlan, plan_file
from txpypi.core.names import BadName, check_filename, is_normalized, normalize
from txpypi.core.simple.formats import PROVENANCE_SUFFIX
from txpypi.fetch.upstream import UpstreamError
from txpypi.fetch.wanted import ByteSource, FlightFailed
from txpypi.storage.outages import Unavailable, describe
from txpypi.storage.stores import ILocalFile, IRedirectable
from txpypi.web.answers import (
    Answer,
    client_gone,
    error_text,
    finish_answer,
    finish_error,
    finish_text,
    header,
    run,
    segment,
    status_of,
    text,
)
from txpypi.web.quick import NOT_MODIFIED, OK, Dates, FileBody, QuickRequest, header_lines
from txpypi.web.sender import CHUNK, Sender, from_spool, send_among, sender_for

log = Logger(namespace="txpypi.app")

FILE_CACHE_CONTROL = b"public, max-age=365000000, immutable"

#: The largest cached file the quick lane answers (L{txpypi.web.quick}),
#: read whole and written at once: a client that stops reading holds at
#: most this much of the proxy's memory, for at most C{--send-timeout}.
QUICK_FILE_MOST = 128 * 1024

_STATUS_LINES = {200: OK, 304: NOT_MODIFIED}

#: What opening a file may fail with that the client is told about; any
#: other failure is a crash (a C{500}, logged).
OPEN_ERRORS = (NotListed, NotFound, Busy, UpstreamError, FlightFailed, PolicyRefused)
#: What a first read may fail with that the client is told about; any other
#: failure is logged, and a C{502}.
READ_ERRORS = (FlightFailed, UpstreamError, Unavailable)


@attrs.define
class Held:
    """
    The reader of an answer in the making: the resource's until a L{Sender}
    takes it (L{take}); closed by L{close} on every other path.
    """

    opened: Opened
    source: ByteSource | None = None

    @classmethod
    def of(cls, opened: Opened) -> Held:
        return cls(opened, opened.source)

    def take(self) -> ByteSource:
        source, self.source = self.source, None
        assert source is not None
        return source

    def close(self) -> None:
        source, self.source = self.source, None
        if source is not None:
            source.close()


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

    def __init__(
        self,
        files: FileCache | GroupFiles,
        redirect_ttl: Callable[[], float | None] = lambda: None,
        senders: set[Sender] | None = None,
        accel_prefix: Callable[[], str | None] = lambda: None,
    ) -> None:
        """
        @param redirect_ttl: gives the lifetime of the presigned URLs that
            cached hits are redirected to, or L{None} to send every file
            through the proxy (read per request: SIGHUP may change it).
        @param senders: where the senders of bodies in progress are kept
            while they send (for the shutdown to wait for them).
        @param accel_prefix: gives the prefix of the C{X-Accel-Redirect}
            that answers a hit on the local disk (C{--accel-redirect}), or
            L{None} to send those files here (read per request).
        """
        super().__init__()
        self._files = files
        self._redirect_ttl = redirect_ttl
        self._accel_prefix = accel_prefix
        self._senders: set[Sender] = set() if senders is None else senders

    def render_GET(self, request: Request) -> bytes | int:
        postpath = request.postpath or []
        if len(postpath) != 2:
            return text(request, 404, "file paths are /files/<project>/<filename>")
        try:
            raw_project = segment(postpath[0])
            project = normalize(raw_project)
            filename = check_filename(segment(postpath[1]))
        except BadName as e:
            return error_text(request, e)
        if raw_project != project:
            return text(request, 404, f"project names in file paths are normalized: {project}")
        if filename.endswith(PROVENANCE_SUFFIX):
            return run(request, self._provenance(request, project, filename.removesuffix(PROVENANCE_SUFFIX)))
        return run(request, self._serve(request, project, filename))

    async def _provenance(self, request: Request, project: str, filename: str) -> None:
        """
        A file's provenance object (PEP 740), immutable like the file.
        """
        files = self._files
        try:
            if not isinstance(files, GroupFiles):
                raise NotListed(f"{filename} has no provenance")
            body = await files.provenance(project, filename)
        except OPEN_ERRORS as e:
            finish_error(request, e, missing=f"{project} has no provenance for {filename}")
            return
        if client_gone(request):
            return
        etag = f'"{hashlib.sha256(body).hexdigest()[:32]}"'
        request.setHeader(b"content-type", PROVENANCE_TYPE.encode())
        request.setHeader(b"cache-control", FILE_CACHE_CONTROL)
        request.setHeader(b"etag", etag.encode())
        if header(request, b"if-none-match") == etag:
            request.setResponseCode(304)
            request.finish()
            return
        request.setHeader(b"content-length", b"%d" % len(body))
        if request.method != b"HEAD":
            request.write(body)
        request.finish()

    def render_HEAD(self, request: Request) -> bytes | int:
        return self.render_GET(request)

    def quick(self, asked: QuickRequest, dates: Dates) -> tuple[int, bytes, bytes | FileBody] | None:
        """
        The whole answer to a quick request (L{txpypi.web.quick}) for a
        small cached file on the disk that memory alone says is good (see
        L{txpypi.cache.files.FileCache.open_now}): its status (200, or 304),
        its head and its body (the file itself, left open for
        L{txpypi.web.quick.send_now} to send and close); L{None} for
        anything the usual way answers.  The same bytes as L{_serve} sends.
        """
        if not is_normalized(asked.project):
            return None  # redirected or refused, the usual way
        project = asked.project.decode("ascii")
        try:
            filename = check_filename(asked.filename.decode("ascii"))
        except (BadName, UnicodeDecodeError):
            return None
        if filename.endswith(PROVENANCE_SUFFIX):
            return None
        if self._accel_prefix() is not None or self._redirect_ttl() is not None:
            return None  # answered by nginx or the object store: the usual way
        opened = self._files.open_now(project, filename, largest=QUICK_FILE_MOST)
        if opened is None:
            return None
        body: bytes | FileBody = b""
        try:
            local = ILocalFile(opened.source, None)
            if local is None or opened.size is None:  # its size: at most QUICK_FILE_MOST (open_now)
                return None
            matches = asked.header(b"if-none-match")
            plan = plan_file(
                head=asked.method == b"HEAD",
                size=opened.size,
                etag=f'"{opened.sha256}"',
                if_none_match=None if matches is None else matches.decode("latin-1"),
            )
            status = _STATUS_LINES.get(plan.status)
            if status is None:
                return None
            head = status + dates() + header_lines(_header_list(opened, plan)) + b"\r\n"
            if plan.body:
                if not filename.endswith(".metadata"):
                    self._files.downloaded(project, filename)
                body = FileBody(opened.source, opened.size)  # sent and closed by send_now
        finally:
            if not isinstance(body, FileBody):
                assert opened.source is not None
                opened.source.close()
        return plan.status, head, body

    async def _open(
        self, request: Request, project: str, filename: str, fetch: bool = True, use_store: bool = True
    ) -> Opened | None:
        """
        Open the file, or answer the error and return L{None}.
        """
        try:
            return await self._files.open(project, filename, fetch=fetch, use_store=use_store)
        except OPEN_ERRORS as e:
            finish_error(request, e, missing=f"{project} has no file {filename}")
        return None

    async def _serve(self, request: Request, project: str, filename: str) -> None:
        head = request.method == b"HEAD"
        opened = await self._open(request, project, filename, fetch=not head)
        if opened is None:
            return
        held = Held.of(opened)
        try:
            started = await self._start(request, project, filename, head, held)
        finally:
            held.close()
        if started is None:
            return
        sender, plan = started
        await send_among(sender, self._senders)
        size = held.opened.size
        whole = plan.start == 0 and (size is None or sender.sent == size)
        if whole and request.finished and not filename.endswith(".metadata"):
            self._files.downloaded(project, filename)

    async def _start(
        self, request: Request, project: str, filename: str, head: bool, held: Held
    ) -> tuple[Sender, FilePlan] | None:
        """
        Answer all but the body: a redirect, an error, a C{304}, a HEAD;
        else set the headers and return the sender that will send the body
        (it took C{held}'s reader), with the plan it follows.
        """
        if client_gone(request):
            return None
        plan = _plan(request, head, held.opened)
        if await self._redirected(request, held.opened, plan, project, filename) or client_gone(request):
            return None
        if self._accelerated(request, held.opened, plan, project, filename):
            return None
        first = b""
        # A local file is not read first: its descriptor is open, with the
        # right size, and its bytes go to the socket from the descriptor;
        # nor is a download's spool (its headers go as soon as the
        # upstream's came, not once its first bytes do).
        source = held.source
        local = source is not None and (ILocalFile.providedBy(source) or from_spool(request, source))
        if plan.body and source is not None and not local:
            read = await self._first(request, project, filename, head, held, plan)
            if read is None:
                return None
            plan, first = read
        if client_gone(request):
            return None
        if plan.error:
            for name, value in plan.headers:
                request.setHeader(name, value)
            finish_text(request, plan.status, f"range not satisfiable: the file has {held.opened.size} bytes")
            return None
        _headers(request, held.opened, plan)
        if not plan.body or held.source is None:
            request.finish()
            return None
        return sender_for(request, held.take(), plan.start, plan.end, first), plan

    async def _first(
        self, request: Request, project: str, filename: str, head: bool, held: Held, plan: FilePlan
    ) -> tuple[FilePlan, bytes] | None:
        """
        Read the first bytes from C{held}'s reader; a cached file that
        cannot be read (its store failing, or the object gone) comes from
        the upstream instead, while nothing is sent yet (its record stays).
        L{None} when the error was answered.
        """
        assert held.source is not None
        try:
            return plan, await _first_read(held.source, plan)
        except Exception as e:
            held.close()
            if not held.opened.hit:
                finish_answer(request, _read_error(e))
                return None
            log.warn(
                "cannot read cached {filename} ({error}); serving it from the upstream",
                filename=filename,
                error=describe(e),
            )
        opened = await self._open(request, project, filename, fetch=True, use_store=False)
        if opened is None:
            return None
        held.opened, held.source = opened, opened.source
        if client_gone(request):
            return None
        plan = _plan(request, head, opened)
        if not plan.body or held.source is None:
            return plan, b""
        try:
            return plan, await _first_read(held.source, plan)
        except Exception as e:
            finish_answer(request, _read_error(e))
            return None

    async def _redirected(
        self, request: Request, opened: Opened, plan: FilePlan, project: str, filename: str
    ) -> bool:
        """
        With C{--s3-redirect}, answer a cached hit with a C{302} to a
        presigned URL of the object, which honours C{Range} itself, where
        the plan allows it; C{False} when the proxy must send the file
        itself: redirects are off, the plan says no (see
        L{FilePlan.redirect}), or the URL could not be made.  The caller
        keeps the reader either way.
        """
        source = opened.source
        ttl = self._redirect_ttl()
        if ttl is None or not (plan.redirect and opened.hit and IRedirectable.providedBy(source)):
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
        request.write(text(request, 302, "found in the file store"))
        request.finish()
        if request.getHeader(b"range") is None and not filename.endswith(".metadata"):
            self._files.downloaded(project, filename)
        return True

    def _accelerated(
        self, request: Request, opened: Opened, plan: FilePlan, project: str, filename: str
    ) -> bool:
        """
        With C{--accel-redirect PREFIX}, answer a GET of a hit on the local
        disk with an empty body and C{X-Accel-Redirect: PREFIX<store key>},
        for the web server in front to send the file from the same
        directory (honouring C{Range} itself); C{False} when the proxy must
        send it: the option is off, the file is not a local hit, or the
        plan says no (a HEAD, a C{304}, an C{If-Range} naming another
        version: see L{FilePlan.redirect}).
        """
        prefix = self._accel_prefix()
        local = ILocalFile(opened.source, None)
        if prefix is None or local is None or not (plan.redirect and plan.body and opened.hit and local.key):
            return False
        _headers(request, opened, attrs.evolve(plan, status=200, headers=()))
        request.setHeader(b"x-accel-redirect", (prefix + local.key).encode())
        request.setHeader(b"content-length", b"0")
        request.finish()
        if request.getHeader(b"range") is None and not filename.endswith(".metadata"):
            self._files.downloaded(project, filename)
        return True


def _plan(request: Request, head: bool, opened: Opened) -> FilePlan:
    return plan_file(
        head=head,
        size=opened.size,
        etag=None if opened.sha256 is None else f'"{opened.sha256}"',
        if_none_match=header(request, b"if-none-match"),
        range_header=header(request, b"range"),
        if_range=header(request, b"if-range"),
    )


def _header_list(opened: Opened, plan: FilePlan) -> list[tuple[bytes, bytes]]:
    """
    The headers of a file answer, in order (the quick lane writes them as
    the usual way sets them).
    """
    found = [
        (b"content-type", b"application/octet-stream"),
        (b"x-cache", b"HIT" if opened.hit else b"MISS"),
        (b"cache-control", FILE_CACHE_CONTROL),
    ]
    if opened.sha256 is not None:
        found.append((b"etag", f'"{opened.sha256}"'.encode()))
    return [*found, *plan.headers]


def _headers(request: Request, opened: Opened, plan: FilePlan) -> None:
    request.setResponseCode(plan.status)
    headers = request.responseHeaders
    for name, value in _header_list(opened, plan):
        headers.setRawHeaders(name, [value])


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


def _read_error(error: Exception) -> Answer:
    """
    The answer for a file whose first read failed.
    """
    answer = status_of(error, unavailable="the file store is unavailable")
    if answer is None or not isinstance(error, READ_ERRORS):
        log.failure("reading a file failed", Failure(error))
        return Answer(502, "could not read the file")
    return answer

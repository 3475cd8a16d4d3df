"""
Test support shipped with the package, so that tests and benchmarks share it:
builders for real wheels and sdists, and a fake upstream index (twisted.web)
that serves them in JSON or HTML-only mode, counts every request, and can
inject faults.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import json
import tarfile
import zipfile
import zlib
from collections import Counter
from collections.abc import Iterable
from typing import Any, Literal

import attrs
from packaging.utils import canonicalize_name
from packaging.version import Version
from twisted.internet.defer import Deferred
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request

JSON_V1 = "application/vnd.pypi.simple.v1+json"
Mode = Literal["json", "html"]
#: "cut": send half the body, then reset the connection; "truncated": send
#: half, then close the connection cleanly; "stall": send the headers and
#: part of the body, then nothing more; "wrong-bytes": flip the first byte;
#: "long": send extra bytes (and a Content-Length that counts them); "slow":
#: send the body 4 KiB at a time, one chunk per millisecond;
#: "500"/"503"/"404": answer with that status.
Fault = Literal["cut", "truncated", "stall", "wrong-bytes", "long", "slow", "500", "503", "404"]
#: Faults of index pages (in L{FakeUpstream.page_faults}; C{""} is the root
#: page): "close-delimited": the first half of the page with neither a
#: Content-Length nor chunking, then a clean close; "endless": a 200 whose
#: chunked body never ends; "gzip-bomb": a small gzip body that inflates
#: past L{txpypi.fetch.upstream.MAX_PAGE_BYTES}.
PageFault = Literal["close-delimited", "endless", "gzip-bomb"]


def generated_names(n: int) -> list[str]:
    """
    C{n} distinct project names shaped like PyPI's (mixed case, dots,
    underscores and dashes; 16 characters on average), always the same.
    """
    words = ("django", "Flask", "py", "tools", "lib", "Client", "api", "sdk", "utils", "core", "x", "data")
    separators = ("-", "_", ".", "-")
    return [
        f"{words[i % 12]}{separators[i % 4]}{words[(i // 12) % 12]}{separators[(i // 7) % 4]}{i:x}"
        for i in range(n)
    ]


@attrs.frozen
class Dist:
    """
    One file of a project, as the fake upstream serves it.
    """

    project: str
    filename: str
    content: bytes
    metadata: bytes | None = None
    requires_python: str | None = None
    yanked: bool | str = False
    upload_time: str = "2024-01-02T03:04:05.000000Z"

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content).hexdigest()


def _metadata(name: str, version: str, requires: Iterable[str]) -> bytes:
    lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    lines += [f"Requires-Dist: {r}" for r in requires]
    return ("\n".join(lines) + "\n\n").encode()


def _record_line(path: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{path},sha256={digest},{len(data)}"


_WHEEL = b"Wheel-Version: 1.0\nGenerator: txpypi-tests\nRoot-Is-Purelib: true\nTag: py3-none-any\n\n"


def build_wheel(
    name: str,
    version: str,
    requires: Iterable[str] = (),
    padding: int = 0,
    requires_python: str | None = None,
) -> Dist:
    """
    Build a real, installable pure-Python wheel in memory.  The module
    C{<name>} gets C{VERSION = "<version>"}; C{padding} adds an
    incompressible data file of that many bytes (for large-file tests).
    """
    module = name.replace("-", "_")
    dist_info = f"{module}-{version}.dist-info"
    metadata = _metadata(name, version, requires)
    files: dict[str, bytes] = {
        f"{module}/__init__.py": f'VERSION = "{version}"\n'.encode(),
        f"{dist_info}/METADATA": metadata,
        f"{dist_info}/WHEEL": _WHEEL,
    }
    if padding:
        # Deterministic but incompressible filler.
        chunks: list[bytes] = []
        seed = hashlib.sha256(f"{name}-{version}".encode()).digest()
        while len(chunks) * 2048 < padding:
            seed = hashlib.sha256(seed).digest()
            chunks.append(seed * 64)
        files[f"{module}/padding.bin"] = b"".join(chunks)[:padding]
    record = [_record_line(path, data) for path, data in files.items()]
    record.append(f"{dist_info}/RECORD,,")
    files[f"{dist_info}/RECORD"] = ("\n".join(record) + "\n").encode()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for path, data in files.items():
            info = zipfile.ZipInfo(path, date_time=(2024, 1, 2, 3, 4, 6))
            archive.writestr(info, data)
    return Dist(
        project=str(canonicalize_name(name)),
        filename=f"{module}-{version}-py3-none-any.whl",
        content=buffer.getvalue(),
        metadata=metadata,
        requires_python=requires_python,
    )


def build_sdist(name: str, version: str, requires: Iterable[str] = ()) -> Dist:
    """
    Build a real sdist (setuptools backend, pyproject.toml) in memory.
    """
    module = name.replace("-", "_")
    root = f"{module}-{version}"
    deps = ", ".join(json.dumps(r) for r in requires)
    files = {
        f"{root}/PKG-INFO": _metadata(name, version, requires),
        f"{root}/pyproject.toml": (
            '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n\n'
            f'[project]\nname = "{name}"\nversion = "{version}"\ndependencies = [{deps}]\n'
        ).encode(),
        f"{root}/{module}/__init__.py": f'VERSION = "{version}"\n'.encode(),
    }
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz", format=tarfile.PAX_FORMAT) as archive:
        for path, data in files.items():
            info = tarfile.TarInfo(path)
            info.size = len(data)
            info.mtime = 1704164646
            archive.addfile(info, io.BytesIO(data))
    return Dist(project=str(canonicalize_name(name)), filename=f"{root}.tar.gz", content=buffer.getvalue())


def _gone(request: Request) -> bool:
    """
    Whether the client left: Twisted drops a request's channel when its
    connection is lost.
    """
    return getattr(request, "channel", None) is None


class FakeUpstream(Resource):
    """
    A fake package index.

      - C{/simple/}: the project list;
      - C{/simple/<project>/}: a project page, JSON when asked for and
        C{mode == "json"}, else HTML;
      - C{/packages/<filename>} and C{/packages/<filename>.metadata}: files.

    Every request is counted in L{requests} by path.  L{faults} maps a file
    name to a fault to inject; L{holds} maps a file name to a L{Deferred}:
    the first half of that file is sent, then the rest when it fires.
    L{urls} maps a file name to the URL its project page lists instead of
    its own; a file named in L{unhashed} is listed without a hash;
    L{redirects} maps a request path to where a C{302} sends it.

    With C{auth}, every request whose C{Authorization} header is not
    exactly C{auth} is answered C{401} (with C{WWW-Authenticate: Basic}),
    and still recorded.  L{seen} records each request's path and its
    headers (names lower-cased), in order.
    """

    isLeaf = True

    def __init__(self, dists: Iterable[Dist] = (), mode: Mode = "json", auth: str | None = None) -> None:
        super().__init__()
        self.mode: Mode = mode
        #: The one C{Authorization} header value accepted (L{None}: none needed).
        self.auth = auth
        #: Each request's path and headers (names lower-cased; the last
        #: value of a repeated header).
        self.seen: list[tuple[str, dict[str, str]]] = []
        self.dists: dict[str, list[Dist]] = {}
        self.requests: Counter[str] = Counter()
        self.methods: list[tuple[str, str]] = []
        self.faults: dict[str, Fault] = {}
        self.holds: dict[str, Deferred[None]] = {}
        #: File name to a Deferred: nothing of that file, not even its
        #: status line, is sent until it fires.
        self.head_holds: dict[str, Deferred[None]] = {}
        self.page_faults: dict[str, Fault | PageFault] = {}
        #: Project name to a Deferred: its page is answered once it fires.
        self.page_holds: dict[str, Deferred[None]] = {}
        #: Compress page bodies (Content-Encoding: gzip) for requests that
        #: accept it.
        self.gzip_pages = False
        #: Pre-rendered root pages listing L{generated_names} (see
        #: L{list_projects}), by (JSON?, gzip?).
        self._listed: dict[tuple[bool, bool], bytes] | None = None
        self._bomb: bytes | None = None
        #: How many conditional page requests were answered 304.
        self.not_modified = 0
        self.urls: dict[str, str] = {}
        self.unhashed: set[str] = set()
        self.redirects: dict[str, str] = {}
        #: File name to its provenance object (PEP 740), listed with the
        #: file and served at C{/integrity/<filename>/provenance}.
        self.provenances: dict[str, bytes] = {}
        #: Project name to the URLs its page says it tracks (PEP 708).
        self.tracks: dict[str, list[str]] = {}
        for dist in dists:
            self.add(dist)

    def add(self, dist: Dist) -> None:
        self.dists.setdefault(dist.project, []).append(dist)

    def file_requests(self) -> int:
        """
        How many requests for files (not index pages) were served.
        """
        return sum(n for path, n in self.requests.items() if path.startswith("/packages/"))

    def _find(self, filename: str) -> tuple[Dist, bool] | None:
        is_metadata = filename.endswith(".metadata")
        base = filename[: -len(".metadata")] if is_metadata else filename
        for dists in self.dists.values():
            for dist in dists:
                if dist.filename == base and (not is_metadata or dist.metadata is not None):
                    return dist, is_metadata
        return None

    def render(self, request: Request) -> bytes | int:  # type: ignore[override]
        path = request.path.decode()
        self.requests[path] += 1
        self.methods.append((request.method.decode(), path))
        headers = {
            name.decode("latin-1").lower(): values[-1].decode("latin-1")
            for name, values in request.requestHeaders.getAllRawHeaders()
        }
        self.seen.append((path, headers))
        if self.auth is not None and request.getHeader("authorization") != self.auth:
            request.setResponseCode(401)
            request.setHeader("www-authenticate", 'Basic realm="fake upstream"')
            return b"unauthorized"
        if path in self.redirects:
            request.setResponseCode(302)
            request.setHeader("location", self.redirects[path])
            return b"redirected"
        if path == "/simple/":
            return self._page_answer(request, "", self._render_root(request))
        if path.startswith("/simple/"):
            name = path[len("/simple/") :].strip("/")
            return self._page_answer(request, name, self._render_project(request, name))
        if path.startswith("/packages/"):
            return self._render_file(request, path[len("/packages/") :])
        if path.startswith("/pypi/") and path.endswith("/json"):
            return self._json_api(request, path[len("/pypi/") : -len("/json")].split("/"))
        if path.startswith("/integrity/") and path.endswith("/provenance"):
            found = self.provenances.get(path[len("/integrity/") : -len("/provenance")])
            if found is not None:
                request.setHeader("content-type", "application/vnd.pypi.integrity.v1+json")
                return found
        request.setResponseCode(404)
        return b"not found"

    def _wants_json(self, request: Request) -> bool:
        accept = (request.getHeader("accept") or "").lower()
        return self.mode == "json" and "application/vnd.pypi.simple.v1+json" in accept

    def list_projects(self, names: list[str]) -> None:
        """
        Make the root page list C{names} (instead of the projects it has
        files for), rendered once in each format and encoding, with
        C{_last-serial} in JSON as PyPI sends it.
        """
        as_json = json.dumps(
            {
                "meta": {"api-version": "1.1", "_last-serial": 10**8},
                "projects": [{"_last-serial": 10**7 + i, "name": n} for i, n in enumerate(names)],
            },
            separators=(",", ":"),
        ).encode()
        as_html = (
            '<!DOCTYPE html>\n<html>\n  <head>\n    <meta name="pypi:repository-version" content="1.1">\n'
            "    <title>Simple index</title>\n  </head>\n  <body>\n"
            + "".join(f'    <a href="/simple/{canonicalize_name(n)}/">{n}</a>\n' for n in names)
            + "  </body>\n</html>\n"
        ).encode()
        self._listed = {}
        for is_json, body in ((True, as_json), (False, as_html)):
            self._listed[is_json, False] = body
            self._listed[is_json, True] = gzip.compress(body, 6, mtime=0)

    def _accepts_gzip(self, request: Request) -> bool:
        return "gzip" in (request.getHeader("accept-encoding") or "").lower()

    def _page_answer(self, request: Request, name: str, body: bytes | int) -> bytes | int:
        """
        A page's answer, with the page faults of L{PageFault} applied, and
        gzip-compressed when L{gzip_pages} is set and the client accepts it.
        """
        if not isinstance(body, bytes) or request.code != 200:
            return body
        fault = self.page_faults.get(name)
        if fault == "close-delimited":
            transport: Any = request.channel.transport  # type: ignore[union-attr]
            content_type = request.responseHeaders.getRawHeaders(b"content-type") or [b"text/html"]
            transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: " + content_type[0] + b"\r\n\r\n")
            transport.write(body[: len(body) // 2])
            transport.unregisterProducer()
            transport.loseConnection()
            return NOT_DONE_YET
        if fault == "endless":
            self._endless(request, body or b" ")
            return NOT_DONE_YET
        if fault == "gzip-bomb":
            request.setHeader("content-encoding", "gzip")
            return self._gzip_bomb()
        encoded = request.responseHeaders.hasHeader(b"content-encoding")
        if self.gzip_pages and not encoded and self._accepts_gzip(request) and request.method != b"HEAD":
            request.setHeader("content-encoding", "gzip")
            return gzip.compress(body, 6, mtime=0)
        return body

    def _endless(self, request: Request, piece: bytes) -> None:
        from twisted.internet import reactor

        if _gone(request):
            return
        request.write(piece * max(1, 256 * 1024 // len(piece)))
        reactor.callLater(0, self._endless, request, piece)  # type: ignore[attr-defined]

    def _gzip_bomb(self) -> bytes:
        if self._bomb is None:
            from txpypi.fetch.upstream import MAX_PAGE_BYTES

            deflater = zlib.compressobj(9, wbits=31)
            zeros = bytes(1024 * 1024)
            pieces = [deflater.compress(zeros) for _ in range(MAX_PAGE_BYTES // len(zeros) + 1)]
            self._bomb = b"".join(pieces) + deflater.flush()
        return self._bomb

    def _render_root(self, request: Request) -> bytes:
        if self._listed is not None:
            wants_json, gzipped = self._wants_json(request), self._accepts_gzip(request)
            request.setHeader("content-type", JSON_V1 if wants_json else "text/html")
            if gzipped:
                request.setHeader("content-encoding", "gzip")
            return self._listed[wants_json, gzipped]
        request.setHeader("x-pypi-last-serial", "42")  # as PyPI sends it, in both formats
        if self._wants_json(request):
            request.setHeader("content-type", "application/vnd.pypi.simple.v1+json")
            body = {"meta": {"api-version": "1.1"}, "projects": [{"name": p} for p in sorted(self.dists)]}
            return json.dumps(body).encode()
        request.setHeader("content-type", "text/html")
        links = "".join(f'<a href="{p}/">{p}</a>\n' for p in sorted(self.dists))
        return f"<html><body>{links}</body></html>".encode()

    def _render_project(self, request: Request, name: str) -> bytes | int:
        hold = self.page_holds.get(name)
        if hold is not None and not hold.called:

            def answer(_: object) -> None:
                if not _gone(request):
                    request.write(self._render_project(request, name))  # type: ignore[arg-type]
                    request.finish()

            hold.addCallback(answer)
            return NOT_DONE_YET
        fault = self.page_faults.get(name)
        if fault is not None and fault in ("500", "404"):
            request.setResponseCode(int(fault))
            return b"injected"
        if fault == "stall":
            request.setHeader("content-type", "text/html")
            request.write(b"<html><body>")
            return NOT_DONE_YET
        dists = self.dists.get(name)
        if dists is None:
            request.setResponseCode(404)
            return b"no such project"
        request.setHeader("x-pypi-last-serial", "42")  # as PyPI sends it, in both formats
        if self._wants_json(request):
            request.setHeader("content-type", "application/vnd.pypi.simple.v1+json")
            body = json.dumps(self._project_json(request, name, dists)).encode()
        else:
            request.setHeader("content-type", "text/html")
            body = self._project_html(name, dists).encode()
        # Validators, so that the proxy can revalidate with a conditional GET.
        etag = f'"{hashlib.sha256(body).hexdigest()[:16]}"'
        request.setHeader("etag", etag)
        if request.getHeader("if-none-match") == etag:
            self.not_modified += 1
            request.setResponseCode(304)
            return b""
        return body

    def _project_json(self, request: Request, name: str, dists: list[Dist]) -> dict[str, object]:
        host = request.getHeader("host") or "localhost"
        files = []
        for d in dists:
            entry: dict[str, object] = {
                "filename": d.filename,
                # Absolute in JSON mode, relative in HTML mode: both must work.
                "url": self.urls.get(d.filename, f"http://{host}/packages/{d.filename}"),
                "hashes": {} if d.filename in self.unhashed else {"sha256": d.sha256},
                "size": len(d.content),
                "upload-time": d.upload_time,
                "yanked": d.yanked,
            }
            if d.requires_python:
                entry["requires-python"] = d.requires_python
            if d.metadata is not None:
                entry["core-metadata"] = {"sha256": hashlib.sha256(d.metadata).hexdigest()}
            if d.filename in self.provenances:
                entry["provenance"] = f"http://{host}/integrity/{d.filename}/provenance"
            files.append(entry)
        page: dict[str, object] = {
            "meta": {"api-version": "1.1", "_last-serial": 42},
            "name": name,
            "files": files,
            "versions": sorted({d.filename.split("-")[1].removesuffix(".tar.gz") for d in dists}),
        }
        if name in self.tracks:
            page["tracks"] = self.tracks[name]
        return page

    def json_api(self, host: str, name: str, version: str | None = None) -> dict[str, object] | None:
        """
        What the legacy JSON API (C{/pypi/<name>/json}, C{/pypi/<name>/<version>/json})
        answers, as PyPI lays it out; L{None} for a 404.
        """
        dists = self.dists.get(name)
        if dists is None:
            return None
        releases: dict[str, list[dict[str, object]]] = {}
        for d in dists:
            releases.setdefault(d.filename.split("-")[1].removesuffix(".tar.gz"), []).append(
                {
                    "filename": d.filename,
                    "url": f"http://{host}/packages/{d.filename}",
                    "digests": {"sha256": d.sha256, "md5": hashlib.md5(d.content).hexdigest()},
                    "packagetype": "bdist_wheel" if d.filename.endswith(".whl") else "sdist",
                    "upload_time": d.upload_time[:19],
                    "upload_time_iso_8601": d.upload_time,
                    "size": len(d.content),
                    "yanked": d.yanked is not False,
                    "yanked_reason": d.yanked if isinstance(d.yanked, str) else None,
                    "requires_python": d.requires_python,
                }
            )
        newest = max(releases, key=Version)
        shown = newest if version is None else version
        if shown not in releases:
            return None
        info = {
            "name": name,
            "version": shown,
            "summary": f"{name} {shown}, for tests",
            "requires_python": None,
        }
        if version is not None:
            return {"info": info, "last_serial": 42, "urls": releases[version], "vulnerabilities": []}
        return {
            "info": info,
            "last_serial": 42,
            "releases": releases,
            "urls": releases[newest],
            "vulnerabilities": [],
        }

    def _json_api(self, request: Request, parts: list[str]) -> bytes:
        host = request.getHeader("host") or "localhost"
        if self.page_faults.get(parts[0]) == "500":  # the JSON API fails with the page
            request.setResponseCode(500)
            return b"injected"
        found = None
        if len(parts) in (1, 2):
            found = self.json_api(host, parts[0], parts[1] if len(parts) == 2 else None)
        if found is None:
            request.setResponseCode(404)
            return b"not found"
        request.setHeader("content-type", "application/json")
        return json.dumps(found).encode()

    def _project_html(self, name: str, dists: list[Dist]) -> str:
        links = []
        for d in dists:
            extra = ""
            if d.requires_python:
                extra += (
                    f' data-requires-python="{d.requires_python.replace(">", "&gt;").replace("<", "&lt;")}"'
                )
            if d.yanked is not False:
                extra += f' data-yanked="{"" if d.yanked is True else d.yanked}"'
            if d.metadata is not None:
                extra += f' data-dist-info-metadata="sha256={hashlib.sha256(d.metadata).hexdigest()}"'
            if d.filename in self.provenances:
                extra += f' data-provenance="../../integrity/{d.filename}/provenance"'
            href = self.urls.get(d.filename, f"../../packages/{d.filename}")
            fragment = "" if d.filename in self.unhashed else f"#sha256={d.sha256}"
            links.append(f'<a href="{href}{fragment}"{extra}>{d.filename}</a><br/>')
        head = "".join(f'<meta name="pypi:tracks" content="{url}">' for url in self.tracks.get(name, []))
        body = f"<h1>Links for {name}</h1>{''.join(links)}"
        return f"<!DOCTYPE html><html><head>{head}</head><body>{body}</body></html>"

    def _render_file(self, request: Request, filename: str) -> bytes | int:
        held = self.head_holds.get(filename)
        if held is None:
            return self._render_found(request, filename)

        def answer(_: object) -> None:
            if _gone(request):
                return
            body = self._render_found(request, filename)
            if body is not NOT_DONE_YET:
                assert isinstance(body, bytes)
                request.write(body)
                request.finish()

        held.addCallback(answer)
        return NOT_DONE_YET

    def _render_found(self, request: Request, filename: str) -> bytes | int:
        found = self._find(filename)
        if found is None:
            request.setResponseCode(404)
            return b"no such file"
        dist, is_metadata = found
        content = dist.metadata if is_metadata else dist.content
        assert content is not None
        fault = self.faults.get(filename)
        if fault in ("500", "503", "404"):
            request.setResponseCode(int(fault or 500))
            return b"injected"
        if fault == "wrong-bytes":
            content = bytes([content[0] ^ 0xFF]) + content[1:]
        if fault == "long":
            content += b"trailing junk"
        request.setHeader("content-type", "application/octet-stream")
        request.setHeader("content-length", str(len(content)))
        if request.method == b"HEAD":
            return b""
        half = len(content) // 2
        if fault == "stall":
            request.write(content[:half])
            return NOT_DONE_YET
        if fault == "slow":
            self._trickle(request, content, 0)
            return NOT_DONE_YET
        hold = self.holds.get(filename)
        if hold is None and fault not in ("cut", "truncated"):
            return content
        request.write(content[:half])

        def rest(_: object) -> None:
            if _gone(request):
                return
            if fault == "cut":
                request.channel.transport.abortConnection()  # type: ignore[union-attr]
                return
            if fault == "truncated":
                # A clean close (FIN, not RST).  The channel is the transport's
                # producer, and a transport with a producer waits for it.
                transport: Any = request.channel.transport  # type: ignore[union-attr]
                transport.unregisterProducer()
                transport.loseConnection()
                return
            request.write(content[half:])
            request.finish()

        if hold is None:
            rest(None)
        else:
            hold.addCallback(rest)
        return NOT_DONE_YET

    def _trickle(self, request: Request, content: bytes, offset: int) -> None:
        from twisted.internet import reactor

        if _gone(request):
            return
        if offset >= len(content):
            request.finish()
            return
        request.write(content[offset : offset + 4096])
        reactor.callLater(0.001, self._trickle, request, content, offset + 4096)  # type: ignore[attr-defined]

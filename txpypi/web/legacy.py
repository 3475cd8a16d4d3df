"""
C{/pypi/<project>/json} and C{/pypi/<project>/<version>/json} (and under
C{/<group>/pypi/}): the legacy JSON API, from L{txpypi.cache.legacy}.
"""

from __future__ import annotations

import gzip
import hashlib
import math
from collections.abc import Callable, Collection
from urllib.parse import quote

from twisted.web.resource import Resource
from twisted.web.server import Request

from txpypi.cache.groups import Group
from txpypi.cache.legacy import LegacyAPI, NoJsonApi
from txpypi.cache.pages import NotFound
from txpypi.cache.policy import PolicedGroup, PolicyRefused
from txpypi.core.httpheaders import accepts_gzip, etag_matches
from txpypi.core.names import BadName, normalize
from txpypi.fetch.upstream import UpstreamError
from txpypi.web.answers import client_gone, error_text, finish_error, header, moved, run, segment, text

PATHS = "JSON API paths are /pypi/<project>/json and /pypi/<project>/<version>/json"


def is_legacy(postpath: list[bytes]) -> bool:
    """
    Whether a path under C{/pypi/} is the JSON API's: it ends with C{json}
    (no slash after it: C{/pypi/simple/json} is the JSON API of a project
    named C{simple}, C{/pypi/simple/json/} a Simple API page).
    """
    return len(postpath) in (2, 3) and postpath[-1] == b"json"


class LegacyResource(Resource):
    """
    A group's legacy JSON API.
    """

    isLeaf = True

    def __init__(
        self,
        api: LegacyAPI,
        group: Group,
        policed: PolicedGroup | None,
        trusted: Callable[[], Collection[str]] = tuple,
    ) -> None:
        """
        @param trusted: gives the reverse proxies whose C{X-Forwarded-Proto}
            and C{X-Forwarded-Host} say how the client reached the proxy
            (C{--trusted-proxy}; read per request).
        """
        super().__init__()
        self._api = api
        self._group = group
        self._policed = policed
        self._trusted = trusted

    def render_GET(self, request: Request) -> bytes | int:
        postpath = request.postpath or []
        if not is_legacy(postpath):
            return text(
                request, 404, "JSON API paths are /pypi/<project>/json and /pypi/<project>/<version>/json"
            )
        try:
            raw = segment(postpath[0])
            project = normalize(raw)
            version = segment(postpath[1]) if len(postpath) == 3 else None
        except BadName as e:
            return error_text(request, e)
        if version is not None and (version in ("", ".", "..") or "/" in version):
            return text(request, 400, f"not a version: {version!r}")
        if raw != project:
            prefix = "/" + "/".join(p.decode("latin-1") for p in request.prepath or [])
            rest = "" if version is None else quote(version) + "/"
            return moved(request, f"{prefix}/{quote(project)}/{rest}json")
        return run(request, self._answer(request, project, version))

    def render_HEAD(self, request: Request) -> bytes | int:
        return self.render_GET(request)

    def _base(self, request: Request) -> str:
        """
        The proxy's URL as the client reached it: its own scheme and the
        C{Host} it sent, or, through a trusted reverse proxy, what that
        proxy forwarded.
        """
        scheme = "https" if request.isSecure() else "http"
        host = header(request, b"host") or "localhost"
        peer = request.getClientAddress()
        if getattr(peer, "host", None) in self._trusted():
            forwarded = header(request, b"x-forwarded-proto")
            if forwarded in ("http", "https"):
                scheme = forwarded
            host = (header(request, b"x-forwarded-host") or host).split(",")[0].strip()
        return f"{scheme}://{host}"

    async def _answer(self, request: Request, project: str, version: str | None) -> None:
        base = self._base(request)
        try:
            answer = await self._api.answer(self._group, self._policed, project, version, base)
        except NoJsonApi:
            finish_error(request, NotFound(project), missing=f"no JSON API for {project}")
            return
        except (NotFound, UpstreamError, PolicyRefused) as e:
            finish_error(request, e, missing=f"no such project: {project}")
            return
        if client_gone(request):
            return
        body = answer.body
        etag = f'"{hashlib.sha256(body).hexdigest()[:32]}"'
        headers = request.responseHeaders
        headers.setRawHeaders(b"content-type", [b"application/json"])
        headers.setRawHeaders(b"vary", [b"Accept-Encoding, Host"])
        headers.setRawHeaders(b"cache-control", [b"max-age=%d" % max(0, math.ceil(answer.remaining))])
        headers.setRawHeaders(b"x-cache", [b"STALE" if answer.stale else b"HIT"])
        gzipped = accepts_gzip(header(request, b"accept-encoding") or "")
        if gzipped:
            etag = etag[:-1] + '-gz"'
        headers.setRawHeaders(b"etag", [etag.encode()])
        if etag_matches(header(request, b"if-none-match"), etag):
            request.setResponseCode(304)
            request.finish()
            return
        if gzipped:
            body = gzip.compress(body, 6, mtime=0)
            headers.setRawHeaders(b"content-encoding", [b"gzip"])
        headers.setRawHeaders(b"content-length", [b"%d" % len(body)])
        if request.method != b"HEAD":
            request.write(body)
        request.finish()

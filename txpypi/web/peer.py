"""
C{/_peer/<group>/<project>/<filename>}: a download in progress here, for
another instance of the cluster.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime
from twisted.web.resource import Resource
from twisted.web.server import Request

from txpypi.cache.files import FileCache
from txpypi.core.names import BadName
from txpypi.core.peer import HEADER as PEER_HEADER
from txpypi.core.peer import verify
from txpypi.fetch.reader import FlightReader
from txpypi.fetch.wanted import FlightFailed
from txpypi.web.answers import client_gone, error_text, finish_error, finish_text, header, run, segment, text
from txpypi.web.sender import Sender, send_among, sender_for


class PeerResource(Resource):
    """
    C{/_peer/<group>/<project>/<filename>}: a download in progress here,
    streamed to another instance of the cluster whose client asked for the
    same file.  Only requests signed with the cluster's secret are answered
    (see L{txpypi.core.peer}); the file must be downloading here, so nothing is
    ever fetched for a peer.
    """

    isLeaf = True

    def __init__(self, files: FileCache, clock: IReactorTime, senders: set[Sender] | None = None) -> None:
        """
        @param senders: where the senders of bodies in progress are kept
            while they send (for the shutdown to wait for them).
        """
        super().__init__()
        self._files = files
        self._clock = clock
        self._senders: set[Sender] = set() if senders is None else senders

    def render_GET(self, request: Request) -> bytes | int:
        secret = self._files.peer_secret
        if secret is None:
            return text(request, 404, "this instance has no peers")
        path = (request.path or b"").decode("latin-1")
        if not verify(secret, path, header(request, PEER_HEADER), self._clock.seconds()):
            return text(request, 403, "peer requests must be signed with the cluster's secret")
        postpath = request.postpath or []
        if len(postpath) != 3:
            return text(request, 404, "peer paths are /_peer/<group>/<project>/<filename>")
        try:
            group, project, filename = (segment(part) for part in postpath)
        except BadName as e:
            return error_text(request, e)
        return run(request, self._serve(request, group, project, filename))

    async def _serve(self, request: Request, group: str, project: str, filename: str) -> None:
        flight = await self._files.peer_flight(group, project, filename)
        if flight is None:
            finish_text(request, 404, f"{filename} is not downloading here")
            return
        reader: FlightReader | None = flight.reader()
        try:
            try:
                await flight.wait_started()
            except FlightFailed as e:
                finish_error(request, e)
                return
            if client_gone(request):
                return
            request.setHeader(b"content-type", b"application/octet-stream")
            if flight.size is not None:
                request.setHeader(b"content-length", b"%d" % flight.size)
            assert reader is not None
            sender = sender_for(request, reader)
            reader = None  # the sender's now
        finally:
            if reader is not None:
                reader.close()
        await send_among(sender, self._senders)

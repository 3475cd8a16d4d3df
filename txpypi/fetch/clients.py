"""
The file side of several upstreams: L{FileClient}, what a download needs
of the upstream client, and L{UpstreamClients}, which sends each file to
the client of the upstream that listed it (its credentials, its TLS, its
health and metrics), and a peer's to the first.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from twisted.internet.defer import Deferred, gatherResults
from twisted.web.iweb import IResponse

from txpypi.core.fetchpolicy import ListedFile
from txpypi.fetch.upstream import UpstreamClient


class FileClient(Protocol):
    """
    What a file download needs of the upstream: the live timeouts and a GET.
    """

    @property
    def response_timeout(self) -> float: ...

    @property
    def read_timeout(self) -> float: ...

    @property
    def min_rate(self) -> float: ...

    async def open_file(
        self, target: ListedFile | str, extra: dict[bytes, bytes] | None = None, kind: str = "file"
    ) -> IResponse: ...


class UpstreamClients:
    """
    The clients of every upstream, by upstream URL, as one L{FileClient}.
    The timeouts are the live ones every client shares.
    """

    def __init__(self, clients: Mapping[str, UpstreamClient]) -> None:
        if not clients:
            raise ValueError("no upstream client")
        self._clients = dict(clients)
        self._first = next(iter(self._clients.values()))

    @property
    def response_timeout(self) -> float:
        return self._first.response_timeout

    @property
    def read_timeout(self) -> float:
        return self._first.read_timeout

    @property
    def min_rate(self) -> float:
        return self._first.min_rate

    def of(self, upstream: str) -> UpstreamClient:
        """
        The client of the upstream at URL C{upstream}.

        @raise KeyError: no upstream has that URL.
        """
        return self._clients[upstream]

    async def open_file(
        self, target: ListedFile | str, extra: dict[bytes, bytes] | None = None, kind: str = "file"
    ) -> IResponse:
        client = self._first if isinstance(target, str) else self.of(target.upstream)
        return await client.open_file(target, extra, kind)

    def close(self) -> Deferred[None]:
        closing = gatherResults([c.close() for c in self._clients.values()], consumeErrors=True)
        return closing.addCallback(lambda _: None)

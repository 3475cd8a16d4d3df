"""
The other workers of this machine (see L{txpypi.workers}), asked for their
part of an answer that is the whole proxy's: C{/metrics} and C{/health}.
Each is asked at its own socket, with a request signed with the workers'
secret (as peers' are, L{txpypi.core.peer}), on the internal route
C{/_worker/<what>}; one that does not answer within L{TIMEOUT} is left out
and counted as such.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, DeferredList
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers

from txpypi.core.peer import HEADER, sign

#: The internal route prefix a worker answers its siblings on.
PREFIX = "/_worker/"

#: How long a sibling may take to answer, in seconds.
TIMEOUT = 2.0

#: The longest answer taken from a sibling, in bytes.
MAX_ANSWER = 8 * 1024 * 1024


class Siblings:
    """
    The other workers, by the URLs where they are reached.
    """

    def __init__(self, reactor: Any, urls: tuple[str, ...], secret: str) -> None:
        self._reactor = reactor
        self.urls = urls
        self.secret = secret
        pool = HTTPConnectionPool(reactor, persistent=True)
        pool.maxPersistentPerHost = 2
        self._agent = Agent(reactor, connectTimeout=TIMEOUT, pool=pool)

    @property
    def count(self) -> int:
        """
        How many workers there are, this one included.
        """
        return len(self.urls) + 1

    async def _ask(self, url: str, path: str) -> bytes | None:
        headers = Headers({HEADER: [sign(self.secret, path, self._reactor.seconds()).encode()]})
        d = self._agent.request(b"GET", (url.rstrip("/") + path).encode(), headers)
        d.addTimeout(TIMEOUT, self._reactor)
        response = await d
        body: Deferred[bytes] = readBody(response)
        body.addTimeout(TIMEOUT, self._reactor)
        data = await body
        if response.code != 200 or len(data) > MAX_ANSWER:
            return None
        return data

    async def gather(self, what: str) -> list[bytes | None]:
        """
        Every sibling's answer to C{/_worker/<what>}, L{None} for one that
        did not answer.
        """
        path = PREFIX + what
        asked = [Deferred.fromCoroutine(self._ask(url, path)) for url in self.urls]
        results = await DeferredList(asked, consumeErrors=True)
        return [value if ok else None for ok, value in results]

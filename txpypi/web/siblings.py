"""
The other workers of this machine (see L{txpypi.workers}), asked for their
part of an answer that is the whole proxy's: C{/metrics} and C{/health}.
Each is asked at its own socket, with a request signed with the workers'
secret (as peers' are, L{txpypi.core.peer}), on the internal route
C{/_worker/<what>}.  The answers are gathered at most once a second
(L{GATHER_EVERY}) however many ask, so that the public C{/health} and
C{/metrics} cannot multiply requests between workers; a sibling that does
not answer within L{TIMEOUT} is given by its last answer, if it is at most
L{LAST_ANSWER_FOR} old (its counters do not fall out of the totals while it
is busy or starting again), else left out.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred, DeferredList
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers

from txpypi.concurrency.waiters import SingleFlight
from txpypi.core.peer import HEADER, sign

#: The internal route prefix a worker answers its siblings on.
PREFIX = "/_worker/"

#: How long a sibling may take to answer, in seconds (on loopback: a
#: worker that takes longer is stuck or starting).
TIMEOUT = 0.5

#: The longest a gathering is reused, in seconds.
GATHER_EVERY = 1.0

#: The longest a sibling's last answer stands in for one it did not give.
LAST_ANSWER_FOR = 60.0

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
        self._pool = HTTPConnectionPool(reactor, persistent=True)
        self._pool.maxPersistentPerHost = 2
        self._agent = Agent(reactor, connectTimeout=TIMEOUT, pool=self._pool)
        #: Each sibling's last answer to each part, and when it came.
        self._last: dict[tuple[str, str], tuple[float, bytes]] = {}
        #: The last gathering of each part (when, and its answers), and
        #: the one in progress.
        self._gathered: dict[str, tuple[float, list[tuple[bytes | None, bool]]]] = {}
        self._gathering: SingleFlight[str, list[tuple[bytes | None, bool]]] = SingleFlight()

    def close(self) -> Deferred[None]:
        """
        Close the connections kept to the siblings (at shutdown).
        """
        closed: Deferred[None] = self._pool.closeCachedConnections()
        return closed

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

    async def gather(self, what: str) -> list[tuple[bytes | None, bool]]:
        """
        Every sibling's answer to C{/_worker/<what>}, and whether it
        answered now: when it did not, its last answer (or L{None} when it
        has none recent enough).
        """
        now = self._reactor.seconds()
        kept = self._gathered.get(what)
        if kept is not None and now - kept[0] < GATHER_EVERY:
            return kept[1]
        return await self._gathering.run(what, lambda: self._gather(what))

    async def _gather(self, what: str) -> list[tuple[bytes | None, bool]]:
        path = PREFIX + what
        asked = [Deferred.fromCoroutine(self._ask(url, path)) for url in self.urls]
        results = await DeferredList(asked, consumeErrors=True)
        now = self._reactor.seconds()
        answers: list[tuple[bytes | None, bool]] = []
        for url, (ok, value) in zip(self.urls, results, strict=True):
            if ok and value is not None:
                self._last[(url, what)] = (now, value)
                answers.append((value, True))
                continue
            last = self._last.get((url, what))
            answers.append(
                (last[1] if last is not None and now - last[0] <= LAST_ANSWER_FOR else None, False)
            )
        self._gathered[what] = (now, answers)
        return answers

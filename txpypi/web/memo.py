"""
Slow answers kept for a second: the download statistics of C{/} and
C{/stats}, and the store probe of C{/health}, asked once however many ask.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Hashable
from typing import Any, Generic, TypeVar

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime

from txpypi.concurrency.waiters import SingleFlight

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

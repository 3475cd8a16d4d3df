"""
Turns: at most C{limit} of something at a time (downloads, upstream page
requests), the others waiting in line, first come first served.

Each waiter waits at most the timeout it gives, then fails with the error
its owner chose; a waiter cancelled (its client left) leaves the line.  The
line is as long as the requests that wait in it, each of which holds a
client connection (bounded by C{--max-connections}) and leaves at its
timeout.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime


class Turns:
    """
    At most L{limit} turns at a time; L{acquire} a turn, L{release} it once
    done.
    """

    def __init__(self, clock: IReactorTime, limit: int, too_long: Callable[[float, int], Exception]) -> None:
        """
        @param too_long: the error of a waiter that waited C{timeout}
            seconds while C{running} turns were taken.
        """
        self._clock = clock
        self._limit = limit
        self._too_long = too_long
        #: Turns taken.
        self.running = 0
        self._line: deque[Deferred[None]] = deque()

    @property
    def limit(self) -> int:
        return self._limit

    @limit.setter
    def limit(self, value: int) -> None:
        self._limit = value  # SIGHUP may raise it: those in line go at once
        self._wake()

    @property
    def waiting(self) -> int:
        return len(self._line)

    def acquire(self, timeout: float) -> Deferred[None]:
        """
        Fire once a turn is ours: at once, or when one is released.  Fails
        with the owner's error after C{timeout} seconds in line.
        """
        if self.running < self._limit and not self._line:
            self.running += 1
            return succeed(None)
        turn: Deferred[None] = Deferred(self._leave)
        self._line.append(turn)
        timer = self._clock.callLater(timeout, self._give_up, turn, timeout)

        def over(result: object) -> object:
            if timer.active():
                timer.cancel()
            return result

        return turn.addBoth(over)

    def _leave(self, turn: Deferred[None]) -> None:
        if turn in self._line:
            self._line.remove(turn)

    def _give_up(self, turn: Deferred[None], timeout: float) -> None:
        self._line.remove(turn)
        turn.errback(self._too_long(timeout, self.running))

    def release(self) -> None:
        self.running -= 1
        self._wake()

    def refuse_waiters(self, error: Exception) -> None:
        """
        Fail every waiter (at shutdown).
        """
        line, self._line = self._line, deque()
        for turn in line:
            turn.errback(error)

    def _wake(self) -> None:
        while self._line and self.running < self._limit:
            self.running += 1
            self._line.popleft().callback(None)

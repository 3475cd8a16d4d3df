"""
The one home for "wait until something happens": every part that hands out
Deferreds for an event uses these instead of a list of its own.

 - L{Once}: something that happens once (a flight ends, a probe answers);
   each waiter gets a Deferred of its own, so cancelling one (its client
   left) touches no other, and a waiter that comes late fires at once.
 - L{Progress}: a count that only grows (bytes sent, bytes freed), and
   waiters for "at least N".
 - L{SingleFlight}: at most one piece of work per key at a time; those who
   ask while it runs share its result.
 - L{in_thread_now}: run a "blocking" call at once on this thread, the
   stand-in for a thread pool in tests and small set-ups.
 - L{expire}: a timer that fires an error into a Deferred unless it fired
   first, and goes away either way.
 - L{Timer}: one timer that is started, pushed back and cancelled over and
   over (an idle timeout), without C{if call.active(): call.cancel()}.

Turns (at most N at a time) are in L{txpypi.concurrency.turns}.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any, Generic, TypeVar

from twisted.internet.defer import Deferred, maybeDeferred, succeed
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.python.failure import Failure

T = TypeVar("T")
K = TypeVar("K")


class Once(Generic[T]):
    """
    Something that happens once, with a result (or a failure).
    """

    def __init__(self) -> None:
        self._waiters: list[Deferred[T]] = []
        self._result: T | Failure | None = None
        #: Has it happened?
        self.happened = False

    def wait(self) -> Deferred[T]:
        """
        A new Deferred that fires with the result once it has happened (at
        once if it has).
        """
        d: Deferred[T] = Deferred()
        if self.happened:
            self._fire(d)
        else:
            self._waiters.append(d)
        return d

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def happen(self, result: T | Failure) -> None:
        """
        It happened: fire every waiter (a L{Failure} runs their errbacks).
        Only the first call counts.
        """
        if self.happened:
            return
        self.happened = True
        self._result = result
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            self._fire(d)

    def _fire(self, d: Deferred[T]) -> None:
        if d.called:  # cancelled by its waiter
            return
        result = self._result
        if isinstance(result, Failure):
            d.errback(result)
        else:
            d.callback(result)  # type: ignore[arg-type]


class Progress:
    """
    A count that only grows, and Deferreds that fire once it reaches a
    value.
    """

    def __init__(self) -> None:
        self.value = 0
        self._waiters: list[tuple[int, Deferred[None]]] = []

    def wait(self, value: int) -> Deferred[None]:
        """
        Fire once the count is at least C{value} (at once if it is).
        """
        if self.value >= value:
            return succeed(None)
        d: Deferred[None] = Deferred()
        self._waiters.append((value, d))
        return d

    def advance(self, value: int) -> None:
        self.value = value
        for wanted, d in list(self._waiters):
            if value >= wanted:
                self._waiters.remove((wanted, d))
                if not d.called:
                    d.callback(None)

    def fail(self, error: Exception) -> None:
        """
        Fail every waiter: the count will not grow any more.
        """
        waiters, self._waiters = self._waiters, []
        for _, d in waiters:
            if not d.called:
                d.errback(error)


class SingleFlight(Generic[K, T]):
    """
    Run at most one coroutine per key at a time; callers who ask while it
    runs share its result.  A caller that cancels its own Deferred does not
    cancel the shared work.
    """

    def __init__(self) -> None:
        self._running: dict[K, Once[T]] = {}

    def __contains__(self, key: K) -> bool:
        return key in self._running

    def run(self, key: K, work: Callable[[], Coroutine[Any, Any, T]]) -> Deferred[T]:
        running = self._running.get(key)
        if running is None:
            running = self._running[key] = Once()
            Deferred.fromCoroutine(work()).addBoth(self._done, key)
        return running.wait()

    def _done(self, result: T | Failure, key: K) -> None:
        self._running.pop(key).happen(result)


def in_thread_now(f: Callable[..., T], *args: Any) -> Deferred[T]:
    """
    Run C{f} at once on this thread: a stand-in for a thread pool (the
    signature of L{twisted.internet.threads.deferToThreadPool} without the
    reactor and pool) for tests and small set-ups.  An exception becomes a
    failed Deferred, as it would from a pool.
    """
    return maybeDeferred(f, *args)


def expire(
    clock: IReactorTime, d: Deferred[T], seconds: float, error: Callable[[], Exception]
) -> IDelayedCall:
    """
    Fail C{d} with C{error()} after C{seconds} unless it has fired; the
    timer is cancelled as soon as C{d} fires, whichever way.
    """

    def fire() -> None:
        if not d.called:
            d.errback(error())

    return when_late(clock, d, seconds, fire)


def when_late(clock: IReactorTime, d: Deferred[T], seconds: float, late: Callable[[], None]) -> IDelayedCall:
    """
    Call C{late()} after C{seconds} unless C{d} has fired by then; the
    timer is cancelled as soon as C{d} fires, whichever way.
    """
    timer = clock.callLater(seconds, late)

    def over(result: object) -> object:
        if timer.active():
            timer.cancel()
        return result

    d.addBoth(over)
    return timer


class Timer:
    """
    One timer, started, pushed back and cancelled as often as need be: at
    most one call is pending, and cancelling when none is is fine.
    """

    def __init__(self, clock: IReactorTime) -> None:
        self._clock = clock
        self._call: IDelayedCall | None = None

    @property
    def running(self) -> bool:
        return self._call is not None

    def start(self, seconds: float, f: Callable[..., object], *args: Any) -> None:
        """
        Call C{f(*args)} in C{seconds}, instead of what was pending.
        """
        self.cancel()

        def fire() -> None:
            self._call = None
            f(*args)

        self._call = self._clock.callLater(seconds, fire)

    def reset(self, seconds: float) -> None:
        """
        Push the pending call back to C{seconds} from now (if one is pending).
        """
        if self._call is not None:
            self._call.reset(seconds)

    def cancel(self) -> None:
        call, self._call = self._call, None
        if call is not None and call.active():
            call.cancel()

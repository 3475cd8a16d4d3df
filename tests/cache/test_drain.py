"""
The drain at shutdown: the clients still reading past the grace period
are aborted (and that is logged), those that finished in time are not; a
drain with nothing to wait for ends at once.
"""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.logger import LogEvent, formatEvent, globalLogPublisher

from txpypi.cache.drain import drain
from txpypi.concurrency.waiters import Once


class Reading:
    """
    A client being sent a file; it leaves C{clients} once it is over.
    """

    def __init__(self, clients: set[Reading]) -> None:
        self._clients = clients
        self._over: Once[None] = Once()
        self.aborted = False
        clients.add(self)

    def when_done(self) -> Deferred[None]:
        return self._over.wait()

    def finish(self) -> None:
        self._clients.discard(self)
        self._over.happen(None)

    def abort(self) -> None:
        self.aborted = True
        self.finish()


def test_clients_past_the_grace_are_aborted_and_the_others_not() -> None:
    clock = Clock()
    clients: set[Reading] = set()
    quick, slow = Reading(clients), Reading(clients)
    logged: list[LogEvent] = []
    globalLogPublisher.addObserver(logged.append)
    try:
        drained = Deferred.fromCoroutine(drain(clock, 5.0, clients, {}))
        quick.finish()
        clock.advance(4.9)
        assert not drained.called and not slow.aborted  # still in its grace
        clock.advance(0.1)
        assert drained.called
    finally:
        globalLogPublisher.removeObserver(logged.append)
    assert slow.aborted and not quick.aborted and not clients
    lines = [formatEvent(e) for e in logged if e.get("log_namespace") == "txpypi.files"]
    assert lines == [
        "shutting down: waiting up to 5.0 s for 2 download(s)",
        "shutting down: aborted 1 download(s) past the grace period",
    ]
    assert not clock.getDelayedCalls()


def test_the_drain_ends_once_the_last_client_finishes_in_time() -> None:
    clock = Clock()
    clients: set[Reading] = set()
    only = Reading(clients)
    drained = Deferred.fromCoroutine(drain(clock, 5.0, clients, {}))
    assert not drained.called
    only.finish()
    assert drained.called and not only.aborted
    assert not clock.getDelayedCalls()  # its grace timer went away


def test_with_nothing_to_wait_for_the_drain_ends_at_once() -> None:
    clock = Clock()
    drained = Deferred.fromCoroutine(drain(clock, 5.0, set(), {}))
    assert drained.called and not clock.getDelayedCalls()

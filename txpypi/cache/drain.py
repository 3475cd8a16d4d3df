"""
Shutting down: let the downloads in progress finish for a grace period,
then abort the clients still reading and stop the upstream fetches still
running.  Nothing partial is ever committed: an unfinished download simply
never lands.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any, Protocol

from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from txpypi.concurrency.waiters import Once, expire
from txpypi.fetch.flight import Flight

log = Logger(namespace="txpypi.files")


class Client(Protocol):
    """
    A client being sent a file (the web layer's sender).
    """

    def when_done(self) -> Deferred[None]:
        """
        Fire once it is over, however it ended.
        """

    def abort(self) -> None:
        """
        Cut it off.
        """


async def drain(
    clock: IReactorTime, grace: float, clients: Collection[Client], flights: Mapping[str, Flight]
) -> None:
    """
    Wait up to C{grace} seconds for C{clients} and C{flights}, then abort
    the clients left and stop the flights that are not verified yet; end
    once every flight is over (the verified ones landed, the stopped ones
    cleaned up: before the stores close).

    @param clients: the clients reading now, a live collection that each
        leaves once it is over.
    @param flights: the downloads in progress, a live mapping too.
    """
    if clients or flights:
        log.info(
            "shutting down: waiting up to {grace} s for {n} download(s)",
            grace=grace,
            n=len(clients),
        )
        # Wait on them without cancelling them: they are not ours to cancel.
        waits = [c.when_done() for c in clients] + [f.when_done() for f in flights.values()]
        await _at_most(DeferredList(waits, consumeErrors=True), grace, clock)
    if clients:
        log.warn("shutting down: aborted {n} download(s) past the grace period", n=len(clients))
    for client in list(clients):
        client.abort()
    running = list(flights.values())
    stopped = [f for f in running if f.stop("the proxy is shutting down")]
    if stopped:
        log.warn("shutting down: stopped {n} upstream fetch(es) past the grace period", n=len(stopped))
    await DeferredList([f.when_done() for f in running], consumeErrors=True)


class _GraceOver(Exception):
    pass


async def _at_most(work: Deferred[Any], seconds: float, clock: IReactorTime) -> None:
    """
    Wait until C{work} fires or C{seconds} pass, whichever comes first,
    without cancelling C{work}.
    """
    over: Once[None] = Once()
    work.addBoth(lambda _: over.happen(None))
    waiting = over.wait()
    expire(clock, waiting, seconds, _GraceOver)
    try:
        await waiting
    except _GraceOver:
        pass  # the grace is over


__all__ = ["Client", "drain"]

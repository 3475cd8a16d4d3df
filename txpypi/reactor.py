"""
txpypi's reactor: Twisted's epoll reactor, one layer less per event.

L{EPollReactor.doPoll} hands each ready descriptor to its selectable
through L{twisted.python.log.callWithLogger}, which asks the selectable for
its C{logPrefix} and pushes a legacy log context around the call: about
8 % of a warm page's time under py-spy (without it, alternating C{wrk}
runs were faster in 5 of 5 pairs on two workers, by 12 % on average).
The reactor's own C{_doReadOrWrite} already catches what a C{doRead} or
C{doWrite} raises and drops that connection;
L{QuickEPollReactor} calls it directly and logs, with twisted.logger,
whatever still escapes.  What it gives up: a legacy C{log.msg} made while an
event is handled no longer carries the selectable's prefix as its
C{system}; txpypi logs through twisted.logger, which never used it.

L{install} installs it unless a reactor is installed already (C{twistd
--reactor}, or a test's), where epoll is there (Linux): the twistd dropin
(C{twisted/plugins/txpypi_plugin.py}, once txpypi is the chosen plugin)
and the workers (L{txpypi.worker}) call it.
"""

from __future__ import annotations

import errno
import sys

from twisted.logger import Logger

log = Logger(namespace="txpypi.reactor")

try:
    from twisted.internet.epollreactor import EPollReactor
except ImportError:  # no epoll (not Linux): Twisted's default reactor
    EPollReactor = None  # type: ignore[assignment,misc]


if EPollReactor is not None:

    class QuickEPollReactor(EPollReactor):
        """
        The epoll reactor, without a log context around each event.
        """

        def doPoll(self, timeout: float | None) -> None:
            try:
                # As many events as there are descriptors, as Twisted asks.
                ready = self._poller.poll(-1 if timeout is None else timeout, len(self._selectables))
            except OSError as e:
                if e.errno == errno.EINTR:
                    return
                raise
            selectables, handle = self._selectables, self._doReadOrWrite
            for fd, event in ready:
                selectable = selectables.get(fd)
                if selectable is None:
                    continue  # removed by an earlier event of this poll
                try:
                    handle(selectable, fd, event)
                except KeyboardInterrupt:
                    raise
                except BaseException:  # as log.callWithLogger does
                    log.failure("unhandled error handling an event of {selectable!r}", selectable=selectable)

        doIteration = doPoll


def install() -> bool:
    """
    Install L{QuickEPollReactor} as the reactor, unless one is installed
    already or epoll is not there.

    @return: whether it was installed.
    """
    if EPollReactor is None or "twisted.internet.reactor" in sys.modules:
        return False
    from twisted.internet.main import installReactor

    installReactor(QuickEPollReactor())
    return True

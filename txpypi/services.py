"""
The services that run the proxy's parts with the application: thread
pools, cache upkeep, draining downloads on stop, SIGHUP, outage probes,
timers and the final clean-up.  L{txpypi.tap.build} puts them together.
"""

from __future__ import annotations

import gc
import signal
from collections.abc import Callable, Collection, Sequence
from typing import Any, Protocol

from twisted.application.service import MultiService, Service
from twisted.internet.defer import Deferred, gatherResults, maybeDeferred
from twisted.internet.interfaces import IReactorFromThreads, IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.threadpool import ThreadPool

from txpypi.cache.drain import Client
from txpypi.cache.files import FileCache
from txpypi.concurrency.stalls import StallMeter
from txpypi.config import Settings
from txpypi.core.live import Live
from txpypi.fetch.clients import UpstreamClients
from txpypi.fetch.upstream import UpstreamClient
from txpypi.options import FIXED, Running
from txpypi.storage.outages import Outage, WatchedMetadata
from txpypi.web.accesslog import AccessLogWriter
from txpypi.web.carried import CarriedCounters
from txpypi.workers import Inherited, adopt

# The log lines keep the namespace they had when these lived in tap.py.
log = Logger(namespace="txpypi.tap")


class OrderedMultiService(MultiService):
    """
    Stops its children one at a time, in reverse order, each after the one
    before it finished stopping: the listeners close, then the downloads in
    progress drain, then the stores close, and only then the thread pools
    that those stores use.  (MultiService stops them all at once.)
    """

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop_in_order())

    async def _stop_in_order(self) -> None:
        for child in reversed(list(self)):
            try:
                await maybeDeferred(child.stopService)
            except Exception:
                log.failure("error while stopping {service}", service=child)


class ThreadPoolService(Service):
    """
    Starts and stops a thread pool with the application.
    """

    def __init__(self, pool: ThreadPool) -> None:
        self.pool = pool

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> None:
        super().stopService()
        self.pool.stop()


class CacheUpkeepService(Service):
    """
    Learns the cache's size at start-up (off the reactor thread), writes
    access times to the metadata store every C{interval} seconds and on
    stop.  Its timer logs its own errors.
    """

    def __init__(self, files: FileCache, clock: IReactorTime, interval: float = 60.0) -> None:
        self._files = files
        self._loop = LoopingCall(self._upkeep)
        self._loop.clock = clock
        self._interval = interval

    def _flush(self) -> Deferred[None]:
        d = Deferred.fromCoroutine(self._files.flush_accesses())
        d.addErrback(lambda f: log.failure("could not record access times", f))
        return d

    def _upkeep(self) -> Deferred[None]:
        d = Deferred.fromCoroutine(self._files.upkeep())
        d.addErrback(lambda f: log.failure("cache upkeep failed", f))
        return d

    def startService(self) -> None:
        super().startService()
        d = Deferred.fromCoroutine(self._files.load_usage())
        d.addErrback(lambda f: log.failure("could not read the cache's size", f))
        recovered = Deferred.fromCoroutine(self._files.recover_commits())
        recovered.addErrback(lambda f: log.failure("could not check the unfinished commits", f))
        self._loop.start(self._interval, now=False)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        return self._flush()


class DrainService(Service):
    """
    Stops right after the listeners (so no new request comes in) and lets
    the downloads in progress finish, up to the grace period.
    """

    def __init__(self, files: FileCache, live: Live, clients: Collection[Client] = ()) -> None:
        """
        @param live: the live settings: C{shutdown_grace} is the grace period.
        @param clients: the clients reading file bodies (the web layer's
            L{Proxy.senders}, kept up to date as they come and go): waited
            for up to the grace period, then cut off.
        """
        self._files = files
        self._live = live
        self._clients = clients

    @property
    def grace(self) -> float:
        return self._live.shutdown_grace

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._files.drain(self.grace, self._clients))


class Rereadable(Protocol):
    """
    What reads the settings again: the twistd options.
    """

    def reread(self) -> Settings:
        """
        @raise usage.UsageError: for a bad setting.
        """


class ReloadService(Service):
    """
    On SIGHUP, reads the config file again and applies what can change in a
    running process (the options marked live: TTLs, timeouts, limits, the
    admin token, the access log) to the one L{Live} object the parts hold.
    A bad file is refused with a log line and the old settings kept.
    """

    #: Settings that only a restart can change.
    FIXED = FIXED

    def __init__(
        self,
        options: Rereadable,
        running: Running,
        reactor: IReactorFromThreads,
    ) -> None:
        self._options = options
        self._running = running
        self._reactor = reactor
        self._previous: Any = None

    def startService(self) -> None:
        super().startService()
        if hasattr(signal, "SIGHUP"):
            self._previous = signal.signal(signal.SIGHUP, self._on_signal)

    def stopService(self) -> None:
        super().stopService()
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
            self._previous = None

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._reactor.callFromThread(self.reload)

    def reload(self) -> None:
        try:
            new = self._options.reread()
        except usage.UsageError as e:
            log.error("SIGHUP: configuration refused, keeping the running one: {error}", error=str(e))
            return
        for name in self._running.reload(new):
            log.warn("SIGHUP: {name} changes only with a restart; keeping the running value", name=name)
        log.info("SIGHUP: configuration reloaded")


class OutageService(Service):
    """
    Stops probing the stores that are down, on stop.
    """

    def __init__(self, outages: Sequence[Outage]) -> None:
        self._outages = outages

    def stopService(self) -> None:
        super().stopService()
        for outage in self._outages:
            outage.stop()


class TimerLoopService(Service):
    """
    Runs a L{LoopingCall} while the service runs.
    """

    def __init__(self, loop: LoopingCall, interval: float) -> None:
        self._loop = loop
        self._interval = interval

    def startService(self) -> None:
        super().startService()
        self._loop.start(self._interval, now=False)

    def stopService(self) -> None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()


class StallMeterService(Service):
    """
    Runs a L{StallMeter} while the service runs (C{--stall-meter}).
    """

    def __init__(self, meter: StallMeter) -> None:
        self._meter = meter

    def startService(self) -> None:
        super().startService()
        self._meter.start()

    def stopService(self) -> None:
        super().stopService()
        self._meter.stop()


class HeapFreezeService(Service):
    """
    Once the process is built (every module imported, every part made),
    freezes its objects (L{gc.freeze}): a full collection then walks only
    the objects made since, not the tens of thousands from start-up, which
    are there for good.  Walking those took 40 to 50 ms on a slow CPU: a
    stall of the reactor thread whenever work that makes garbage (an
    eviction) set off a full collection.  It does not collect first: that
    would be such a stall, for the few hundred objects of garbage that
    imports leave.
    """

    def startService(self) -> None:
        super().startService()
        gc.freeze()


class CleanupService(Service):
    """
    Closes the upstream connection pool and the metadata store on stop.
    """

    def __init__(self, client: UpstreamClient | UpstreamClients, metadata: WatchedMetadata) -> None:
        self._client = client
        self._metadata = metadata

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        return gatherResults([self._client.close(), self._metadata.close()], consumeErrors=True)


class AccessLogService(Service):
    """
    Starts the buffered access log, opens it again at each SIGHUP (for log
    rotation, and a changed C{access-log}), and writes what waits at stop:
    nothing logged is lost at SIGTERM.
    """

    def __init__(self, writer: AccessLogWriter, live: Live) -> None:
        self._writer = writer
        self._live = live

    def startService(self) -> None:
        super().startService()
        self._writer.start()
        self._live.on_change(self._reopen)

    def _reopen(self) -> None:
        if self.running:
            self._writer.reopen(self._live.access_log)

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        return self._writer.stop()


class CarriedCountersService(Service):
    """
    Writes a worker's counters at stop (L{txpypi.web.carried}), after its
    last requests: a worker stopped on its own and started again carries on
    from every one of them.
    """

    def __init__(self, carried: CarriedCounters, render: Callable[[], bytes]) -> None:
        self._carried = carried
        self._render = render

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        return Deferred.fromCoroutine(self._carried.report(self._render))


class AdoptedService(Service):
    """
    Accepts connections on a listening socket a worker inherited (see
    L{txpypi.workers}), as C{strports.service} does on one it makes.
    """

    def __init__(self, reactor: Any, inherited: Inherited, factory: Any) -> None:
        self._reactor = reactor
        self._inherited = inherited
        self._factory = factory
        self._port: Any = None

    def startService(self) -> None:
        super().startService()
        self._port = adopt(self._reactor, self._inherited, self._factory)

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        port, self._port = self._port, None
        return None if port is None else maybeDeferred(port.stopListening)

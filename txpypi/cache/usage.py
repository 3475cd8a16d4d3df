"""
The cache's bytes and files against C{--max-cache-size}, the downloads in
progress counting with the bytes they will bring, and eviction of the
least recently served files when the cache is over it.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from txpypi.cache.coordinator import ICoordinator
from txpypi.cache.pages import PageCache
from txpypi.cache.records import Records
from txpypi.cache.stats import DownloadStats
from txpypi.concurrency.waiters import Once
from txpypi.core.live import Live
from txpypi.fetch.flight import Flight
from txpypi.storage.metadata import FileRecord, IMetadata
from txpypi.storage.outages import Unavailable
from txpypi.storage.stores import IFileStore

log = Logger(namespace="txpypi.files")

#: With a shared size, how long at least between two readings of it after
#: landings (each is a sum over every record): a burst of landings reads it
#: once a second, not once each.
SHARED_READ_EVERY = 1.0

#: The least recently served files chosen at a time when the cache is over
#: its limit (those of them it takes to fit are evicted together).
EVICTION_BATCH = 64


@attrs.define
class Usage:
    """
    Bytes and files in the cache, once L{load} ran; with C{shared}, the
    size is shared with other instances (in Redis, or the worker processes'
    database): it is then read again after landings (at most once every
    L{SHARED_READ_EVERY} seconds) and every minute, and eviction runs on one instance
    at a time (the coordinator's C{evict/<group>}).
    """

    _metadata: IMetadata
    _store: IFileStore
    _records: Records
    _stats: DownloadStats
    _coordinator: ICoordinator
    #: The downloads in progress here (read only).
    _in_flight: Mapping[str, Flight]
    #: For the name of its group (eviction runs per group).
    _pages: PageCache
    #: The live settings: C{max_cache_size} is the most bytes the cache
    #: may hold (L{None}: no limit), spool files included.
    live: Live = attrs.field(factory=Live, kw_only=True)
    size: int | None = None
    count: int | None = None
    evictions: int = 0
    shared: bool = False
    _evicting: Deferred[None] | None = None
    #: Keeps time for the readings of the shared size (L{None}: each
    #: landing reads it at once).
    clock: IReactorTime | None = attrs.field(default=None, kw_only=True)
    _read_at: float = float("-inf")
    _read_soon: bool = False
    _eviction_done: Once[None] = attrs.field(factory=Once)
    _reloads: list[Deferred[None]] = attrs.field(factory=list)

    @property
    def max_size(self) -> int | None:
        """
        The most bytes the cache may hold (C{--max-cache-size}).
        """
        return self.live.max_cache_size

    @max_size.setter
    def max_size(self, value: int | None) -> None:
        self.live.max_cache_size = value

    async def load(self) -> None:
        """
        Learn the cache's size from the metadata store.
        """
        self.size, self.count = await self._metadata.usage()
        self.maybe_evict()

    async def upkeep(self) -> None:
        """
        What runs every minute: write the access times and download counts
        to the metadata store, and (when the cache is shared) learn again
        the size that all the instances together fill.
        """
        await self._stats.flush()
        if self.shared:
            try:
                await self.load()
            except Unavailable:
                pass  # Redis is down (logged once); read again once it is back

    def account(self, size: int, count: int) -> None:
        """
        The cache grew (or shrank) by C{size} bytes and C{count} files.
        """
        if self.size is not None:
            self.size += size
        if self.count is not None:
            self.count += count

    def landed(self, record: FileRecord, replaced: FileRecord | None) -> None:
        """
        A download landed as C{record}, replacing the record C{replaced}.
        """
        if self.shared:
            # The shared total counts every instance's files: read it again
            # soon; meanwhile this landing counts as one here would.
            self._count_landing(record, replaced)
            self._read_shared_soon()
            return
        self._count_landing(record, replaced)
        self.maybe_evict()

    def _count_landing(self, record: FileRecord, replaced: FileRecord | None) -> None:
        # A file recorded again (after a store outage, say) replaced its old
        # record: count the difference, not the file twice.
        if replaced is None:
            self.account(record.size, 1)
        else:
            self.account(record.size - replaced.size, 0)

    def _read_shared_soon(self) -> None:
        """
        Read the shared size again, once however many landings ask within
        L{SHARED_READ_EVERY} seconds; L{wait_settled} waits for it.
        """
        if self._read_soon:
            return
        self._read_soon = True
        reload: Deferred[None] = Deferred()
        self._reloads.append(reload)

        def read() -> None:
            self._read_soon = False
            if self.clock is not None:
                self._read_at = self.clock.seconds()
            d = Deferred.fromCoroutine(self.load())
            d.addErrback(_unless_unavailable, "reading the size")

            def over(_: object) -> None:
                self._reloads.remove(reload)
                reload.callback(None)

            d.addBoth(over)

        if self.clock is None:
            read()
            return
        wait = max(0.0, self._read_at + SHARED_READ_EVERY - self.clock.seconds())
        self.clock.callLater(wait, read)

    def spooling(self) -> int:
        """
        The bytes of the downloads in progress here that are to be cached:
        they count towards the size limit before they land.
        """
        return sum(f.expected_bytes() for f in self._in_flight.values())

    def over_limit(self) -> bool:
        return (
            self.max_size is not None
            and self.size is not None
            and self.size + self.spooling() > self.max_size
        )

    @property
    def busy(self) -> bool:
        """
        Whether an eviction, or a reading of the shared size, is running.
        """
        return self._evicting is not None or bool(self._reloads)

    async def wait_settled(self) -> None:
        """
        Wait until no eviction runs and the shared size was read again.
        """
        while self.busy:
            if self._reloads:
                await self._reloads[0]
            else:
                await self._eviction_done.wait()

    async def wait_evicted(self) -> None:
        """
        Wait until no eviction is running.
        """
        while self._evicting is not None:
            await self._eviction_done.wait()

    def maybe_evict(self) -> None:
        """
        Start an eviction if the cache is over its limit.
        """
        if self.over_limit() and self._evicting is None:
            self._evicting = Deferred.fromCoroutine(self._evict())
            self._evicting.addErrback(_unless_unavailable, "eviction")
            self._evicting.addBoth(self._evicted)

    def _evicted(self, _: object) -> None:
        self._evicting = None
        done, self._eviction_done = self._eviction_done, Once()
        done.happen(None)

    async def _evict(self) -> None:
        """
        Remove the least recently served files until the cache fits.  Files
        being downloaded are not in the store yet; a file being served stays
        readable by the clients that have it open.
        """
        await self._stats.flush()
        lock = f"evict/{self._pages.group}"
        # One instance of the cluster evicts at a time, or they would all
        # remove the same amount.
        if not await self._coordinator.take(lock):
            return
        try:
            await self._evict_until_under()
        finally:
            self._coordinator.release(lock)

    async def _evict_until_under(self) -> None:
        while self.over_limit():
            if self.shared:  # other instances add and evict too
                self.size, self.count = await self._metadata.usage()
                if not self.over_limit():
                    break
            batch = await self._metadata.least_recent(EVICTION_BATCH)
            evicted = 0
            while batch and self.over_limit():
                chosen = self._enough(batch)
                batch = batch[len(chosen) :]
                evicted += await self._evict_all(chosen)
            if not evicted:
                break

    async def _evict_all(self, records: list[FileRecord]) -> int:
        """
        Evict C{records} all at once: the metadata store's thread runs the
        deletions back to back, not one per round trip to the reactor.
        How many were evicted; the first failure once all are over.
        """
        pending = [Deferred.fromCoroutine(self._evict_one(record)) for record in records]
        evicted, failure = 0, None
        for d in pending:
            try:
                evicted += await d
            except Exception as e:
                failure = failure or e
        if failure is not None:
            raise failure
        return evicted

    def _enough(self, records: list[FileRecord]) -> list[FileRecord]:
        """
        The first of C{records} whose sizes bring the cache under its
        limit (all of them if they do not; at least one).
        """
        assert self.size is not None and self.max_size is not None
        excess = self.size + self.spooling() - self.max_size
        for n, record in enumerate(records):
            if excess <= 0 and n:
                return records[:n]
            excess -= record.size
        return records

    async def _evict_one(self, record: FileRecord) -> int:
        """
        Remove C{record}'s file, only if it is still that record: one that
        was purged, or replaced by a new landing, meanwhile is not counted
        twice.
        """
        deleted = await self._metadata.delete_file(record.key, record)
        if deleted is None:
            return 0
        self._records.forget(record)
        self.account(-deleted.size, -1)
        await self._store.delete(deleted.store_key)
        self.evictions += 1
        log.info(
            "evicted {key} ({size} bytes): cache over {limit} bytes",
            key=record.key,
            size=record.size,
            limit=self.max_size,
        )
        return 1


def _unless_unavailable(failure: Failure, doing: str) -> None:
    """
    Log a failure, unless a store is down (an outage is logged once).
    """
    if not failure.check(Unavailable):
        log.failure("{doing} failed", failure, doing=doing)


__all__ = ["Usage"]

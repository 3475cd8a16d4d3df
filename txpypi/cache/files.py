"""
Files: served from the store when cached, else fetched once (single flight)
from the URL that the project's upstream index page listed.

L{FileCache.open} reads top to bottom: a cached copy that the index still
lists is a hit; else a download in progress here is joined; else the
coordinator says who fetches it (here, a peer to follow, or it landed
meanwhile) and a flight starts.  Its parts: L{CachedFiles} (hits),
L{Downloads} (flights and slots), L{Usage} (size and eviction),
L{DownloadStats} (access times and counts), an L{ICoordinator}.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from txpypi.cache.coordinator import ICoordinator, LocalCoordinator
from txpypi.cache.downloads import Downloads
from txpypi.cache.drain import Client, drain
from txpypi.cache.lookup import CachedFiles, NotListed, Opened, find_wanted
from txpypi.cache.pages import PageCache
from txpypi.cache.records import Records
from txpypi.cache.slots import Busy, Slots
from txpypi.cache.stats import DownloadStats
from txpypi.cache.usage import Usage
from txpypi.concurrency.waiters import in_thread_now
from txpypi.core.counting import StoreCounts
from txpypi.core.live import Live
from txpypi.core.peer import peer_path
from txpypi.core.simple.model import ProjectPage
from txpypi.fetch.clients import FileClient
from txpypi.fetch.commit import CommitJournal
from txpypi.fetch.flight import Flight
from txpypi.fetch.reader import FlightReader
from txpypi.fetch.wanted import FlightFailed, Peer, Wanted
from txpypi.storage.metadata import FileRecord, IMetadata
from txpypi.storage.outages import known_file
from txpypi.storage.stores import IFileStore

log = Logger(namespace="txpypi.files")


class FileCache:
    """
    The files of one upstream group.
    """

    def __init__(
        self,
        clock: IReactorTime,
        client: FileClient,
        store: IFileStore,
        metadata: IMetadata,
        pages: PageCache,
        *,
        max_records: int = 100_000,
        live: Live | None = None,
        metrics: StoreCounts | None = None,
        journal: CommitJournal | None = None,
        spool_write: Callable[[int, memoryview], int] = os.write,
        run_spooling: Callable[..., Deferred[Any]] = in_thread_now,
        coordinator: ICoordinator | None = None,
        shared_usage: bool = False,
        peer_secret: str | None = None,
    ) -> None:
        """
        @param live: the live settings it reads (C{max-cache-size},
            C{max-downloads}); the defaults' when L{None}.
        @param peer_secret: signs the requests between instances (see
            L{peer_secret}).
        @param coordinator: who fetches each file (L{LocalCoordinator} when
            this instance is alone).
        @param shared_usage: whether the cache's size is shared with other
            instances (see L{Usage}).
        """
        self._clock = clock
        self._client = client
        self._store = store
        self._metadata = metadata
        self.pages = pages
        self.metrics = metrics
        self.coordinator: ICoordinator = coordinator or LocalCoordinator()
        #: The secret that signs requests between instances, for serving
        #: the downloads in progress here to the other instances.
        self.peer_secret = peer_secret
        self.live = live or Live()
        flights: dict[str, Flight] = {}
        self._records = Records(max_records)
        self.stats = DownloadStats(clock, metadata)
        self.usage = Usage(
            metadata,
            store,
            self._records,
            self.stats,
            self.coordinator,
            flights,
            pages,
            shared=shared_usage,
            live=self.live,
            clock=clock,
        )
        self._cached = CachedFiles(pages, store, metadata, self._records, self.usage, self.stats)
        self.downloads = Downloads(
            clock,
            client,
            store,
            metadata,
            self._records,
            self.usage,
            self.coordinator,
            self.count_store_error,
            flights,
            journal=journal,
            spool_write=spool_write,
            run_spooling=run_spooling,
            slots=Slots(clock, self.live.max_downloads),
        )
        #: The page caches of every upstream whose files it keeps, by their
        #: cache prefix (the assembly adds the others').
        self.sources: dict[str, PageCache] = {} if pages is None else {pages.group: pages}
        self.live.on_change(self._retune)

    def _retune(self) -> None:
        self.downloads.slots.limit = self.live.max_downloads  # a raise lets those in line go
        self.usage.maybe_evict()

    # -- what other parts read

    def key(self, project: str, filename: str, pages: PageCache | None = None) -> str:
        return f"{(pages or self.pages).group}/{project}/{filename}"

    def remembered(self, key: str) -> FileRecord | None:
        return self._records.get(key)

    def fetching(self, key: str) -> bool:
        return key in self.downloads.flights

    # -- opening a file

    async def open(
        self,
        project: str,
        filename: str,
        fetch: bool = True,
        use_store: bool = True,
        pages: PageCache | None = None,
    ) -> Opened:
        """
        Open a file of C{project} for sending.  A cached file is served only
        while the project's index lists it with the same hash.

        @param fetch: with C{False} (for HEAD), answer from what is known
            without starting an upstream fetch.
        @param use_store: with C{False}, do not look in the cache: serve it
            from the upstream (for a cached file that cannot be read; its
            record is kept).
        @raise NotListed: the index does not list it.
        @raise txpypi.cache.pages.NotFound: the upstream does not know the project.
        @raise txpypi.fetch.upstream.UpstreamError: the upstream page fetch failed.
        @raise txpypi.fetch.wanted.FlightFailed: the file fetch failed before any
            byte could be sent.
        @raise Busy: too many downloads ran for too long, or the proxy is
            shutting down.
        @param pages: the index of the upstream it is listed by (the
            cache's own upstream when L{None}).
        """
        pages = pages or self.pages
        key = self.key(project, filename, pages)
        retried = False  # a flight over before it could be joined is looked for once more
        while True:
            found = await self._find(pages, key, project, filename, fetch, use_store)
            if isinstance(found, Opened):
                return found
            flight = found
            if flight.done:
                # Over before we could join it (only a download that takes
                # no time at all can be): its outcome is all there is.
                if flight.failure is not None:
                    raise flight.failure
                if retried or not use_store:
                    raise FlightFailed(503, "the download ended before it could be joined; ask again")
                retried = True
            elif not flight.joinable:
                # Its first bytes are freed already: the file is about to land.
                if not fetch:
                    return Opened(None, flight.size, None, False)
                await flight.when_done()
                retried = False
            else:
                joined = await self._join(flight, key, fetch)
                if joined is not None:
                    return joined
                retried = False

    def open_now(
        self, project: str, filename: str, pages: PageCache | None = None, largest: int | None = None
    ) -> Opened | None:
        """
        A cached file opened at once, for the quick lane (see
        L{CachedFiles.open_now}), or L{None}.
        """
        pages = pages or self.pages
        key = self.key(project, filename, pages)
        return self._cached.open_now(self._records.get(key), project, filename, pages, largest)

    async def _find(
        self, pages: PageCache, key: str, project: str, filename: str, fetch: bool, use_store: bool
    ) -> Opened | Flight:
        """
        A cached copy opened, else the download of it in progress here, else
        what the index says of it (for a HEAD), else a download started.
        """
        record = self._records.get(key) if use_store else None
        looked = use_store and record is None and key not in self.downloads.flights
        # With the workers' file locks the claim looks, once its lock is
        # taken (a follower of another worker: not at all): one trip to the
        # store before a miss's first byte instead of two.  Offline, and for
        # a HEAD, which claim nothing, the store comes first.
        claim_looks = fetch and self.coordinator.lock_first and not pages.offline
        if looked and not claim_looks:
            # A flight may land while we read the store: check memory again.
            record = await known_file(self._metadata, key) or self._records.get(key)
        opened = await self._cached.open_record(record, project, filename, pages)
        if opened is not None:
            return opened
        flight = self.downloads.flights.get(key)
        if flight is not None:
            return flight
        page, _ = await pages.get(project)
        assert isinstance(page.model, ProjectPage)
        wanted = find_wanted(page.model, key, pages.upstream.url, filename)
        if wanted is None:
            raise NotListed(filename)
        if pages.offline:
            raise NotListed(f"{filename} is not cached, and we are offline")
        if not fetch:
            return Opened(None, wanted.size, None, False)
        return await self._lead_or_join(pages, wanted, project, filename, use_store, looked)

    async def _lead_or_join(
        self, pages: PageCache, wanted: Wanted, project: str, filename: str, use_store: bool, looked: bool
    ) -> Opened | Flight:
        """
        Ask the coordinator who fetches C{wanted} (telling it whether the
        store was just C{looked} at), and start (or join) its download here
        unless it landed meanwhile.
        """
        key = wanted.key
        # Another request may have fetched or started it meanwhile.
        opened = await self._cached.open_record(
            self._records.get(key) if use_store else None, project, filename, pages
        )
        if opened is not None:
            return opened
        peer, claimed = None, False
        if use_store and key not in self.downloads.flights:
            path = peer_path(pages.group, project, filename)
            claim = await self.coordinator.claim(key, path, self, looked=looked)
            if isinstance(claim, Peer):
                peer = claim
            elif claim is not None:
                opened = await self._cached.open_record(claim, project, filename, pages)
                if opened is not None:
                    return opened
            else:
                claimed = True
        return self.downloads.flights.get(key) or await self.downloads.begin(wanted, peer, claimed)

    async def _join(self, flight: Flight, key: str, fetch: bool) -> Opened | None:
        """
        Read C{flight} from its start once it started; L{None} when it
        followed a peer that failed before its first byte (look again, for
        the record or the lock, without following peers for a while).
        """
        reader = flight.reader()
        try:
            await flight.wait_started()
        except FlightFailed:
            reader.close()
            if flight.peer is None or flight.has_started:
                raise
            log.info("could not follow {url}; looking again", url=flight.peer.url)
            self.coordinator.follow_failed(key)
            return None
        except BaseException:
            reader.close()
            raise
        self.usage.maybe_evict()  # its size is known now, and counts
        # Joining a flight that has all its bytes verified is as good as a hit.
        hit = flight.verified
        if not fetch:
            reader.close()
            return Opened(None, flight.size, flight.sha256(), hit)
        return Opened(reader, flight.size, flight.sha256(), hit)

    def peer_flight(self, group: str, project: str, filename: str) -> Deferred[Flight | None]:
        """
        The download of a file in progress here (or about to start: see
        L{Downloads.flight_for_peer}), for another instance to follow (not
        one that is itself following a peer).
        """
        pages = self.sources.get(group)
        if pages is None:
            return succeed(None)
        return self.downloads.flight_for_peer(self.key(project, filename, pages))

    # -- upkeep

    def count_store_error(self, store: str) -> None:
        """
        Count a failed call to a store (C{files} or C{metadata}).
        """
        if self.metrics is not None:
            self.metrics.store_errors.labels(store).inc()

    def spool_error(self) -> str | None:
        """
        The last error writing a spool file, until a file is cached again.
        """
        return self.downloads.spool_health.message

    async def metadata_ping(self) -> None:
        await self._metadata.ping()

    async def purge(self, project: str, filename: str, pages: PageCache | None = None) -> bool:
        """
        Remove one cached file (of C{pages}' upstream, by default the
        cache's own); C{False} if it was not cached.
        """
        return await self._cached.purge(self.key(project, filename, pages))

    async def load_usage(self) -> None:
        """
        Learn the cache's size from the metadata store (in its thread).
        """
        await self.usage.load()

    def maybe_evict(self) -> None:
        """
        Start an eviction if the cache is over its limit.
        """
        self.usage.maybe_evict()

    async def upkeep(self) -> None:
        """
        What runs every minute (see L{Usage.upkeep}).
        """
        await self.usage.upkeep()

    async def flush_accesses(self) -> None:
        await self.stats.flush()

    def downloaded(self, project: str, filename: str) -> None:
        """
        Count one whole download of a distribution file (for /stats).
        """
        self.stats.downloaded(project, filename)

    async def top_projects(self, limit: int) -> list[tuple[str, int]]:
        return await self.stats.top_projects(limit)

    async def project_downloads(self, project: str) -> list[tuple[str, str, int]]:
        return await self.stats.project_downloads(project)

    async def recover_commits(self) -> None:
        """
        At start-up: remove the objects of the commits that an earlier
        process left unfinished (see L{Downloads.recover_commits}).
        """
        await self.downloads.recover_commits()

    async def wait_idle(self) -> None:
        """
        Wait until no download is in flight, no eviction running and the
        shared size read again after the last download.
        """
        while self.downloads.flights or self.usage.busy:
            if self.downloads.flights:
                await next(iter(self.downloads.flights.values())).when_done()
            else:
                await self.usage.wait_settled()

    async def drain(self, grace: float, clients: Collection[Client]) -> None:
        """
        Let the downloads in progress finish for up to C{grace} seconds, then
        abort the C{clients} still reading (see L{txpypi.cache.drain.drain}).
        No download starts any more.
        """
        self.downloads.close()
        await drain(self._clock, grace, clients, self.downloads.flights)


__all__ = ["Busy", "FileCache", "FlightReader", "NotListed", "Opened", "Slots"]

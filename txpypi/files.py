"""
Files: served from the store when cached, else fetched once (single flight)
from the URL that the project's upstream index page listed.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet import defer
from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger

from txpypi.download import (
    ByteSource,
    Ended,
    Flight,
    FlightFailed,
    FlightReader,
    Peer,
    Wanted,
    _spool_error,
    inline,
)
from txpypi.index import DistFile, ProjectPage, file_version
from txpypi.metadata import FileRecord, IMetadata
from txpypi.names import strongest_hash
from txpypi.outages import Unavailable
from txpypi.pages import PageCache, SingleFlight
from txpypi.peer import owner_url, peer_path
from txpypi.stores import IFileStore
from txpypi.upstream import UpstreamClient

log = Logger()

METADATA_SUFFIX = ".metadata"


class NotListed(Exception):
    """
    The project's index does not list the requested file.
    """


@attrs.frozen
class Opened:
    """
    A file ready to send.

    @ivar source: the bytes, or L{None} for a HEAD that fetched nothing.
    @ivar size: its length, when known.
    @ivar sha256: its sha256, when known (always for hits).
    @ivar hit: whether it came from the cache.
    """

    source: ByteSource | None
    size: int | None
    sha256: str | None
    hit: bool


def wanted_for(key: str, upstream: str, dist: DistFile, filename: str) -> Wanted | None:
    """
    What to fetch for C{filename}: the dist itself, or its PEP 658 metadata
    file when C{filename} is the dist's name plus C{.metadata}; L{None} when
    the index offers no such file.
    """
    if filename == dist.filename:
        return Wanted(key, filename, upstream, dist.url, strongest_hash(dist.hashes), dist.size)
    if dist.core_metadata is False:
        return None
    hashes = {} if dist.core_metadata is True else dict(dist.core_metadata)  # type: ignore[arg-type]
    return Wanted(key, filename, upstream, dist.url + METADATA_SUFFIX, strongest_hash(hashes), None)


@attrs.define
class FileCache:
    """
    The files of one upstream group.
    """

    _clock: Any
    _client: UpstreamClient
    _store: IFileStore
    _metadata: IMetadata
    pages: PageCache
    max_records: int = 100_000
    #: Evict the least recently served files when the cache grows past this
    #: many bytes (L{None}: no limit).
    max_size: int | None = None
    _records: OrderedDict[str, FileRecord] = attrs.field(factory=OrderedDict)
    flights: dict[str, Flight] = attrs.field(factory=dict)
    #: Bytes and files in the cache, once L{load_usage} ran.
    size: int | None = None
    count: int | None = None
    evictions: int = 0
    _accessed: dict[str, float] = attrs.field(factory=dict)
    _downloads: dict[tuple[str, str, str], int] = attrs.field(factory=dict)
    _evicting: Deferred[None] | None = None
    _eviction_done: Ended = attrs.field(factory=Ended)
    metrics: Any = None
    #: Files being sent to clients right now.
    senders: set[Any] = attrs.field(factory=set)
    #: Cluster-wide locks (L{txpypi.redismeta.RedisLocks}) when several
    #: instances share the cache, so that one of them fetches each file.
    locks: Any = None
    lock_ttl: float = 30.0
    lock_poll: float = 0.2
    _held: set[str] = attrs.field(factory=set)
    _cluster_flights: SingleFlight[str, FileRecord | Peer | None] = attrs.field(factory=SingleFlight)
    #: Where the other instances reach this one, and the secret that signs
    #: requests between instances: with both, the clients of other
    #: instances receive a download in progress here as it arrives.
    peer_url: str | None = None
    peer_secret: str | None = attrs.field(default=None, repr=False)
    #: When following a peer last failed, by file key.
    _peer_failed: dict[str, float] = attrs.field(factory=dict)
    #: Whether the cache's size is shared with other instances (in Redis):
    #: it is then read again after every change and every minute, and
    #: eviction runs on one instance at a time.
    shared_usage: bool = False
    _reloads: list[Deferred[None]] = attrs.field(factory=list)
    #: How flights write their spool files (a test may inject a full disk).
    spool_write: Callable[[int, memoryview], int] = os.write
    #: How flights hash and spool their bytes (see L{Flight.run}).
    run_spooling: Callable[..., Deferred[Any]] = inline

    async def drain(self, grace: float) -> None:
        """
        Let the downloads in progress finish for up to C{grace} seconds, then
        abort the clients still reading.  Nothing partial is ever committed:
        an unfinished download simply never lands.
        """
        if self.senders or self.flights:
            log.info(
                "shutting down: waiting up to {grace} s for {n} download(s)",
                grace=grace,
                n=len(self.senders),
            )
        if self.senders or self.flights:
            # Clients reading, and downloads that may be about to land.
            waits = [s.when_done() for s in self.senders] + [f.when_done() for f in self.flights.values()]
            finished = DeferredList(waits)
            finished.addTimeout(grace, self._clock)
            try:
                await finished
            except defer.TimeoutError:
                pass
        if self.senders:
            log.warn("shutting down: aborted {n} download(s) past the grace period", n=len(self.senders))
        for sender in list(self.senders):
            sender.abort()

    def _store_error(self, store: str) -> None:
        if self.metrics is not None:
            self.metrics.store_errors.labels(store).inc()

    @staticmethod
    def spool_error() -> str | None:
        """
        The last error writing a spool file, until a file is cached again.
        """
        return _spool_error[0] if _spool_error else None

    async def metadata_ping(self) -> None:
        await self._metadata.ping()

    async def purge(self, project: str, filename: str) -> bool:
        """
        Remove one cached file; C{False} if it was not cached.
        """
        key = self.key(project, filename)
        record = self._records.pop(key, None) or await self._metadata.get_file(key)
        if record is None:
            return False
        self._records.pop(key, None)
        await self._metadata.delete_file(key)
        await self._store.delete(record.store_key)
        if self.size is not None:
            self.size -= record.size
            self.count = None if self.count is None else self.count - 1
        log.info("purged {key}", key=key)
        return True

    async def load_usage(self) -> None:
        """
        Learn the cache's size from the metadata store (in its thread).
        """
        size, count = await self._metadata.usage()
        self.size, self.count = size, count
        self._maybe_evict()

    async def upkeep(self) -> None:
        """
        What runs every minute: write the access times and download counts
        to the metadata store, and (when the cache is shared) learn again
        the size that all the instances together fill.
        """
        await self.flush_accesses()
        if self.shared_usage:
            try:
                await self.load_usage()
            except Unavailable:
                pass  # Redis is down (logged once); read again once it is back

    async def flush_accesses(self) -> None:
        """
        Write the access times and download counts gathered in memory to the
        metadata store.
        """
        accessed, self._accessed = self._accessed, {}
        if accessed:
            await self._metadata.touch_files(accessed)
        downloads, self._downloads = self._downloads, {}
        if downloads:
            await self._metadata.add_downloads(downloads)

    def downloaded(self, project: str, filename: str) -> None:
        """
        Count one whole download of a distribution file (for /stats).
        """
        key = (project, file_version(filename) or "", filename)
        self._downloads[key] = self._downloads.get(key, 0) + 1

    async def top_projects(self, limit: int) -> list[tuple[str, int]]:
        await self.flush_accesses()
        return await self._metadata.top_projects(limit)

    async def project_downloads(self, project: str) -> list[tuple[str, str, int]]:
        await self.flush_accesses()
        return await self._metadata.project_downloads(project)

    def maybe_evict(self) -> None:
        """
        Start an eviction if the cache is over its limit.
        """
        self._maybe_evict()

    def _maybe_evict(self) -> None:
        if self.max_size is None or self.size is None or self.size <= self.max_size:
            return
        if self._evicting is None:
            self._evicting = Deferred.fromCoroutine(self._evict())
            self._evicting.addErrback(_unless_unavailable, "eviction")
            self._evicting.addBoth(self._evicted)

    def _evicted(self, _: object) -> None:
        self._evicting = None
        done, self._eviction_done = self._eviction_done, Ended()
        done.end()

    async def _evict(self) -> None:
        """
        Remove the least recently served files until the cache fits.  Files
        being downloaded are not in the store yet; a file being served stays
        readable by the clients that have it open.
        """
        assert self.max_size is not None
        await self.flush_accesses()
        lock = f"evict/{self.pages.group}"
        if self.shared_usage and self.locks is not None:
            # One instance of the cluster evicts at a time, or they would
            # all remove the same amount.
            if not await self.locks.acquire(lock, self.lock_ttl):
                return
            self._held.add(lock)
        try:
            await self._evict_until_under()
        finally:
            self._release_lock(lock)

    async def _evict_until_under(self) -> None:
        assert self.max_size is not None
        while self.size is not None and self.size > self.max_size:
            if self.shared_usage:  # other instances add and evict too
                self.size, self.count = await self._metadata.usage()
                if self.size <= self.max_size:
                    break
            victims = await self._metadata.least_recent(64)
            if not victims:
                break
            for record in victims:
                if self.size <= self.max_size:
                    break
                await self._metadata.delete_file(record.key)
                self._records.pop(record.key, None)
                await self._store.delete(record.store_key)
                self.size -= record.size
                self.count = None if self.count is None else self.count - 1
                self.evictions += 1
                log.info(
                    "evicted {key} ({size} bytes): cache over {limit} bytes",
                    key=record.key,
                    size=record.size,
                    limit=self.max_size,
                )

    def key(self, project: str, filename: str) -> str:
        return f"{self.pages.group}/{project}/{filename}"

    def _remember(self, record: FileRecord) -> None:
        self._records[record.key] = record
        self._records.move_to_end(record.key)
        while len(self._records) > self.max_records:
            self._records.popitem(last=False)

    def _outdated(self, record: FileRecord, project: str, filename: str) -> str | None:
        """
        Why a cached file must not be served any more, if it must not: it
        came from another upstream, or the fresh index lists another hash.
        """
        if record.upstream != self.pages.upstream.url:
            return f"it came from another upstream ({record.upstream})"
        page = self.pages.fresh(project)
        if page is None or not isinstance(page.model, ProjectPage):
            return None
        dist = page.model.find(filename.removesuffix(METADATA_SUFFIX))
        wanted = None if dist is None else wanted_for(record.key, record.upstream, dist, filename)
        if wanted is not None and wanted.expected_hash is not None:
            algorithm, value = wanted.expected_hash
            if algorithm == "sha256" and value != record.sha256:
                return "the index now lists another hash"
        return None

    async def _get_record(self, key: str) -> FileRecord | None:
        """
        The metadata store's record of C{key}; L{None} while the store is
        down, so that the file is fetched from the upstream.
        """
        try:
            return await self._metadata.get_file(key)
        except Unavailable:
            return None

    async def _open_record(self, record: FileRecord, project: str, filename: str) -> Opened | None:
        """
        Open a cached file, or return L{None} (and forget the record) when
        it is gone, damaged or outdated, so that it is fetched again.  While
        the file store is down, return L{None} and keep the record: the
        file is served from the upstream meanwhile.
        """
        why = self._outdated(record, project, filename)
        try:
            reader = None if why is not None else await self._store.open(record.store_key)
        except Unavailable:
            return None
        if reader is not None and reader.size != record.size:
            why = f"it has {reader.size} bytes, not {record.size}"
            reader.close()
            reader = None
        if reader is None:
            log.warn(
                "not serving cached {key}: {why}; fetching it again",
                key=record.key,
                why=why or "it is gone from the store",
            )
            self._records.pop(record.key, None)
            try:
                await self._metadata.delete_file(record.key)
                if why is not None:
                    await self._store.delete(record.store_key)
            except Unavailable:
                pass  # a store is down (logged once); the record is found bad again later
            if self.size is not None:
                self.size -= record.size
                self.count = None if self.count is None else self.count - 1
            return None
        self._remember(record)
        if self.max_size is not None:
            self._accessed[record.key] = self._clock.seconds()
        return Opened(reader, reader.size, record.sha256, True)

    async def open(self, project: str, filename: str, fetch: bool = True) -> Opened:
        """
        Open a file of C{project} for sending.

        @param fetch: with C{False} (for HEAD), answer from what is known
            without starting an upstream fetch.
        @raise NotListed: the index does not list it.
        @raise txpypi.pages.NotFound: the upstream does not know the project.
        @raise txpypi.upstream.UpstreamError: the upstream page fetch failed.
        @raise txpypi.download.FlightFailed: the file fetch failed before any
            byte could be sent.
        """
        key = self.key(project, filename)
        record = self._records.get(key)
        if record is None and key not in self.flights:
            # A flight may land while we read the store: check memory again.
            record = await self._get_record(key) or self._records.get(key)
        if record is not None:
            opened = await self._open_record(record, project, filename)
            if opened is not None:
                return opened
        flight = self.flights.get(key)
        if flight is None:
            page, _ = await self.pages.get(project)
            assert isinstance(page.model, ProjectPage)
            dist = page.model.find(filename.removesuffix(METADATA_SUFFIX))
            wanted = None if dist is None else wanted_for(key, self.pages.upstream.url, dist, filename)
            if wanted is None:
                raise NotListed(filename)
            if self.pages.offline:
                raise NotListed(f"{filename} is not cached, and we are offline")
            if not fetch:
                return Opened(None, wanted.size, None, False)
            # Another request may have fetched or started it meanwhile.
            record = self._records.get(key)
            if record is not None:
                opened = await self._open_record(record, project, filename)
                if opened is not None:
                    return opened
            peer = None
            if self.locks is not None and key not in self.flights:
                waited = await self._cluster_flights.run(
                    key, lambda: self._lead_or_follow(key, project, filename)
                )
                if isinstance(waited, FileRecord):
                    opened = await self._open_record(waited, project, filename)
                    if opened is not None:
                        return opened
                elif isinstance(waited, Peer):
                    peer = waited
            flight = self.flights.get(key) or self._start(wanted, peer)
        if not flight.joinable:
            # Its first bytes are freed already: the file is about to land.
            if not fetch:
                return Opened(None, flight.size, None, False)
            await flight.when_done()
            return await self.open(project, filename, fetch)
        reader = flight.reader()
        try:
            await flight.wait_started()
        except FlightFailed:
            reader.close()
            if flight.peer is None or flight.has_started:
                raise
            # The peer is gone or done before sending a byte: look again
            # (for the record, the lock) without following peers for a while.
            log.info("could not follow {url}; looking again", url=flight.peer.url)
            self._peer_failed[key] = self._clock.seconds()
            return await self.open(project, filename, fetch)
        except BaseException:
            reader.close()
            raise
        # Joining a flight that has all its bytes verified is as good as a hit.
        hit = flight.verified
        if not fetch:
            reader.close()
            return Opened(None, flight.size, flight.sha256(), hit)
        return Opened(reader, flight.size, flight.sha256(), hit)

    async def wait_idle(self) -> None:
        """
        Wait until no download is in flight, no eviction running and the
        shared size read again after the last download.
        """
        while self.flights or self._evicting is not None or self._reloads:
            if self.flights:
                await next(iter(self.flights.values())).when_done()
            elif self._reloads:
                await self._reloads[0]
            else:
                await self._eviction_done.wait()

    async def _lead_or_follow(self, key: str, project: str, filename: str) -> FileRecord | Peer | None:
        """
        With other instances sharing the cache: take the cluster-wide lock on
        C{key} and return L{None} to fetch it here, or, while another
        instance holds it, follow that instance's download (a L{Peer}) when
        it can be reached, else wait for the file to land in the shared
        store and return its record.  If the holder dies its lock expires
        and an instance that waits takes over.
        """
        assert self.locks is not None
        while True:
            # The record first: a leader releases its lock once it landed.
            record = await self._get_record(key) or self._records.get(key)
            if record is not None:
                self._peer_failed.pop(key, None)
                return record
            holder = None
            try:
                if await self.locks.acquire(key, self.lock_ttl):
                    self._held.add(key)
                    self._peer_failed.pop(key, None)
                    landed = await self._metadata.get_file(key)
                    if landed is not None:  # between our look and our lock
                        self._release_lock(key)
                        return landed
                    return None
                if self.peer_secret is not None:
                    holder = await self.locks.holder(key)
            except Unavailable:
                return None  # Redis is down (logged once): fetch it here
            except Exception:
                log.failure("cluster lock unavailable; fetching {key} here", key=key)
                return None
            if key in self.flights:
                return None  # one of ours started meanwhile: join it
            url = owner_url(holder)
            failed = self._peer_failed.get(key)
            recently_failed = failed is not None and self._clock.seconds() - failed < self.lock_ttl
            if url is not None and url != self.peer_url and not recently_failed:
                assert self.peer_secret is not None
                path = peer_path(self.pages.group, project, filename)
                return Peer(url.rstrip("/") + path, path, self.peer_secret)
            tick: Deferred[None] = Deferred()
            self._clock.callLater(self.lock_poll, tick.callback, None)
            await tick

    def renew_locks(self) -> None:
        """
        Keep the cluster locks of the downloads in progress here alive.
        """
        assert self.locks is not None
        for key in list(self._held):
            self.locks.renew(key, self.lock_ttl).addErrback(
                lambda f, key=key: log.failure("could not renew the lock on {key}", f, key=key)
            )

    def _release_lock(self, key: str) -> None:
        if self.locks is not None and key in self._held:
            self._held.discard(key)
            self.locks.release(key).addErrback(
                lambda f: log.failure("could not release the lock on {key}", f, key=key)
            )

    def peer_reader(self, group: str, project: str, filename: str) -> Flight | None:
        """
        The download of a file in progress here, for another instance to
        follow (not one that is itself following a peer).
        """
        if group != self.pages.group:
            return None
        flight = self.flights.get(self.key(project, filename))
        if flight is None or flight.peer is not None or not flight.joinable:
            return None
        return flight

    def _start(self, wanted: Wanted, peer: Peer | None = None) -> Flight:
        flight = Flight(
            wanted,
            self._client,
            self._store,
            self._metadata,
            self._clock,
            self._landed,
            read_timeout=self._client.read_timeout,
            on_store_error=self._store_error,
            spool_write=self.spool_write,
            run=self.run_spooling,
            peer=peer,
        )
        self.flights[wanted.key] = flight
        if peer is None:
            log.info("fetching {url}", url=wanted.url)
        else:
            log.info(
                "following {url}, where another instance fetches {filename}",
                url=peer.url,
                filename=wanted.filename,
            )
        try:
            flight.start()
        except BaseException:
            self._landed(flight, None)
            raise
        return flight

    def _landed(self, flight: Flight, record: FileRecord | None) -> None:
        self._release_lock(flight.wanted.key)
        if record is not None:
            self._remember(record)
            if self.shared_usage:
                # The shared total counts every instance's files.
                reload = Deferred.fromCoroutine(self.load_usage())
                reload.addErrback(_unless_unavailable, "reading the size")
                self._reloads.append(reload)
                reload.addBoth(lambda _: self._reloads.remove(reload))
            elif self.size is not None:
                self.size += record.size
                self.count = None if self.count is None else self.count + 1
                self._maybe_evict()
        if self.flights.get(flight.wanted.key) is flight:
            del self.flights[flight.wanted.key]


def _unless_unavailable(failure: Any, doing: str) -> None:
    """
    Log a failure, unless a store is down (an outage is logged once).
    """
    if not failure.check(Unavailable):
        log.failure("{doing} failed", failure, doing=doing)


__all__ = ["FileCache", "FlightReader", "NotListed", "Opened"]

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
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from txpypi.cache.pages import NotFound, PageCache
from txpypi.concurrency.turns import Turns
from txpypi.concurrency.waiters import Once, SingleFlight, in_thread_now
from txpypi.core.index import DistFile, ProjectPage, file_version
from txpypi.core.names import strongest_hash
from txpypi.core.peer import owner_url, peer_path
from txpypi.fetch.commit import CommitJournal
from txpypi.fetch.flight import Flight
from txpypi.fetch.punch import PunchPolicy
from txpypi.fetch.reader import FlightReader
from txpypi.fetch.spool import SpoolHealth
from txpypi.fetch.upstream import UpstreamClient
from txpypi.fetch.wanted import ByteSource, FlightFailed, Peer, Wanted
from txpypi.storage.metadata import FileRecord, IMetadata
from txpypi.storage.outages import Unavailable
from txpypi.storage.stores import IFileStore

log = Logger(namespace="txpypi.files")

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
    _eviction_done: Once[None] = attrs.field(factory=Once)
    metrics: Any = None
    #: Files being sent to clients right now.
    senders: set[Any] = attrs.field(factory=set)
    #: Cluster-wide locks (L{txpypi.storage.redismeta.RedisLocks}) when several
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
    #: At most this many downloads at a time (C{--max-downloads}).
    slots: Slots = attrs.field(default=attrs.Factory(lambda self: Slots(self._clock), takes_self=True))
    #: Starting a download (waiting for a slot), one per file.
    #: Shutting down: no download starts any more.
    closing: bool = False
    #: Where commits in progress are written down, so that a crash or a
    #: shutdown in the middle of one leaves no unrecorded file for good.
    journal: CommitJournal | None = None
    #: How flights write their spool files (a test may inject a full disk).
    spool_write: Callable[[int, memoryview], int] = os.write
    #: How flights hash and spool their bytes (see L{Flight.run}).
    run_spooling: Callable[..., Deferred[Any]] = in_thread_now
    #: The last error writing a spool file, shared by this cache's flights.
    spool_health: SpoolHealth = attrs.field(factory=SpoolHealth)
    #: Which spools are freed while they stream into the store, how much at a time.
    punch_policy: PunchPolicy = PunchPolicy()

    async def drain(self, grace: float) -> None:
        """
        Let the downloads in progress finish for up to C{grace} seconds, then
        abort the clients still reading.  Nothing partial is ever committed:
        an unfinished download simply never lands.
        """
        self.closing = True
        self.slots.refuse_waiters(Busy("the proxy is shutting down"))
        if self.senders or self.flights:
            log.info(
                "shutting down: waiting up to {grace} s for {n} download(s)",
                grace=grace,
                n=len(self.senders),
            )
            # Clients reading, and downloads that may be about to land.  Wait
            # on them without cancelling them: they are not ours to cancel.
            waits = [s.when_done() for s in self.senders] + [f.when_done() for f in self.flights.values()]
            await _first_of(DeferredList(waits, consumeErrors=True), grace, self._clock)
        if self.senders:
            log.warn("shutting down: aborted {n} download(s) past the grace period", n=len(self.senders))
        for sender in list(self.senders):
            sender.abort()
        running = list(self.flights.values())
        stopped = [f for f in running if f.stop("the proxy is shutting down")]
        if stopped:
            log.warn("shutting down: stopped {n} upstream fetch(es) past the grace period", n=len(stopped))
        # Downloads that were verified are landing (bounded by the stores'
        # timeouts), and stopped ones cleaning up (an S3 upload aborted):
        # before the stores close.
        await DeferredList([f.when_done() for f in running], consumeErrors=True)

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
        return self.spool_health.message

    async def metadata_ping(self) -> None:
        await self._metadata.ping()

    async def purge(self, project: str, filename: str) -> bool:
        """
        Remove one cached file; C{False} if it was not cached.
        """
        key = self.key(project, filename)
        self._records.pop(key, None)
        deleted = await self._metadata.delete_file(key)
        if deleted is None:
            return False
        self._records.pop(key, None)
        self._account(-deleted.size, -1)
        await self._store.delete(deleted.store_key)
        log.info("purged {key}", key=key)
        return True

    async def recover_commits(self) -> None:
        """
        At start-up: the commits that an earlier process left unfinished
        (killed, or its metadata store closed under it) may have put an
        object in the store without a record, which nothing would ever
        count, serve or evict.  Remove each such object.  A marker is kept
        while the metadata or file store cannot answer, for the next start.
        """
        journal = self.journal
        if journal is None:
            return
        for path, entry in await self.run_spooling(journal.pending):
            key, store_key = entry["key"], entry["store_key"]
            try:
                record = await self._metadata.get_file(key)
                if record is None or record.store_key != store_key:
                    if key in self.flights:
                        continue  # fetched again right now: it records its own
                    await self._store.delete(store_key)
                    log.warn("removed {store_key}: its commit never finished", store_key=store_key)
            except Unavailable:
                continue
            await self.run_spooling(journal.end, path)

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
        if not self._over_limit():
            return
        if self._evicting is None:
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

    def spooling(self) -> int:
        """
        The bytes of the downloads in progress here that are to be cached:
        they count towards the size limit before they land.
        """
        return sum(f.expected_bytes() for f in self.flights.values())

    def _over_limit(self) -> bool:
        return (
            self.max_size is not None
            and self.size is not None
            and self.size + self.spooling() > self.max_size
        )

    async def _evict_until_under(self) -> None:
        assert self.max_size is not None
        while self._over_limit():
            if self.shared_usage:  # other instances add and evict too
                self.size, self.count = await self._metadata.usage()
                if not self._over_limit():
                    break
            victims = await self._metadata.least_recent(64)
            evicted = 0
            for record in victims:
                if not self._over_limit():
                    break
                # Only if it is still that record: one that was purged, or
                # replaced by a new landing, meanwhile is not counted twice.
                deleted = await self._metadata.delete_file(record.key, record)
                if deleted is None:
                    continue
                if self._records.get(record.key) == record:
                    del self._records[record.key]
                self._account(-deleted.size, -1)
                await self._store.delete(deleted.store_key)
                evicted += 1
                self.evictions += 1
                log.info(
                    "evicted {key} ({size} bytes): cache over {limit} bytes",
                    key=record.key,
                    size=record.size,
                    limit=self.max_size,
                )
            if not evicted:
                break

    def key(self, project: str, filename: str) -> str:
        return f"{self.pages.group}/{project}/{filename}"

    def _remember(self, record: FileRecord) -> None:
        self._records[record.key] = record
        self._records.move_to_end(record.key)
        while len(self._records) > self.max_records:
            self._records.popitem(last=False)

    async def _listed(self, record: FileRecord, project: str, filename: str) -> str | None:
        """
        Check a cached file against the project's current index page (fresh,
        or stale while the upstream fails): the reason to fetch it again if
        the page lists it otherwise (another hash, or another URL when the
        page gives no sha256), else L{None}.

        @raise NotListed: the page no longer lists it (the upstream delisted
            it: a removed release must not live on in the cache); the
            record is dropped.
        @raise txpypi.cache.pages.NotFound: the upstream no longer knows the
            project (the record is dropped), or, offline, its page is not
            cached (the record is kept).
        @raise txpypi.fetch.upstream.UpstreamError: there is no page to check it
            against: the upstream fails and no stale copy is usable.
        """
        if record.upstream != self.pages.upstream.url:
            return f"it came from another upstream ({record.upstream})"
        try:
            page, _ = await self.pages.get(project)
        except NotFound:
            if not self.pages.offline:
                await self._drop(record, "the upstream no longer knows its project")
            raise
        assert isinstance(page.model, ProjectPage)
        dist = page.model.find(filename.removesuffix(METADATA_SUFFIX))
        wanted = None if dist is None else wanted_for(record.key, record.upstream, dist, filename)
        if wanted is None:
            await self._drop(record, "the upstream no longer lists it")
            raise NotListed(f"{filename} is no longer listed")
        if wanted.expected_hash is not None and wanted.expected_hash[0] == "sha256":
            if wanted.expected_hash[1] != record.sha256:
                return "the index now lists another hash"
        elif wanted.url != record.url:
            return "the index now lists it at another URL"
        return None

    async def _drop(self, record: FileRecord, why: str, delete_object: bool = True) -> None:
        """
        Forget a cached file: its record -- only if it is still this record,
        not one that landed meanwhile -- and, with C{delete_object}, its
        bytes.  The size and count change by what the metadata store says it
        deleted, so a file dropped twice at once is counted out once.
        """
        log.warn("dropping cached {key}: {why}", key=record.key, why=why)
        if self._records.get(record.key) == record:
            del self._records[record.key]
        try:
            deleted = await self._metadata.delete_file(record.key, record)
            if deleted is not None:
                self._account(-deleted.size, -1)
                if delete_object:
                    await self._store.delete(deleted.store_key)
        except Unavailable:
            pass  # a store is down (logged once); the record is found bad again later

    def _account(self, size: int, count: int) -> None:
        if self.size is not None:
            self.size += size
        if self.count is not None:
            self.count += count

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
        Open a cached file that its index still lists, or return L{None}
        (and drop the record) when it is gone, damaged or outdated, so that
        it is fetched again.  While the file store is down, return L{None}
        and keep the record: the file is served from the upstream meanwhile.
        """
        why = await self._listed(record, project, filename)
        if why is not None:
            await self._drop(record, f"{why}; fetching it again")
            return None
        try:
            reader = await self._store.open(record.store_key)
        except Unavailable:
            return None
        if reader is None:
            await self._drop(record, "it is gone from the store; fetching it again", delete_object=False)
            return None
        if reader.size != record.size:
            reader.close()
            await self._drop(record, f"it has {reader.size} bytes, not {record.size}; fetching it again")
            return None
        self._remember(record)
        if self.max_size is not None:
            self._accessed[record.key] = self._clock.seconds()
        return Opened(reader, reader.size, record.sha256, True)

    async def open(
        self, project: str, filename: str, fetch: bool = True, use_store: bool = True, again: bool = False
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
        @param again: this is the call's own retry (it retries once).
        """
        key = self.key(project, filename)
        record = self._records.get(key) if use_store else None
        if use_store and record is None and key not in self.flights:
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
            record = self._records.get(key) if use_store else None
            if record is not None:
                opened = await self._open_record(record, project, filename)
                if opened is not None:
                    return opened
            peer = None
            if self.locks is not None and use_store and key not in self.flights:
                waited = await self._cluster_flights.run(
                    key, lambda: self._lead_or_follow(key, project, filename)
                )
                if isinstance(waited, FileRecord):
                    opened = await self._open_record(waited, project, filename)
                    if opened is not None:
                        return opened
                elif isinstance(waited, Peer):
                    peer = waited
            flight = self.flights.get(key) or await self._begin(wanted, peer)
        if flight.done:
            # Over before we could join it (only a download that takes no
            # time at all can be): its outcome is all there is.
            if flight.failure is not None:
                raise flight.failure
            if again or not use_store:
                raise FlightFailed(503, "the download ended before it could be joined; ask again")
            return await self.open(project, filename, fetch, use_store, again=True)
        if not flight.joinable:
            # Its first bytes are freed already: the file is about to land.
            if not fetch:
                return Opened(None, flight.size, None, False)
            await flight.when_done()
            return await self.open(project, filename, fetch, use_store)
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
            return await self.open(project, filename, fetch, use_store)
        except BaseException:
            reader.close()
            raise
        self._maybe_evict()  # its size is known now, and counts
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

    async def wait_evicted(self) -> None:
        """
        Wait until no eviction is running.
        """
        while self._evicting is not None:
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

    async def _begin(self, wanted: Wanted, peer: Peer | None) -> Flight:
        """
        Start the download once one of the C{max_downloads} slots is free
        (waiting for one at most C{--response-timeout}), unless another
        request started it meanwhile.  Each request waits on its own, so a
        client that leaves (its request cancelled) leaves the queue.

        @raise Busy: no slot came free in time, or the proxy is shutting
            down.
        """
        flight = self.flights.get(wanted.key)
        if flight is not None:
            return flight
        if self.closing:
            raise Busy("the proxy is shutting down")
        timeout = self._client.response_timeout
        try:
            await self.slots.acquire(timeout)
        except Busy:
            log.warn(
                "refused {filename}: {n} downloads in progress for {timeout:g} s",
                filename=wanted.filename,
                n=self.slots.running,
                timeout=timeout,
            )
            raise
        flight = self.flights.get(wanted.key)
        if flight is not None or self.closing:
            self.slots.release()
            if flight is None:
                raise Busy("the proxy is shutting down")
            return flight
        try:
            return self._start(wanted, peer)
        except OSError as e:
            self.slots.release()  # the flight never started: the slot is still ours
            self.count_store_error("files")
            log.error("cannot start the download of {filename}: {error}", filename=wanted.filename, error=e)
            raise FlightFailed(503, f"cannot start the download: {e.strerror or e}") from e
        except BaseException:
            self.slots.release()
            raise

    def _start(self, wanted: Wanted, peer: Peer | None = None) -> Flight:
        flight = Flight(
            wanted,
            self._client,
            self._store,
            self._metadata,
            self._clock,
            self._landed,
            read_timeout=self._client.read_timeout,
            min_rate=self._client.min_rate,
            on_store_error=self.count_store_error,
            spool_write=self.spool_write,
            run=self.run_spooling,
            peer=peer,
            journal=self.journal,
            spool_health=self.spool_health,
            punch_policy=self.punch_policy,
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
            # Never started: not a download that lands (its caller gives
            # its slot back).
            self._release_lock(wanted.key)
            if self.flights.get(wanted.key) is flight:
                del self.flights[wanted.key]
            raise
        return flight

    def _landed(self, flight: Flight, record: FileRecord | None) -> None:
        """
        A download that started is over: cached (C{record}), or not.  Its
        slot is free again, and its bytes are counted as the cache's, not
        the spool's.
        """
        self._release_lock(flight.wanted.key)
        if self.flights.get(flight.wanted.key) is flight:
            del self.flights[flight.wanted.key]
        self.slots.release()  # (at shutdown nobody waits: the queue was refused)
        if record is not None:
            self._remember(record)
            if self.shared_usage:
                # The shared total counts every instance's files.
                reload = Deferred.fromCoroutine(self.load_usage())
                reload.addErrback(_unless_unavailable, "reading the size")
                self._reloads.append(reload)
                reload.addBoth(lambda _: self._reloads.remove(reload))
            else:
                # A file recorded again (after a store outage, say) replaced
                # its old record: count the difference, not the file twice.
                replaced = flight.replaced
                self._account(
                    record.size - (0 if replaced is None else replaced.size), 1 if replaced is None else 0
                )
                self._maybe_evict()


class Busy(Exception):
    """
    Too many downloads are in progress, and none ended in time: the client
    is told to come back (C{503} with C{Retry-After}).
    """

    def __init__(self, reason: str, retry_after: int = 5) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class Slots(Turns):
    """
    At most C{limit} downloads at a time (C{--max-downloads}); a download
    over it waits for a slot (see L{Turns}), then fails with L{Busy}.
    """

    def __init__(self, clock: IReactorTime, limit: int = 16) -> None:
        super().__init__(clock, limit, _busy)


def _busy(timeout: float, running: int) -> Exception:
    return Busy(f"{running} downloads are in progress; try again shortly")


async def _first_of(work: Deferred[Any], seconds: float, clock: IReactorTime) -> None:
    """
    Wait until C{work} fires or C{seconds} pass, whichever comes first,
    without cancelling C{work}.
    """
    over: Deferred[None] = Deferred()

    def end(_: object) -> None:
        if not over.called:
            over.callback(None)

    work.addBoth(end)
    timer = clock.callLater(seconds, end, None)
    await over
    if timer.active():
        timer.cancel()


def _unless_unavailable(failure: Any, doing: str) -> None:
    """
    Log a failure, unless a store is down (an outage is logged once).
    """
    if not failure.check(Unavailable):
        log.failure("{doing} failed", failure, doing=doing)


__all__ = ["Busy", "FileCache", "FlightReader", "NotListed", "Opened", "Slots"]

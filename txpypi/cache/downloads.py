"""
The downloads in progress here: one flight per file, at most
C{--max-downloads} at a time (L{Slots}), none started once shutting down.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from txpypi.cache.coordinator import ICoordinator
from txpypi.cache.records import Records
from txpypi.cache.slots import Busy, Slots
from txpypi.cache.usage import Usage
from txpypi.concurrency.waiters import in_thread_now
from txpypi.fetch.clients import FileClient
from txpypi.fetch.commit import CommitJournal
from txpypi.fetch.flight import Flight
from txpypi.fetch.punch import PunchPolicy
from txpypi.fetch.spool import SpoolHealth
from txpypi.fetch.tuning import FlightTuning
from txpypi.fetch.wanted import FlightFailed, Peer, Wanted
from txpypi.storage.metadata import FileRecord, IMetadata
from txpypi.storage.outages import Unavailable
from txpypi.storage.stores import IFileStore

log = Logger(namespace="txpypi.files")


@attrs.define
class Downloads:
    """
    Starts flights and forgets them once they are over: their slot is free
    again, their claim released, and what landed is remembered and counted.
    """

    _clock: IReactorTime
    _client: FileClient
    _store: IFileStore
    _metadata: IMetadata
    _records: Records
    _usage: Usage
    _coordinator: ICoordinator
    #: Count a failed call to a store (C{files} or C{metadata}).
    _on_store_error: Callable[[str], None]
    flights: dict[str, Flight]
    #: Where commits in progress are written down, so that a crash or a
    #: shutdown in the middle of one leaves no unrecorded file for good.
    journal: CommitJournal | None = None
    #: How flights write their spool files (a test may inject a full disk).
    spool_write: Callable[[int, memoryview], int] = os.write
    #: How flights hash and spool their bytes (see L{Flight.run}).
    run_spooling: Callable[..., Deferred[Any]] = in_thread_now
    #: The last error writing a spool file, shared by every flight.
    spool_health: SpoolHealth = attrs.field(factory=SpoolHealth)
    #: When and how far a flight frees the spool prefix S3 already has.
    punch_policy: PunchPolicy = PunchPolicy()
    #: At most this many downloads at a time (C{--max-downloads}).
    slots: Slots = attrs.field(kw_only=True)
    #: Shutting down: no download starts any more.
    closing: bool = False

    def peer_reader(self, key: str) -> Flight | None:
        """
        The download of C{key} in progress here, for another instance to
        follow (not one that is itself following a peer).
        """
        flight = self.flights.get(key)
        if flight is None or flight.peer is not None or not flight.joinable:
            return None
        return flight

    def close(self) -> None:
        """
        Start no download any more, and refuse those waiting for a slot.
        """
        self.closing = True
        self.slots.refuse_waiters(Busy("the proxy is shutting down"))

    async def recover_commits(self) -> None:
        """
        At start-up: the commits that an earlier process left unfinished
        (killed, or its metadata store closed under it) may have put an
        object in the store without a record, which nothing would ever
        count, serve or evict.  Remove each such object.  A marker is kept
        while the metadata or file store cannot answer, for the next start.
        """
        journal, run = self.journal, self.run_spooling
        if journal is None:
            return
        for path, entry in await run(journal.pending):
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
            await run(journal.end, path)

    async def begin(self, wanted: Wanted, peer: Peer | None) -> Flight:
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
            self._on_store_error("files")
            log.error("cannot start the download of {filename}: {error}", filename=wanted.filename, error=e)
            raise FlightFailed(503, f"cannot start the download: {e.strerror or e}") from e
        except BaseException:
            self.slots.release()
            raise

    def _start(self, wanted: Wanted, peer: Peer | None) -> Flight:
        flight = Flight(
            wanted,
            self._client,
            self._store,
            self._metadata,
            self._clock,
            tuning=FlightTuning(
                read_timeout=self._client.read_timeout,
                min_rate=self._client.min_rate,
                spool_write=self.spool_write,
                run=self.run_spooling,
                punch_policy=self.punch_policy,
            ),
            on_store_error=self._on_store_error,
            peer=peer,
            journal=self.journal,
            spool_health=self.spool_health,
        )
        self.flights[wanted.key] = flight
        flight.finished().addCallback(lambda record: self._landed(flight, record))
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
            self._forget(flight)
            raise
        return flight

    def _forget(self, flight: Flight) -> None:
        self._coordinator.release(flight.wanted.key)
        if self.flights.get(flight.wanted.key) is flight:
            del self.flights[flight.wanted.key]

    def _landed(self, flight: Flight, record: FileRecord | None) -> None:
        """
        A download that started is over: cached (C{record}), or not.  Its
        slot is free again, and its bytes are counted as the cache's, not
        the spool's.
        """
        self._forget(flight)
        self.slots.release()  # (at shutdown nobody waits: the queue was refused)
        if record is not None:
            self._records.remember(record)
            self._usage.landed(record, flight.replaced)


__all__ = ["Downloads"]

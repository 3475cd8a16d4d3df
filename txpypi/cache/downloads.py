"""
The downloads in progress here: one flight per file, at most
C{--max-downloads} at a time (L{Slots}), none started once shutting down.
"""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from txpypi.cache.coordinator import ICoordinator
from txpypi.cache.records import Records
from txpypi.cache.slots import Busy, Slots
from txpypi.cache.usage import Usage
from txpypi.concurrency.waiters import in_thread_now, when_late
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
    #: The peers waiting for the flight of a file whose claim is held here
    #: but whose download has not started yet (it waits for a slot, or the
    #: claim for its last look at the store), by key.  Bound: the keys are
    #: the claims held here; the waiters, signed requests of the other
    #: instances (each follows a file once at a time), and each waits at
    #: most the response timeout.
    _awaited: dict[str, list[Deferred[Flight | None]]] = attrs.field(factory=dict, init=False)
    #: How many calls of L{begin} are under way, by key.
    _beginning: Counter[str] = attrs.field(factory=Counter, init=False)

    def __attrs_post_init__(self) -> None:
        self._coordinator.on_release(self._claim_over)

    def peer_reader(self, key: str) -> Flight | None:
        """
        The download of C{key} in progress here, for another instance to
        follow (not one that is itself following a peer).
        """
        flight = self.flights.get(key)
        if flight is None or flight.peer is not None or not flight.joinable:
            return None
        return flight

    def flight_for_peer(self, key: str) -> Deferred[Flight | None]:
        """
        The download of C{key} for another instance to follow: the one in
        progress here, or, while this instance holds the claim of C{key}
        and its download is about to start, that one once it has; L{None}
        if there is none, or none started within the response timeout.

        Another instance follows this one as soon as it sees the claim
        taken, which may be before the download starts here: answering it
        "not downloading here" would send it to wait for the landing.
        """
        flight = self.peer_reader(key)
        if flight is not None or not self._coordinator.holds(key):
            return succeed(flight)
        waiters = self._awaited.setdefault(key, [])
        d: Deferred[Flight | None] = Deferred(lambda d: self._unwait(key, d))
        waiters.append(d)
        when_late(self._clock, d, self._client.response_timeout, lambda: self._give_up(key, d))
        return d

    def _unwait(self, key: str, d: Deferred[Flight | None]) -> None:
        waiters = self._awaited.get(key, [])
        if d in waiters:
            waiters.remove(d)
        if not waiters:
            self._awaited.pop(key, None)

    def _give_up(self, key: str, d: Deferred[Flight | None]) -> None:
        self._unwait(key, d)
        d.callback(None)

    def _tell_peers(self, key: str) -> None:
        """
        The download of C{key} started, or will not: tell the peers waiting for it.
        """
        for d in self._awaited.pop(key, []):
            d.callback(self.peer_reader(key))

    def _claim_over(self, key: str) -> None:
        self._tell_peers(key)

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

    async def begin(self, wanted: Wanted, peer: Peer | None, claimed: bool = False) -> Flight:
        """
        Start the download once one of the C{max_downloads} slots is free
        (waiting for one at most C{--response-timeout}), unless another
        request started it meanwhile.  Each request waits on its own, so a
        client that leaves (its request cancelled) leaves the queue.

        @param claimed: the caller's claim of the file led (see
            L{ICoordinator.claim}): when no download starts after all (no
            slot, shutting down, no spool), the claim is let go once no
            other call is still starting it, or the file would stay
            claimed here with nobody fetching it.

        @raise Busy: no slot came free in time, or the proxy is shutting
            down.
        """
        key = wanted.key
        self._beginning[key] += 1
        try:
            return await self._begin(wanted, peer)
        finally:
            self._beginning[key] -= 1
            if not self._beginning[key]:
                del self._beginning[key]
                if claimed and key not in self.flights:
                    self._coordinator.release(key)

    async def _begin(self, wanted: Wanted, peer: Peer | None) -> Flight:
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
        self._tell_peers(wanted.key)
        if peer is None and self._coordinator.takes_notes:
            started = Deferred.fromCoroutine(flight.wait_started())
            started.addCallbacks(lambda _: self._spooling(flight), lambda _: None)
        return flight

    def _spooling(self, flight: Flight) -> None:
        """
        C{flight} started: tell the followers of this machine where it spools.
        """
        self._coordinator.spooling(flight.wanted.key, flight.spool_note())

    def _forget(self, flight: Flight) -> None:
        if self.flights.get(flight.wanted.key) is flight:
            del self.flights[flight.wanted.key]
        self._coordinator.release(flight.wanted.key)

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

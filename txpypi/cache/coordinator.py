"""
Who downloads a file: one instance alone fetches every file it lacks
(L{LocalCoordinator}); instances that share a cache take a shared lock per
file, and the others follow the holder's download or wait for the file to
land (L{SharedCoordinator}: the lock is the cluster's in Redis, or, for the
worker processes of one machine, a file lock).  L{txpypi.cache.files.FileCache} asks
its coordinator and does not know which it has.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable
from functools import partial
from typing import Protocol, runtime_checkable
from urllib.parse import urlsplit

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface, implementer

from txpypi.concurrency.waiters import SingleFlight
from txpypi.core.peer import owner_url
from txpypi.fetch.wanted import Peer
from txpypi.storage.metadata import FileRecord, IMetadata
from txpypi.storage.outages import Unavailable, known_file

log = Logger(namespace="txpypi.files")

#: What a claim tells: L{None} to fetch the file here (or join the download
#: of it in progress here), a L{Peer} whose download to follow, or the
#: record of the file, which landed meanwhile.
Claim = FileRecord | Peer | None


class Locks(Protocol):
    """
    Named locks that instances share: L{txpypi.storage.redismeta.RedisLocks}
    or L{txpypi.storage.filelocks.FileLocks}.
    """

    def acquire(self, name: str, ttl: float) -> Deferred[bool]: ...

    def renew(self, name: str, ttl: float) -> Deferred[bool]: ...

    def release(self, name: str) -> Deferred[None]: ...

    def holder(self, name: str) -> Deferred[str | None]: ...


@runtime_checkable
class NotedLocks(Locks, Protocol):
    """
    Locks whose holder can leave a note for the others, each of them on
    this machine (L{txpypi.storage.filelocks.FileLocks}): where it spools
    the file it fetches, for them to read it from there.
    """

    def note(self, name: str, text: str) -> None: ...

    def notes(self, name: str) -> str | None: ...


class Here(Protocol):
    """
    What this instance knows of a file without asking the cluster.
    """

    def remembered(self, key: str) -> FileRecord | None:
        """
        The record of C{key} in memory, if any.
        """

    def fetching(self, key: str) -> bool:
        """
        Whether a download of C{key} is in progress here.
        """


class ICoordinator(Interface):
    """
    Decides which instance downloads each file, and hands out exclusive
    names (for work that one instance at a time does, like eviction).
    """

    lock_first = Attribute(
        """
        Whether a claim is best made before looking in the store: its lock
        is taken at no cost (a file lock of this machine's workers), and a
        claim whose caller has not looked (C{looked=True}) looks once the
        lock is taken, or not at all when another instance holds it.
        """
    )

    takes_notes = Attribute(
        """
        Whether L{spooling} tells anyone anything: followers on this machine
        read the notes its locks carry.  Without, a download's start need
        not be waited for to tell them.
        """
    )

    def claim(key: str, peer_path: str, here: Here, looked: bool = False) -> Deferred[Claim]:
        """
        Who fetches C{key}: see L{Claim}.  Claims of one key made while one
        is being decided share its answer.  A claim that leads holds C{key}
        until L{release}.

        @param peer_path: the path of the file on the peer route, to follow
            another instance's download of it.
        @param looked: the caller has just looked C{key} up in the store
            and not found it, so the claim's own first look is skipped (a
            record that lands meanwhile is found once the lock is taken).
        """

    def spooling(key: str, note: str) -> None:
        """
        The download of C{key}, claimed here, started: tell the followers
        on this machine C{note} (see L{txpypi.fetch.flight.Flight.spool_note}).
        """

    def follow_failed(key: str) -> None:
        """
        Following a peer's download of C{key} failed before its first byte:
        do not follow peers for it for a while.
        """

    def take(name: str) -> Deferred[bool]:
        """
        Hold C{name} until L{release}; C{False} if it is held already.

        @raise txpypi.storage.outages.Unavailable: the cluster cannot tell.
        """

    def release(name: str) -> None:
        """
        Let go of C{name} (a claimed key or a taken name) if it is held here.
        """

    def holds(name: str) -> bool:
        """
        Whether C{name} (a claimed key or a taken name) is held here.
        """

    def on_release(listener: Callable[[str], None]) -> None:
        """
        Call C{listener(name)} whenever a name held here is let go (the
        downloads here tell the peers waiting for a claimed file's flight
        that none is coming).
        """

    def renew() -> None:
        """
        Keep what is held here held (called every third of the lock TTL).
        """


@attrs.define
class _Names:
    """
    The names a coordinator holds here, and who hears when it lets go of one.
    """

    _held: set[str] = attrs.field(factory=set, kw_only=True)
    _listeners: list[Callable[[str], None]] = attrs.field(factory=list, kw_only=True)

    def holds(self, name: str) -> bool:
        return name in self._held

    def on_release(self, listener: Callable[[str], None]) -> None:
        self._listeners.append(listener)

    def _forget(self, name: str) -> bool:
        """
        No longer hold C{name}; whether it was held.
        """
        if name not in self._held:
            return False
        self._held.discard(name)
        return True

    def _tell(self, name: str) -> None:
        for listener in self._listeners:
            listener(name)


@implementer(ICoordinator)
@attrs.define
class LocalCoordinator(_Names):
    """
    One instance alone: it fetches every file itself (the downloads in
    progress here are joined, see L{txpypi.cache.downloads.Downloads}), and
    names are held in memory.
    """

    #: Alone, the store is looked at first: a claim only says "fetch it".
    lock_first: bool = False
    #: Nobody follows a download here from its spool.
    takes_notes: bool = False

    def claim(self, key: str, peer_path: str, here: Here, looked: bool = False) -> Deferred[Claim]:
        return succeed(None)

    def spooling(self, key: str, note: str) -> None:
        pass  # there is nobody to tell

    def follow_failed(self, key: str) -> None:
        pass  # there are no peers to follow

    def take(self, name: str) -> Deferred[bool]:
        if name in self._held:
            return succeed(False)
        self._held.add(name)
        return succeed(True)

    def release(self, name: str) -> None:
        if self._forget(name):
            self._tell(name)

    def renew(self) -> None:
        pass  # nothing here expires


@implementer(ICoordinator)
@attrs.define
class SharedCoordinator(_Names):
    """
    Instances sharing one cache: a shared lock (L{Locks}) per
    file decides which instance fetches it; while another holds it, follow
    that instance's download when it can be reached (C{peer_url} and
    C{peer_secret}), else wait for the file to land in the shared store.
    A holder that dies lets its lock expire and a waiting instance takes
    over.
    """

    _locks: Locks
    _metadata: IMetadata
    _clock: IReactorTime
    #: Where the other instances reach this one, and the secret that signs
    #: requests between instances.
    peer_url: str | None = None
    peer_secret: str | None = attrs.field(default=None, repr=False)
    lock_ttl: float = 30.0
    lock_poll: float = 0.2
    #: See L{ICoordinator.lock_first}: for file locks, not Redis's.
    lock_first: bool = False
    _claims: SingleFlight[str, Claim] = attrs.field(factory=SingleFlight)
    #: When following a peer last failed, by file key.
    _peer_failed: dict[str, float] = attrs.field(factory=dict)
    #: The locks, when they carry their holder's notes (decided once).
    _noted: NotedLocks | None = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._noted = self._locks if isinstance(self._locks, NotedLocks) else None

    @property
    def takes_notes(self) -> bool:
        return self._noted is not None

    def claim(self, key: str, peer_path: str, here: Here, looked: bool = False) -> Deferred[Claim]:
        return self._claims.run(key, lambda: self._lead_or_follow(key, peer_path, here, looked))

    async def _lead_or_follow(self, key: str, path: str, here: Here, looked: bool) -> Claim:
        while True:
            # The record first: a leader releases its lock once it landed.
            # (Not when the caller just looked: one trip to the store less
            # before a miss's first byte.)
            stored = None if looked else await known_file(self._metadata, key)
            looked = False
            record = stored or here.remembered(key)
            if record is not None:
                self._peer_failed.pop(key, None)
                return record
            holder = None
            try:
                if await self._locks.acquire(key, self.lock_ttl):
                    self._held.add(key)
                    self._peer_failed.pop(key, None)
                    landed = await self._metadata.get_file(key)
                    if landed is not None:  # between our look and our lock
                        self.release(key)
                    return landed
                if self.peer_secret is not None:
                    holder = await self._locks.holder(key)
            except Unavailable:
                return None  # Redis is down (logged once): fetch it here
            except Exception:
                log.failure("cluster lock unavailable; fetching {key} here", key=key)
                return None
            if here.fetching(key):
                return None  # one of ours started meanwhile: join it
            peer = self._peer(key, path, holder)
            if peer is not None:
                return peer
            await deferLater(self._clock, self.lock_poll)

    def _peer(self, key: str, path: str, holder: str | None) -> Peer | None:
        """
        The holder of C{key}'s lock as a peer to follow, unless it is this
        instance, cannot be reached, or failed us a moment ago.
        """
        url = owner_url(holder)
        failed = self._peer_failed.get(key)
        recently_failed = failed is not None and self._clock.seconds() - failed < self.lock_ttl
        if url is None or url == self.peer_url or recently_failed or not _reachable(url, holder):
            return None
        assert self.peer_secret is not None
        notes = None if self._noted is None else partial(self._noted.notes, key)
        return Peer(url.rstrip("/") + path, path, self.peer_secret, notes)

    def spooling(self, key: str, note: str) -> None:
        if key in self._held and self._noted is not None:
            try:
                self._noted.note(key, note)
            except OSError as e:
                log.warn("cannot leave the note of {key}: {error}", key=key, error=e)

    def follow_failed(self, key: str) -> None:
        self._peer_failed[key] = self._clock.seconds()

    async def _take(self, name: str) -> bool:
        if not await self._locks.acquire(name, self.lock_ttl):
            return False
        self._held.add(name)
        return True

    def take(self, name: str) -> Deferred[bool]:
        return Deferred.fromCoroutine(self._take(name))

    def release(self, name: str) -> None:
        if self._forget(name):
            self._locks.release(name).addErrback(
                lambda f: log.failure("could not release the lock on {key}", f, key=name)
            )
            self._tell(name)

    def renew(self) -> None:
        for key in list(self._held):
            self._locks.renew(key, self.lock_ttl).addErrback(_renew_failed, key)


def _reachable(url: str, holder: str | None) -> bool:
    """
    Whether a holder's peer URL can be reached from here: a loopback one
    (a worker of a machine, with --redis but no --peer-url) only from the
    holder's own machine, whose name begins its instance id.
    """
    host = urlsplit(url).hostname or ""
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = host == "localhost"
    return not loopback or (holder or "").split(":", 1)[0] == socket.gethostname()


def _renew_failed(failure: Failure, key: str) -> None:
    log.failure("could not renew the lock on {key}", failure, key=key)


__all__ = ["Claim", "Here", "ICoordinator", "LocalCoordinator", "Locks", "NotedLocks", "SharedCoordinator"]

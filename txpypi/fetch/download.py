"""
Streaming files to clients while caching them.

A L{Flight} is the one upstream fetch of one file.  It writes the upstream's
bytes to a spool file as they arrive, hashing them, and never throttles the
upstream for its clients: the spool on disk is the buffer, so memory stays
flat however many clients read and however slow they are.  Hashing and spool
writes run in a worker thread (both release the GIL), a batch at a time, so
the reactor thread only moves bytes between sockets; the upstream is paused
only while the worker is behind by L{QUEUE_HIGH} bytes.  Every client is a L{Sender}: a push
producer registered on its request that reads the spool at its own pace with
C{pread}, waiting for more bytes when it has caught up.  The last byte written
is held back from every client until the hash and length check out, so a
client never receives a complete-looking wrong file; on failure every
client's connection is aborted and nothing is cached.

Cached files are sent by the same L{Sender} from a store reader.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time
import uuid
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

import attrs
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from twisted.web.server import Request
from zope.interface import implementer

from txpypi.concurrency.waiters import Progress, in_thread_now
from txpypi.core.names import Hasher
from txpypi.core.peer import HEADER, sign
from txpypi.fetch.upstream import UpstreamClient, UpstreamError, UpstreamNotFound
from txpypi.storage.metadata import FileRecord, IMetadata
from txpypi.storage.outages import Unavailable
from txpypi.storage.stores import IFileStore, IStreamingUpload, IUpload, file_key

log = Logger(namespace="txpypi.download")

CHUNK = 256 * 1024

#: How much an upstream file connection reads from its socket at once.
RECV_SIZE = 1024 * 1024

#: Received bytes that may wait for the worker thread to hash and spool them
#: before the upstream is paused; it is resumed below half of it.
QUEUE_HIGH = 8 * 1024 * 1024

#: Files at least this big, that the store takes while they download (S3):
#: the spool's prefix that the store has and every client has read is freed
#: (a hole punched in the file), L{PUNCH_STEP} bytes at a time, so that the
#: file is never held whole on local disk.  Clients that come later wait for
#: the file to land and read it from the store.
PUNCH_MIN = 64 * 1024 * 1024
PUNCH_STEP = 8 * 1024 * 1024

#: When the spool cannot be written, a flight keeps its bytes in memory for
#: its clients; past this many it pauses the upstream until they catch up.
MEMORY_HIGH = 8 * 1024 * 1024

#: The last spool error logged, so that a full disk is logged once, not once
#: per download; cleared when a file is cached again.
_spool_error: list[str] = []


class Ended:
    """
    Something that ends once: L{wait} gives a new Deferred that fires when
    it has (at once if it already has), and cancelling one waiter touches
    no other.
    """

    def __init__(self) -> None:
        self.ended = False
        self._waiters: list[Deferred[None]] = []

    def wait(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        if self.ended:
            d.callback(None)
        else:
            self._waiters.append(d)
        return d

    def end(self) -> None:
        self.ended = True
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            if not d.called:
                d.callback(None)


class FlightFailed(Exception):
    """
    The upstream fetch failed; C{status} and C{reason} say how (for clients
    who have not yet been sent headers).
    """

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class ByteSource(Protocol):
    @property
    def size(self) -> int | None: ...

    def read(self, offset: int, length: int) -> Deferred[bytes]: ...

    def close(self) -> None: ...


@attrs.frozen
class Peer:
    """
    Another instance of the cluster that is downloading a file: C{url} is
    its peer route for the file, C{path} that route's path (signed with the
    cluster's C{secret}).
    """

    url: str
    path: str
    secret: str = attrs.field(repr=False)


@attrs.frozen
class Wanted:
    """
    A file to fetch: the URL the upstream index listed, and what the index
    said about its hash and size.
    """

    key: str
    filename: str
    upstream: str
    url: str
    expected_hash: tuple[str, str] | None
    size: int | None


@attrs.define(eq=False)
class Flight:
    """
    The single upstream fetch of one file.
    """

    wanted: Wanted
    _client: UpstreamClient
    _store: IFileStore
    _metadata: IMetadata
    _clock: Any
    _on_done: Callable[[Flight, FileRecord | None], None]
    read_timeout: float = 60.0
    #: The slowest an upstream may send, in bytes per second, averaged over
    #: each C{read_timeout} (0: no minimum): a slow drip cannot hold the
    #: download, its clients and its cluster lock for ever.
    min_rate: float = 0.0
    size: int | None = None
    #: Bytes received: spooled, or held in memory until they are.
    written: int = 0
    verified: bool = False
    failure: FlightFailed | None = None
    has_started: bool = False
    _spool_path: str = ""
    #: The spool's write descriptor: closed once nothing queued uses it.
    _spool_fd: SharedFd | None = None
    _read_fd: int = -1
    _refs: int = 1
    _hasher: Hasher | None = None
    done: bool = False
    _waiters: list[Deferred[None]] = attrs.field(factory=list)
    _over: Ended = attrs.field(factory=Ended)
    _body: Any = None
    _idle: Any = None
    _rate: Any = None
    #: What had been received when the current rate window began.
    _window_from: int = 0
    #: False once the spool failed: the file still streams, but from memory,
    #: and is not cached.
    cacheable: bool = True
    _spooled: int = 0
    #: Bytes not spooled (yet, or at all once the spool failed).
    _memory: Chunks = attrs.field(factory=lambda: Chunks())
    _readers: list[FlightReader] = attrs.field(factory=list)
    #: Why the upstream is paused ("memory", "queue"), if it is.
    _paused: set[str] = attrs.field(factory=set)
    _ending: Failure | None = None
    _committing: bool = False
    #: Whether a client may still join: not once the spool's start is freed.
    joinable: bool = True
    #: How many of the spool's first bytes are freed.
    _punched: Progress = attrs.field(factory=Progress)
    _punch_floor: int = 0
    _punching: bool = False
    _awaiting_upload: bool = False
    _stuck: Any = None
    _hashing: _Lane = attrs.field(init=False)
    _spooling: _Lane = attrs.field(init=False)
    #: How spool bytes are written (a test may inject a full disk).
    spool_write: Callable[[int, memoryview], int] = os.write
    #: How the spool's freed prefix is punched out (L{None}: it cannot be;
    #: set to L{None} for this file alone when it fails).
    punch: Callable[[int, int, int], None] | None = attrs.field(factory=lambda: _default_punch())
    #: How hashing and spool writes run: C{run(f, *args)} gives a Deferred of
    #: C{f(*args)}, called in a worker thread in production.
    run: Callable[..., Deferred[Any]] = in_thread_now
    #: Where to fetch the bytes instead of the upstream: a download in
    #: progress on another instance, which caches the file (we do not).
    peer: Peer | None = None
    #: Called with "files" when the file store fails us (for metrics).
    on_store_error: Callable[[str], None] = lambda store: None
    #: The store's upload of this file while it downloads, when the store
    #: can take one and the index gave the sha256 (so the key is known).
    upload: IUpload | None = None
    #: Where commits in progress are written down (L{None}: nowhere).
    journal: CommitJournal | None = None
    #: The record this file's record replaced when it landed, if any.
    replaced: FileRecord | None = None

    def __attrs_post_init__(self) -> None:
        self._hashing = _Lane(self._start_hash, self._hashed, self._lane_crashed)
        self._spooling = _Lane(self._start_spool, self._spooled_batch, self._lane_crashed)

    def _start_hash(self, batch: list[bytes]) -> Deferred[None]:
        assert self._hasher is not None
        return self.run(_hash, self._hasher, batch)

    def _start_spool(self, batch: list[bytes]) -> Deferred[tuple[int, OSError | None]]:
        """
        Write a batch to the spool in a worker thread, holding the
        descriptor until the write returns.
        """
        spool = self._spool_fd
        if spool is None or spool.closing:
            return succeed((0, OSError("the spool is closed")))
        return spool.run(self.run, _spool, self.spool_write, batch)

    @property
    def clients(self) -> int:
        """
        How many clients are reading this download.
        """
        return len(self._readers)

    def start(self) -> None:
        """
        Create the spool file and start the upstream fetch.

        @raise OSError: if the spool file cannot be created.
        """
        path = os.path.join(self._store.spool_dir, f"{os.getpid()}-{id(self):x}-{time.time_ns()}.part")
        self._spool_path = path
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            self._read_fd = os.open(path, os.O_RDONLY)
        except OSError:
            os.close(fd)
            self._unlink()
            raise
        self._spool_fd = SharedFd(fd)
        self._hasher = Hasher(self.wanted.expected_hash)
        self._start_upload()
        Deferred.fromCoroutine(self._fetch()).addErrback(self._crashed)

    def _start_upload(self) -> None:
        """
        Let the store take the file while it downloads, if it can and the
        key is known (L{IStreamingUpload}): the upload hears of the spooled
        bytes, is completed once the file is verified, else aborted.
        """
        expected = self.wanted.expected_hash
        if expected is None or expected[0] != "sha256" or not IStreamingUpload.providedBy(self._store):
            return
        if self.peer is not None:
            return  # the peer caches it, not us
        key = file_key(expected[1], self.wanted.filename)
        try:
            self.upload = IStreamingUpload(self._store).start_upload(self._spool_path, key, expected[1])
        except Unavailable:
            pass  # the store is down (logged once): the file is not cached
        except Exception:
            log.failure("cannot upload {key} while it downloads; uploading it afterwards", key=key)

    def _crashed(self, failure: Failure) -> None:
        log.failure("download of {url} crashed", failure, url=self.wanted.url)
        if self.verified:
            # Clients have their bytes; only the caching went wrong.
            self._unlink()
            self._finish(None)
        else:
            self._fail(FlightFailed(502, "internal error while fetching"))

    async def _fetch(self) -> None:
        try:
            if self.peer is None:
                # The listed file, with its upstream and hash: the policy needs them.
                response: IResponse = await self._client.open_file(self.wanted)
            else:
                headers = {HEADER: sign(self.peer.secret, self.peer.path, self._clock.seconds()).encode()}
                response = await self._client.open_file(self.peer.url, headers, "peer")
        except UpstreamNotFound:
            self._fail(FlightFailed(404, f"upstream has no file at {self.wanted.url}"))
            return
        except UpstreamError as e:
            self._fail(FlightFailed(e.status, e.reason))
            return
        if self.failure is not None:
            response.deliverBody(_Sink(None))  # stopped meanwhile: drop the connection
            return
        length = None if response.length is UNKNOWN_LENGTH else int(response.length)
        if self.wanted.size is not None and length is not None and length != self.wanted.size:
            response.deliverBody(_Sink(None))  # drops the connection
            self._fail(FlightFailed(502, "upstream Content-Length disagrees with the index's size"))
            return
        self.size = length if length is not None else self.wanted.size
        self.has_started = True
        self._wake()
        self._watch_upstream()
        response.deliverBody(_Sink(self))

    def _watch_upstream(self) -> None:
        """
        Time the upstream while it is ours to wait for: it must send
        something every C{read_timeout}, and at least C{min_rate} bytes per
        second over each C{read_timeout}.
        """
        self._idle = self._clock.callLater(self.read_timeout, self._stalled)
        if self.min_rate > 0 and self.read_timeout > 0:
            self._window_from = self.written
            self._rate = self._clock.callLater(self.read_timeout, self._check_rate)

    def _stalled(self) -> None:
        self._idle = None
        self._fail(FlightFailed(504, f"upstream sent nothing for {self.read_timeout:g} seconds"))

    def _check_rate(self) -> None:
        self._rate = None
        got = self.written - self._window_from
        if got < self.min_rate * self.read_timeout:
            self._fail(
                FlightFailed(
                    504,
                    f"upstream too slow: {got} bytes in {self.read_timeout:g} s, "
                    f"under the minimum of {self.min_rate:g} bytes/s",
                )
            )
            return
        self._window_from = self.written
        self._rate = self._clock.callLater(self.read_timeout, self._check_rate)

    def receiving(self, transport: Any) -> None:
        self._body = transport
        # Read the socket in bigger gulps than Twisted's 64 KiB: fewer trips
        # through the reactor and the HTTP parser per megabyte.
        connection = getattr(transport, "_producer", None)
        if connection is not None and hasattr(connection, "bufferSize"):
            connection.bufferSize = RECV_SIZE

    # -- called by the body protocol

    def data(self, data: bytes) -> None:
        if self.failure is not None:
            return
        if self._idle is not None:
            self._idle.reset(self.read_timeout)
        if self.size is not None and self.written + len(data) > self.size:
            self._fail(FlightFailed(502, "upstream sent more bytes than announced"))
            return
        # Clients may have the bytes at once, from memory, until they are
        # spooled; the hash only has to catch up by the end.
        self._memory.append(data)
        self.written += len(data)
        self._hashing.push(data)
        if self.cacheable:
            self._spooling.push(data)
        self._wake()
        if len(self._memory) > MEMORY_HIGH:
            self._pause("memory")
        if self._hashing.pending > QUEUE_HIGH:
            self._pause("queue")

    def _hashed(self, _: None, batch: list[bytes]) -> None:
        if self._hashing.pending <= QUEUE_HIGH // 2:
            self._unpause("queue")
        if self._ending is not None and self._hashing.idle:
            self._end(self._ending)

    def _spooled_batch(self, result: tuple[int, OSError | None], batch: list[bytes]) -> None:
        spooled, error = result
        if self.failure is not None:
            return
        # Spooled bytes are read from the spool from now on.
        self._spooled += spooled
        self._memory.drop_before(self._spooled)
        if self.upload is not None:
            self.upload.spooled(self._spooled)
        if error is not None:
            # The rest stays in memory, and is not cached.
            self._spooling.take()
            self._spool_failed(error)
            self._trim()
            self._watch_stuck()  # if the upstream was already paused for the spool
        elif len(self._memory) <= MEMORY_HIGH // 2:
            self._unpause("memory")
        self._maybe_punch()
        self._maybe_commit()

    def _lane_crashed(self, failure: Failure) -> None:
        self._crashed(failure)
        self._release_spool()

    def _release_spool(self) -> None:
        """
        This flight is done writing and punching its spool: its descriptor
        is closed once the work already queued on it has returned.
        """
        if self._spool_fd is not None:
            self._spool_fd.close()

    # -- freeing what the store already has

    def _maybe_punch(self) -> None:
        """
        Free the spool's prefix that the store's upload has and every
        client has read, once it is L{PUNCH_STEP} long.
        """
        upload = self.upload
        if (
            upload is None
            or self.punch is None
            or self._punching
            or self.failure is not None
            or not self.cacheable
            or self._spool_fd is None
            or self._spool_fd.closing
            or self._committing
            or (self.size or 0) < PUNCH_MIN
        ):
            return
        lowest = min((r.position for r in self._readers), default=self.written)
        reachable = min(lowest, self._spooled)
        upto = min(upload.sent, reachable)
        upto -= upto % PUNCH_STEP
        if upto - self._punched.value < PUNCH_STEP:
            if upload.sent < reachable - reachable % PUNCH_STEP and not self._awaiting_upload:
                # The upload is what holds us back: look again when it moved.
                self._awaiting_upload = True
                upload.wait_sent(self._punched.value + PUNCH_STEP).addBoth(self._upload_moved)
            return
        self.joinable = False  # a new client could not read from the start
        self._punching = True
        self._punch_floor = upto
        start = self._punched.value
        d = self._spool_fd.run(self.run, self.punch, start, upto - start)
        d.addCallbacks(self._punched_to, self._punch_failed, callbackArgs=(upto,))

    def _upload_moved(self, _: object) -> None:
        self._awaiting_upload = False
        self._maybe_punch()

    def _punched_to(self, _: None, upto: int) -> None:
        self._punching = False
        self._punched.advance(upto)
        self._after_punch()

    def _punch_failed(self, failure: Failure) -> None:
        self._punching = False
        self._punch_floor = self._punched.value
        if self._punched.value == 0:
            self.joinable = True  # nothing was freed: a new client can read from the start
        self.punch = None  # not for this file again; the spool keeps it whole until it lands
        if failure.check(OSError):
            log.info(
                "cannot free parts of the spool of {filename} ({error}); keeping it whole until it lands",
                filename=self.wanted.filename,
                error=failure.value,
            )
        else:
            log.failure("freeing part of a spool file failed", failure)
        self._after_punch()

    def _after_punch(self) -> None:
        if self.failure is not None:
            self._release_spool()
            return
        self._maybe_punch()
        self._maybe_commit()

    def wait_punched(self, length: int) -> Deferred[None]:
        """
        Fire once the spool's first C{length} bytes are freed.
        """
        return self._punched.wait(length)

    def _pause(self, why: str) -> None:
        if why in self._paused or self._body is None:
            return
        if not self._paused:
            self._cancel_idle()  # our own pause is not the upstream stalling
            self._body.pauseProducing()
        self._paused.add(why)
        self._watch_stuck()

    def _watch_stuck(self) -> None:
        """
        While the disk is full and clients hold the memory window back:
        those that read nothing for a whole read timeout are cut off, so
        that one stuck client cannot stall everyone.
        """
        if "memory" in self._paused and not self.cacheable and self._stuck is None:
            lowest = min((r.position for r in self._readers), default=self.written)
            self._stuck = self._clock.callLater(self.read_timeout, self._drop_stuck, lowest)

    def _drop_stuck(self, lowest: int) -> None:
        self._stuck = None
        if "memory" not in self._paused:
            return
        for reader in list(self._readers):
            if reader.position <= lowest:
                log.warn(
                    "cutting off a client of {filename} that read nothing for {timeout:g} s "
                    "while the disk is full",
                    filename=self.wanted.filename,
                    timeout=self.read_timeout,
                )
                reader.cut()
        self._trim()
        self._watch_stuck()  # still held back: by the next slowest, for as long

    def _forget_stuck(self) -> None:
        if self._stuck is not None:
            if self._stuck.active():
                self._stuck.cancel()
            self._stuck = None

    def _unpause(self, why: str) -> None:
        if why == "memory":
            self._forget_stuck()
        if why not in self._paused:
            return
        self._paused.discard(why)
        if not self._paused and self._body is not None:
            self._watch_upstream()
            self._body.resumeProducing()

    def _spool_failed(self, error: OSError) -> None:
        """
        The disk is full or unwritable: go on streaming from memory to the
        clients, without caching.
        """
        self.cacheable = False
        self.on_store_error("files")
        self._release_spool()
        message = f"{error.strerror} ({error.__class__.__name__}, errno {error.errno})"
        if _spool_error != [message]:
            _spool_error[:] = [message]
            log.error(
                "cannot write the spool for {filename}: {error}; streaming it uncached",
                filename=self.wanted.filename,
                error=message,
            )

    def _trim(self) -> None:
        """
        Drop the bytes in memory that every reader is past, and resume the
        upstream once they caught up.
        """
        if self.cacheable:
            return
        self._memory.drop_before(min((r.position for r in self._readers), default=self.written))
        if len(self._memory) <= MEMORY_HIGH // 2:
            self._unpause("memory")

    def ended(self, reason: Failure) -> None:
        if self.failure is not None:
            return
        self._forget_stuck()
        self._body = None
        self._paused.clear()
        self._cancel_idle()
        if not self._hashing.idle:
            self._ending = reason  # once the hash has caught up
            return
        self._end(reason)

    def _end(self, reason: Failure) -> None:
        self._ending = None
        if not reason.check(ResponseDone, PotentialDataLoss):
            self._fail(FlightFailed(502, f"upstream connection lost after {self.written} bytes"))
            return
        assert self._hasher is not None
        if reason.check(PotentialDataLoss) and self.size is None and self.wanted.expected_hash is None:
            # A body delimited by the connection closing, with neither a
            # length nor a hash to check it against: a cut looks the same.
            self._fail(FlightFailed(502, "upstream sent no length and the index no hash"))
            return
        if self.size is not None and self.written != self.size:
            self._fail(FlightFailed(502, f"upstream sent {self.written} of {self.size} bytes"))
            return
        if not self._hasher.matches():
            self._fail(FlightFailed(502, "upstream file does not match the index's hash"))
            return
        self.size = self.written
        self.verified = True
        self._wake()
        self._maybe_commit()

    def _maybe_commit(self) -> None:
        """
        Once the file is verified and the spool written: cache it (if the
        spool could be written).
        """
        if not self.verified or not self._spooling.idle or self._punching or self.done or self._committing:
            return
        self._committing = True
        self._release_spool()
        if not self.cacheable or self.peer is not None:
            self._unlink()
            self._finish(None)
            return
        Deferred.fromCoroutine(self._commit()).addErrback(self._crashed)

    async def _commit(self) -> None:
        assert self._hasher is not None
        sha256 = self._hasher.sha256()
        record = FileRecord(
            key=self.wanted.key,
            upstream=self.wanted.upstream,
            url=self.wanted.url,
            sha256=sha256,
            size=self.written,
            store_key=file_key(sha256, self.wanted.filename),
            cached_at=self._clock.seconds(),
        )
        # Written down first: if the process dies (or the metadata store
        # closes) between the object and its record, start-up finds the
        # object unrecorded and removes it.
        marker = None if self.journal is None else await self.run(self.journal.begin, record)
        try:
            if self.upload is not None:
                await self.upload.complete(self.written)
            else:
                await self._store.commit(self._spool_path, record.store_key)
            self.replaced = await self._metadata.put_file(record)
        except Unavailable as e:
            # A store is down: its outage is logged once, not per file.  The
            # object, if it went in, stays: under its content-addressed key it
            # may be another instance's recorded copy, and the next fetch of
            # the file records it again (the journal's marker stays too: a
            # restart removes the object if nothing recorded it by then).
            log.info("not caching {filename}: {reason}", filename=self.wanted.filename, reason=str(e))
            self._unlink()
            self._finish(None)
            return
        except Exception:
            self.on_store_error("files")
            log.failure("could not cache {filename}", filename=self.wanted.filename)
            try:  # no object without a record: it would never be counted or evicted
                await self._store.delete(record.store_key)
            except Unavailable:
                marker = None  # the store is down (logged once): left to the journal
            except Exception:
                marker = None
                log.failure("could not remove the unrecorded {key}", key=record.store_key)
            self._end_marker(marker)
            self._unlink()
            self._finish(None)
            return
        self._end_marker(marker)
        _spool_error.clear()
        log.info(
            "cached {filename} ({size} bytes, sha256 {sha256}) from {url}",
            filename=self.wanted.filename,
            size=record.size,
            sha256=sha256,
            url=record.url,
        )
        self._finish(record)

    def _end_marker(self, marker: str | None) -> None:
        if marker is not None and self.journal is not None:
            self.run(self.journal.end, marker).addErrback(
                lambda f: log.failure("could not remove the commit marker {marker}", f, marker=marker)
            )

    # -- failure and cleanup

    def stop(self, reason: str) -> bool:
        """
        Give up a download that is not verified yet (at shutdown): its
        clients are cut off and nothing is cached.  A verified one goes on
        landing.

        @return: whether it was stopped.
        """
        if self.verified or self.failure is not None or self.done or self._ending is not None:
            return False  # _ending: every byte came, the hash is catching up
        self._fail(FlightFailed(503, reason))
        return True

    def expected_bytes(self) -> int:
        """
        What this download will add to the cache once it lands: it counts
        towards the size limit while it is spooled.
        """
        if self.done or self.failure is not None or not self.cacheable or self.peer is not None:
            return 0
        return max(self.size or self.wanted.size or 0, self.written)

    def _fail(self, failure: FlightFailed) -> None:
        if self.failure is not None or self.verified:
            return
        self.failure = failure
        self._cancel_idle()
        if self._body is not None:
            body, self._body = self._body, None
            body.stopProducing()  # stop downloading what nobody will get
        log.warn(
            "download of {url} failed, nothing cached: {reason}",
            url=self.wanted.url if self.peer is None else self.peer.url,
            reason=failure.reason,
        )
        self._hashing.take()
        self._spooling.take()
        self._release_spool()
        self._unlink()
        # Finished (no longer a flight to join) before its waiters hear of it.
        self._finish(None)
        self._wake()

    def _cancel_idle(self) -> None:
        for timer in (self._idle, self._rate):
            if timer is not None and timer.active():
                timer.cancel()
        self._idle = self._rate = None

    def _unlink(self) -> None:
        try:
            os.unlink(self._spool_path)
        except FileNotFoundError:
            pass

    def _finish(self, record: FileRecord | None) -> None:
        self.done = True
        self._forget_stuck()
        self._on_done(self, record)
        self.release()
        if record is None and self.upload is not None:
            # Over once nothing of it is left in the store.
            self.upload.abort().addBoth(lambda _: self._over.end())
        else:
            self._over.end()

    def when_done(self) -> Deferred[None]:
        """
        Fire once the flight is over: cached, or failed and cleaned up.
        """
        return self._over.wait()

    def sha256(self) -> str | None:
        """
        The file's sha256, once verified.
        """
        return self._hasher.sha256() if self.verified and self._hasher is not None else None

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(None)

    # -- readers

    def reader(self) -> FlightReader:
        """
        A new reader of this flight's bytes.
        """
        self._refs += 1
        reader = FlightReader(self)
        self._readers.append(reader)
        return reader

    def _forget_reader(self, reader: FlightReader) -> None:
        if reader in self._readers:
            self._readers.remove(reader)
        self._trim()
        self.release()

    async def wait_started(self) -> None:
        """
        Wait until the upstream's response headers arrived (so L{size} is
        known if it ever will be).

        @raise FlightFailed: if the fetch failed first.
        """
        while True:
            if self.failure is not None:
                raise self.failure
            if self.has_started:
                return
            await self._wait()

    def _wait(self) -> Deferred[None]:
        waiter: Deferred[None] = Deferred(self._forget)
        self._waiters.append(waiter)
        return waiter

    def _forget(self, waiter: Deferred[None]) -> None:
        if waiter in self._waiters:
            self._waiters.remove(waiter)

    def release(self) -> None:
        self._refs -= 1
        if self._refs == 0 and self._read_fd >= 0:
            os.close(self._read_fd)
            self._read_fd = -1

    def readable(self) -> int:
        """
        How many bytes clients may have: all once verified, else all but the
        last one written.
        """
        return self.written if self.verified else max(0, self.written - 1)

    async def read(self, offset: int, length: int) -> bytes:
        """
        Read up to C{length} bytes at C{offset}, waiting for them to arrive.
        The last byte asked for is held back until the file is verified,
        like the file's last byte: a reader that asks for the rest of a
        range thereby never receives a complete-looking range of a file
        that turns out bad (a chunk in the middle comes one byte short).

        @raise FlightFailed: if the fetch failed.
        """
        while True:
            if self.failure is not None:
                raise self.failure
            if offset < self._punch_floor:
                raise FlightFailed(503, "these bytes are no longer held here")
            limit = self.readable()
            if not self.verified:
                limit = min(limit, offset + length - 1)
            if offset < limit:
                if offset < self._spooled:
                    n = min(length, limit - offset, self._spooled - offset)
                    data = os.pread(self._read_fd, n, offset)
                elif offset >= self._memory.start:
                    data = self._memory.read(offset, min(length, limit - offset))
                else:
                    raise FlightFailed(503, "the disk is full and these bytes are no longer held")
                if not data:
                    raise FlightFailed(502, "spool file shorter than written")
                return data
            if self.verified:
                return b""
            await self._wait()


@attrs.define
class FlightReader:
    _flight: Flight
    _closed: bool = False

    @property
    def size(self) -> int | None:
        return self._flight.size

    #: Where this reader has read up to (for trimming bytes held in memory).
    position: int = 0

    def read(self, offset: int, length: int) -> Deferred[bytes]:
        if self._cut:
            return fail(FlightFailed(503, "cut off: too slow while the disk is full"))
        d = Deferred.fromCoroutine(self._flight.read(offset, length))
        d.addCallback(self._advanced, offset)
        return d

    def _advanced(self, data: bytes, offset: int) -> bytes:
        self.position = offset + len(data)
        self._flight._trim()
        self._flight._maybe_punch()
        return data

    #: Called when the flight cuts this reader off (its sender aborts).
    on_cut: Callable[[], None] | None = None

    def cut(self) -> None:
        """
        Cut this reader off: its client is aborted and its reads fail.
        """
        self._cut = True
        self.close()
        if self.on_cut is not None:
            self.on_cut()

    _cut: bool = False

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._flight._forget_reader(self)


def _find_punch_hole() -> Callable[[int, int, int], None] | None:
    """
    C{punch(fd, offset, length)}: free a range of a file, keeping its size
    (Linux C{fallocate} with C{FALLOC_FL_PUNCH_HOLE}), or L{None} where
    there is no such call.
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fallocate = libc.fallocate
    except (OSError, AttributeError):
        return None
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
    fallocate.restype = ctypes.c_int
    keep_size_punch_hole = 0x01 | 0x02

    def punch(fd: int, offset: int, length: int) -> None:
        if fallocate(fd, keep_size_punch_hole, offset, length) != 0:
            error = ctypes.get_errno()
            raise OSError(error, os.strerror(error))

    return punch


#: The way to free a range of a spool file here, if there is one.
PUNCH_HOLE: Callable[[int, int, int], None] | None = _find_punch_hole()


def _default_punch() -> Callable[[int, int, int], None] | None:
    return PUNCH_HOLE


def _hash(hasher: Hasher, batch: list[bytes]) -> None:
    """
    Hash a batch (in a worker thread).
    """
    for data in batch:
        hasher.update(data)


def _spool(
    fd: int, write: Callable[[int, memoryview], int], batch: list[bytes]
) -> tuple[int, OSError | None]:
    """
    Write a batch to the spool (in a worker thread); return how many bytes
    were written, and the error that stopped the writing if one did.
    """
    spooled = 0
    try:
        for data in batch:
            view = memoryview(data)
            while view:
                n = write(fd, view)
                spooled += n
                view = view[n:]
    except OSError as e:
        return spooled, e
    return spooled, None


class SharedFd:
    """
    A file descriptor with one owner and work queued on it in worker
    threads: L{close} closes it only once every queued job has returned, so
    that a job never runs on a number the process has meanwhile reused for
    another file, the database or a socket.
    """

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._users = 0
        #: The owner is done with it: no new job may start.
        self.closing = False

    def run(self, run: Callable[..., Deferred[Any]], f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """
        C{run(f, fd, *args)}, holding the descriptor until it returns.
        """
        assert not self.closing, "the spool descriptor is closed"
        self._users += 1
        d = run(f, self._fd, *args)

        def returned(result: object) -> object:
            self._users -= 1
            self._maybe_close()
            return result

        return d.addBoth(returned)

    @property
    def fd(self) -> int:
        """
        The descriptor, or -1 once it is closed.
        """
        return self._fd

    def close(self) -> None:
        self.closing = True
        self._maybe_close()

    def _maybe_close(self) -> None:
        if self.closing and self._users == 0 and self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


@attrs.define
class CommitJournal:
    """
    Markers of the commits in progress, one small file each in
    C{directory}: written before a verified file goes into the store,
    removed once its record is written (or the object removed again).  A
    marker left behind (a crash, or a store that closed under the commit)
    names an object that may have no record; start-up looks each one up and
    removes such objects.  The methods block: run them in a worker thread.
    """

    directory: str
    #: This process's mark on its markers (a process id may repeat across
    #: restarts, in a container always): its own are never recovered.
    owner: str = attrs.field(factory=lambda: uuid.uuid4().hex)

    def begin(self, record: FileRecord) -> str:
        os.makedirs(self.directory, exist_ok=True)
        name = f"{self.owner}-{record.sha256}-{time.time_ns()}.json"
        path = os.path.join(self.directory, name)
        entry = {"key": record.key, "store_key": record.store_key, "sha256": record.sha256}
        partial = os.path.join(self.directory, f".{name}")
        with open(partial, "w", encoding="utf-8") as f:
            json.dump(entry, f)
        os.replace(partial, path)  # whole, or not there: never read half-written
        return path

    def end(self, path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def pending(self) -> list[tuple[str, dict[str, str]]]:
        """
        The markers other processes left, with what each names (unreadable
        ones are dropped).
        """
        try:
            names = sorted(os.listdir(self.directory))
        except FileNotFoundError:
            return []
        found = []
        for name in names:
            if name.startswith((".", self.owner)):
                continue  # one being written, or one of this process's commits in progress
            path = os.path.join(self.directory, name)
            try:
                with open(path, encoding="utf-8") as f:
                    entry = json.load(f)
                if not all(isinstance(entry.get(k), str) for k in ("key", "store_key", "sha256")):
                    raise ValueError("not a commit marker")
            except (OSError, ValueError):
                self.end(path)
                continue
            found.append((path, entry))
        return found


class Chunks:
    """
    The bytes of a file from offset L{start} on, held in memory as the
    chunks they arrived in: appending and dropping a prefix copy nothing.
    """

    def __init__(self) -> None:
        self._chunks: deque[bytes] = deque()
        self.start = 0
        self._length = 0

    def __len__(self) -> int:
        return self._length

    def append(self, data: bytes) -> None:
        if data:
            self._chunks.append(data)
            self._length += len(data)

    def drop_before(self, offset: int) -> None:
        """
        Forget the bytes before C{offset}.
        """
        while self._chunks and self.start + len(self._chunks[0]) <= offset:
            chunk = self._chunks.popleft()
            self.start += len(chunk)
            self._length -= len(chunk)
        if self._chunks and self.start < offset:
            cut = offset - self.start
            self._chunks[0] = self._chunks[0][cut:]
            self.start, self._length = offset, self._length - cut
        elif not self._chunks:
            self.start = max(self.start, offset)

    def read(self, offset: int, length: int) -> bytes:
        """
        Up to C{length} bytes at C{offset} (within one chunk), C{b""} past
        the end.
        """
        position = self.start
        for chunk in self._chunks:
            if offset < position + len(chunk):
                at = offset - position
                return chunk[at : at + length]
            position += len(chunk)
        return b""


@attrs.define(eq=False)
class _Lane:
    """
    Work on a download's bytes that runs a batch at a time in a worker
    thread: the bytes that arrive while a batch runs make the next batch.
    """

    #: Starts the work on a batch in a worker thread.
    _start: Callable[[list[bytes]], Deferred[Any]]
    _done: Callable[[Any, list[bytes]], None]
    _failed: Callable[[Failure], None]
    _batch: list[bytes] = attrs.field(factory=list)
    #: Bytes waiting for a batch.
    pending: int = 0
    busy: bool = False

    @property
    def idle(self) -> bool:
        return not self.busy and not self._batch

    def push(self, data: bytes) -> None:
        self._batch.append(data)
        self.pending += len(data)
        if not self.busy:
            self._next()

    def take(self) -> list[bytes]:
        """
        Take back the bytes waiting for a batch.
        """
        batch, self._batch, self.pending = self._batch, [], 0
        return batch

    def _next(self) -> None:
        batch = self.take()
        self.busy = True
        self._start(batch).addCallbacks(self._ran, self._crashed, callbackArgs=(batch,))

    def _ran(self, result: Any, batch: list[bytes]) -> None:
        self.busy = False
        self._done(result, batch)  # first: it may take the waiting bytes back
        if self._batch and not self.busy:
            self._next()

    def _crashed(self, failure: Failure) -> None:
        self.busy = False
        self._batch, self.pending = [], 0
        self._failed(failure)


class _Sink:
    """
    The body protocol that feeds a flight.
    """

    def __init__(self, flight: Flight | None) -> None:
        self._flight = flight

    def makeConnection(self, transport: Any) -> None:
        if self._flight is None:
            transport.stopProducing()
        else:
            self._flight.receiving(transport)

    def dataReceived(self, data: bytes) -> None:
        if self._flight is not None:
            self._flight.data(data)

    def connectionLost(self, reason: Failure) -> None:
        if self._flight is not None:
            self._flight.ended(reason)


def abort_client(request: Request) -> None:
    """
    Cut a client off mid-body with a reset, not a FIN: a client reading a
    body without a length up to the end of the connection must not take the
    cut for the end.
    """
    transport: Any = request.channel.transport if request.channel else None
    if transport is None:
        return
    try:
        transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except (AttributeError, OSError):
        pass
    transport.abortConnection()


@implementer(IPushProducer)
class Sender:
    """
    Sends a byte source to one client, honouring the client's back-pressure.
    On a source failure the client's connection is aborted, so that it never
    mistakes a partial body for a whole one.
    """

    def __init__(
        self, request: Request, source: ByteSource, start: int = 0, end: int | None = None, first: bytes = b""
    ) -> None:
        """
        @param start: the first byte to send.
        @param end: the (exclusive) end of the bytes to send, or L{None} for
            the end of the source.
        @param first: the bytes from C{start} on that the caller already
            read (to be sure the source works before answering); sent first.
        """
        self._request = request
        self._source = source
        if isinstance(source, FlightReader):
            source.on_cut = self.abort
        self._paused = False
        self._resume: Deferred[None] | None = None
        self._pending: Deferred[bytes] | None = None
        self._stopped = False
        self._offset = start
        self._end = end
        self._first = first
        self.sent = 0
        self._over = Ended()

    def when_done(self) -> Deferred[None]:
        """
        Fire when this sender is over, however it ended.
        """
        return self._over.wait()

    def start(self) -> Deferred[None]:
        self._request.registerProducer(self, True)
        self._request.notifyFinish().addErrback(lambda _: self.stopProducing())
        return Deferred.fromCoroutine(self._run())

    async def _run(self) -> None:
        try:
            first, self._first = self._first, b""
            if first:
                self._offset += len(first)
                self.sent += len(first)
                self._request.write(first)
            while not self._stopped:
                if self._paused:
                    self._resume = Deferred()
                    await self._resume
                    continue
                length = CHUNK if self._end is None else min(CHUNK, self._end - self._offset)
                if length <= 0:
                    break
                self._pending = self._source.read(self._offset, length)
                data = await self._pending
                self._pending = None
                if not data:
                    if self._end is not None:
                        raise FlightFailed(502, "file ended before the range did")
                    break
                self._offset += len(data)
                self.sent += len(data)
                self._request.write(data)
        except CancelledError:
            self._stopped = True  # the request that runs us was cancelled: its client is gone
        except Exception as e:
            # The client has headers and part of the body: all we can do is
            # make sure it cannot mistake that part for the whole.
            if isinstance(e, Unavailable):
                # The store's outage is logged once, where it was found.
                log.info("cutting off a client: {error}", error=str(e))
            elif not isinstance(e, FlightFailed):
                log.failure("sending a file failed; aborting the client")
            self._stopped = True
            self._request.unregisterProducer()
            self._abort()
        finally:
            self._source.close()
        if not self._stopped:
            self._request.unregisterProducer()
            self._request.finish()
        self._over.end()

    def abort(self) -> None:
        """
        Drop the client's connection (at shutdown, past the grace period).
        """
        self.stopProducing()
        self._abort()

    def _abort(self) -> None:
        abort_client(self._request)

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        resume, self._resume = self._resume, None
        if resume is not None:
            resume.callback(None)

    def stopProducing(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        for d in (self._pending, self._resume):
            if d is not None and not d.called:
                d.cancel()

"""
Streaming files to clients while caching them.

A L{Flight} is the one upstream fetch of one file.  It writes the upstream's
bytes to a spool file as they arrive, hashing them, and never throttles the
upstream for its clients: the spool on disk is the buffer, so memory stays
flat however many clients read and however slow they are.  Hashing and spool
writes run in a worker thread (both release the GIL), a batch at a time, so
the reactor thread only moves bytes between sockets; the upstream is paused
only while the worker is behind by L{FlightTuning.queue_high} bytes.  Every
client reads through a L{FlightReader} at its own pace, waiting for more
bytes when it has caught up.  The last byte written is held back from every client until
the hash and length check out, so a client never receives a complete-looking
wrong file; on failure every client's reads fail and nothing is cached.

The flight coordinates its parts, and is in one L{Stage} at a time (see
L{txpypi.fetch.stage} for the moves):
 - L{UpstreamBody}: the response body, paused, resumed and timed;
 - L{Spool} and L{HashLane}: where the bytes go, and their hash;
 - L{Puncher}: freeing the spool's prefix the store's upload already has;
 - L{Commit}: putting the verified file into the stores;
 - L{Pacing}: holding the upstream back while bytes pile up;
 - L{Readers}: the read side, its clients' readers and their waiting reads.
L{FlightTuning} says how the parts are set up (the same for every flight).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH

from txpypi.concurrency.waiters import Once
from txpypi.core.names import Hasher
from txpypi.fetch.body import BodySink, UpstreamBody, open_response
from txpypi.fetch.clients import FileClient
from txpypi.fetch.commit import Commit, CommitJournal, start_upload
from txpypi.fetch.pacing import Pacing
from txpypi.fetch.punch import Puncher
from txpypi.fetch.reader import FlightReader, Readers
from txpypi.fetch.spool import HashLane, Spool, SpoolHealth
from txpypi.fetch.stage import Lifecycle, Stage
from txpypi.fetch.tail import OVER_HTTP, SpoolNote, SpoolTail
from txpypi.fetch.tuning import FlightTuning
from txpypi.fetch.wanted import FlightFailed, Peer, Wanted
from txpypi.storage.metadata import FileRecord, IMetadata
from txpypi.storage.stores import IFileStore, IUpload, file_key

log = Logger(namespace="txpypi.download")

#: Where a spool may still be punched: not once it is committing or over.
_PUNCHABLE = frozenset({Stage.STARTING, Stage.STREAMING, Stage.RECEIVED, Stage.VERIFIED})


@attrs.define(eq=False)
class Flight:
    """
    The single upstream fetch of one file.
    """

    wanted: Wanted
    _client: FileClient
    _store: IFileStore
    _metadata: IMetadata
    _clock: IReactorTime
    tuning: FlightTuning = FlightTuning()
    #: Where to fetch the bytes instead of the upstream: a download in
    #: progress on another instance, which caches the file (we do not).
    peer: Peer | None = None
    #: Called with "files" when the file store fails us (for metrics).
    on_store_error: Callable[[str], None] = lambda store: None
    #: Where commits in progress are written down (L{None}: nowhere).
    journal: CommitJournal | None = None
    #: The last spool error, shared with the file cache's other flights.
    spool_health: SpoolHealth = attrs.field(factory=SpoolHealth)
    #: The store's upload of this file while it downloads, when the store
    #: can take one and the index gave the sha256 (so the key is known).
    upload: IUpload | None = None
    size: int | None = None
    #: Bytes received: spooled, or held in memory until they are.
    written: int = 0
    #: The record this file's record replaced when it landed, if any.
    replaced: FileRecord | None = None
    _failure: FlightFailed | None = attrs.field(default=None, init=False)
    #: The flight's one state (see L{txpypi.fetch.stage}): others read it,
    #: only the flight moves it.
    life: Lifecycle = attrs.field(factory=Lifecycle, init=False)
    #: How the body ended, while the hash catches up (L{Stage.RECEIVED}).
    _body_end: Failure | None = attrs.field(default=None, init=False)
    _over: Once[None] = attrs.field(factory=Once, init=False)
    _finished: Once[FileRecord | None] = attrs.field(factory=Once, init=False)
    spool: Spool = attrs.field(init=False)
    _hashing: HashLane = attrs.field(init=False)
    _body: UpstreamBody = attrs.field(init=False)
    puncher: Puncher = attrs.field(init=False)
    readers: Readers = attrs.field(init=False)
    _pacing: Pacing = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        t, filename, written = self.tuning, self.wanted.filename, lambda: self.written
        self.spool = Spool(t.run, self._spooled, self._lane_crashed, t.spool_write)
        hasher = Hasher(self.wanted.expected_hash)
        self._hashing = HashLane(hasher, t.run, self._hashed, self._lane_crashed)
        self._body = UpstreamBody(self._clock, written, self._fail, t.read_timeout, t.min_rate)
        self.puncher = Puncher(t.punch, t.punch_policy, filename, self._after_punch)
        self.readers = Readers(self, self.spool, self.puncher, self._reader_moved, self._reader_closed)
        self._pacing = Pacing(
            self._clock, self._body, self.spool, self.readers, written, filename, t.memory_high, t.queue_high
        )

    # -- what others read

    @property
    def failure(self) -> FlightFailed | None:
        """
        Why the fetch failed, once it did.
        """
        return self._failure

    @property
    def has_started(self) -> bool:
        """
        Whether the upstream's response headers arrived (even if it failed since).
        """
        return self.life.reached(Stage.STREAMING)

    @property
    def verified(self) -> bool:
        return self.life.verified

    @property
    def done(self) -> bool:
        """
        Over: landed (cached or not) or failed; no longer a flight to join.
        """
        return self.life.over

    @property
    def joinable(self) -> bool:
        """
        Whether a client may still join: not once the spool's start is freed.
        """
        return self.puncher.joinable

    @property
    def clients(self) -> int:
        """
        How many clients are reading this download.
        """
        return len(self.readers)

    def sha256(self) -> str | None:
        """
        The file's sha256, once verified.
        """
        return self._hashing.sha256() if self.verified else None

    def spool_note(self) -> str:
        """
        What a follower on this machine is told of this download once it
        started (see L{txpypi.fetch.tail}): where its spool is, unless the
        spool is no whole copy to read (a follower itself, a size unknown,
        a disk that failed, an upload that frees the spool's start).
        """
        if self.peer is not None or self.upload is not None or self.size is None or not self.spool.cacheable:
            return OVER_HTTP
        return SpoolNote(os.getpid(), self.size, self.spool.path).text()

    def expected_bytes(self) -> int:
        """
        What this download will add to the cache once it lands: it counts
        towards the size limit while it is spooled.
        """
        if self.done or not self.spool.cacheable or self.peer is not None:
            return 0
        return max(self.size or self.wanted.size or 0, self.written)

    def finished(self) -> Deferred[FileRecord | None]:
        """
        Fire once the flight is finished, no longer one to join: with the
        record of the file it cached, or L{None}.  That is before its
        readers hear of it, and before L{when_done}, which waits for the
        clean-up too.
        """
        return self._finished.wait()

    def when_done(self) -> Deferred[None]:
        """
        Fire once the flight is over: cached, or failed and cleaned up.
        """
        return self._over.wait()

    def reader(self) -> FlightReader:
        """
        A new reader of this flight's bytes; its owner closes it.
        """
        return self.readers.reader()

    async def wait_started(self) -> None:
        """
        Wait until the upstream's response headers arrived (so L{size} is
        known if it ever will be).

        @raise FlightFailed: if the fetch failed first.
        """
        await self.readers.wait_started()

    # -- starting

    def start(self) -> None:
        """
        Create the spool file and start the upstream fetch.

        @raise OSError: if the spool file cannot be created.
        """
        name = f"{os.getpid()}-{id(self):x}-{time.time_ns()}.part"
        self.spool.open(os.path.join(self._store.spool_dir, name))
        if self.peer is None:  # else the peer caches it, not us
            self.upload = start_upload(self._store, self.wanted, self.spool.path)
        Deferred.fromCoroutine(self._fetch()).addErrback(self._crashed)

    async def _fetch(self) -> None:
        try:
            response = await open_response(
                self._client, self.wanted, self.peer, self._clock, self._store.spool_dir
            )
        except FlightFailed as e:
            self._fail(e)
            return
        if self.life.failed:
            response.deliverBody(BodySink(None))  # stopped meanwhile: drop the connection
            return
        length = None if response.length is UNKNOWN_LENGTH else int(response.length)
        if self.wanted.size is not None and length is not None and length != self.wanted.size:
            response.deliverBody(BodySink(None))  # drops the connection
            self._fail(FlightFailed(502, "upstream Content-Length disagrees with the index's size"))
            return
        self.size = length if length is not None else self.wanted.size
        if isinstance(response, SpoolTail):
            # Its clients read the leader's spool too: the bytes are on the
            # disk once, however many workers follow (short of descriptors,
            # it spools them again).
            try:
                fd = response.dup()
            except OSError:
                fd = -1
            if fd >= 0:
                self.spool.follow(fd)
            log.info(
                "following {filename} from the spool of the worker that fetches it",
                filename=self.wanted.filename,
            )
        self.life.move(Stage.STREAMING)
        self.readers.wake()
        self._body.watch()
        response.deliverBody(BodySink(self))

    # -- called by the body protocol

    def receiving(self, transport: IPushProducer) -> None:
        self._body.attach(transport)

    def data(self, data: bytes) -> None:
        if self.life.failed:
            return
        self._body.arrived()
        if self.size is not None and self.written + len(data) > self.size:
            self._fail(FlightFailed(502, "upstream sent more bytes than announced"))
            return
        # Clients may have the bytes at once, from memory, until they are
        # spooled; the hash only has to catch up by the end.
        self.written += len(data)
        self._hashing.push(data)
        self.spool.push(data)
        self.readers.wake()
        self._pacing.received(self._hashing.pending)

    def ended(self, reason: Failure) -> None:
        if self.life.failed:
            return
        self._pacing.forget_stuck()
        self._body.ended()
        self.life.move(Stage.RECEIVED)
        if not self._hashing.idle:
            self._body_end = reason  # checked once the hash has caught up
            return
        self._end(reason)

    def _end(self, reason: Failure) -> None:
        self._body_end = None
        error = _body_error(reason, self.size, self.written, self.wanted.expected_hash is not None)
        if error is None and not self._hashing.matches():
            error = "upstream file does not match the index's hash"
        if error is not None:
            self._fail(FlightFailed(502, error))
            return
        self.size = self.written
        self.life.move(Stage.VERIFIED)
        self.readers.wake()
        self._maybe_commit()

    # -- the workers

    def _hashed(self) -> None:
        self._pacing.hashed(self._hashing.pending)
        if self._body_end is not None and self._hashing.idle:
            self._end(self._body_end)

    def _spooled(self, error: OSError | None) -> None:
        if self.upload is not None:
            self.upload.spooled(self.spool.spooled)
        if error is not None:
            self.spool.give_up(error, self.spool_health, self.wanted.filename)
            # No longer a whole copy: a follower reading it (see
            # txpypi.fetch.tail) hears the file will not grow.
            self.spool.unlink()
            self.on_store_error("files")
        self._pacing.spooled(error)
        self._maybe_punch()
        self._maybe_commit()

    def _lane_crashed(self, failure: Failure) -> None:
        self._crashed(failure)
        self.spool.release_writer()

    def _crashed(self, failure: Failure) -> None:
        log.failure("download of {url} crashed", failure, url=self.wanted.url)
        if self.done:
            return  # crashed while telling of its end: nothing left to end
        if self.verified:
            # Clients have their bytes; only the caching went wrong.
            self.spool.unlink()
            self._finish(None)
        else:
            self._fail(FlightFailed(502, "internal error while fetching"))

    # -- freeing what the store already has

    def _maybe_punch(self) -> None:
        if self.upload is None or self.life.stage not in _PUNCHABLE or not self.spool.cacheable:
            return
        lowest = self.readers.lowest(self.written)
        self.puncher.consider(self.upload, self.spool, self.size or 0, lowest)

    def _after_punch(self) -> None:
        if self.life.failed:
            self.spool.release_writer()
            return
        self._maybe_punch()
        self._maybe_commit()

    # -- landing

    def _maybe_commit(self) -> None:
        """
        Once the file is verified and the spool written: cache it (if the
        spool could be written).
        """
        if self.life.stage is not Stage.VERIFIED or not self.spool.idle or self.puncher.busy:
            return
        self.life.move(Stage.COMMITTING)
        self.spool.release_writer()
        if not self.spool.cacheable or self.peer is not None:
            self.spool.unlink()
            self._finish(None)
            return
        Deferred.fromCoroutine(self._commit()).addErrback(self._crashed)

    async def _commit(self) -> None:
        sha256 = self._hashing.sha256()
        record = _record(self.wanted, sha256, self.written, self._clock.seconds())
        commit = Commit(self._store, self._metadata, self.journal, self.tuning.run, self.on_store_error)
        landed = await commit.land(record, self.wanted.filename, self.spool.path, self.upload)
        if not landed.cached:
            self.spool.unlink()
            self._finish(None)
            return
        self.replaced = landed.replaced
        self.spool_health.clear()
        log.info(
            "cached {filename} ({size} bytes, sha256 {sha256}) from {url}",
            filename=self.wanted.filename,
            size=record.size,
            sha256=sha256,
            url=record.url,
        )
        self._finish(record)

    # -- failure and the end

    def stop(self, reason: str) -> bool:
        """
        Give up a download that is not verified yet (at shutdown): its
        clients are cut off and nothing is cached.  A verified one goes on
        landing, and so does one whose every byte came (its hash catching up).

        @return: whether it was stopped.
        """
        if self.life.stage not in (Stage.STARTING, Stage.STREAMING):
            return False
        self._fail(FlightFailed(503, reason))
        return True

    def _fail(self, failure: FlightFailed) -> None:
        if not self.life.can(Stage.FAILED):
            return  # over already, or verified: its clients have every byte
        self._failure = failure
        self._body_end = None
        self.life.move(Stage.FAILED)
        self._body.stop()  # stop downloading what nobody will get
        log.warn(
            "download of {url} failed, nothing cached: {reason}",
            url=self.wanted.url if self.peer is None else self.peer.url,
            reason=failure.reason,
        )
        self._hashing.stop()
        self.spool.abandon()
        self.spool.unlink()
        # Finished (no longer a flight to join) before its waiters hear of it.
        self._finish(None)
        self.readers.wake()

    def _finish(self, record: FileRecord | None) -> None:
        if not self.life.failed:
            self.life.move(Stage.LANDED)
        self._pacing.forget_stuck()
        self._finished.happen(record)
        self.spool.release()
        if record is None and self.upload is not None:
            # Over once nothing of it is left in the store.
            self.upload.abort().addBoth(lambda _: self._over.happen(None))
        else:
            self._over.happen(None)

    def _reader_moved(self) -> None:
        """
        A reader read on: the bytes every reader is past may be let go.
        """
        self._pacing.trim()
        self._maybe_punch()

    def _reader_closed(self) -> None:
        """
        A reader is done: the bytes it held in memory may be let go.
        """
        self._pacing.trim()


def _body_error(reason: Failure, size: int | None, written: int, hashed: bool) -> str | None:
    """
    What is wrong with a body that ended with C{reason} after C{written}
    bytes (C{size} announced; C{hashed}: the index gave a hash), if anything
    before the hash is checked.
    """
    if not reason.check(ResponseDone, PotentialDataLoss):
        return f"upstream connection lost after {written} bytes"
    if reason.check(PotentialDataLoss) and size is None and not hashed:
        # A body delimited by the connection closing, with neither a
        # length nor a hash to check it against: a cut looks the same.
        return "upstream sent no length and the index no hash"
    if size is not None and written != size:
        return f"upstream sent {written} of {size} bytes"
    return None


def _record(wanted: Wanted, sha256: str, size: int, now: float) -> FileRecord:
    """
    The record of the verified file C{wanted}, cached C{now}.
    """
    return FileRecord(
        key=wanted.key,
        upstream=wanted.upstream,
        url=wanted.url,
        sha256=sha256,
        size=size,
        store_key=file_key(sha256, wanted.filename),
        cached_at=now,
    )

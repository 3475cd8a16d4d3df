"""
The spool: where a flight keeps the upstream's bytes for its clients.

The bytes go to a spool file, written in a worker thread a batch at a time
(a L{Lane}); until they are written, and for good once the disk is full,
they are held in memory (L{Chunks}).  Hashing runs in a lane of its own
(L{HashLane}).  The spool's write descriptor is a L{SharedFd}: it is closed
only once the jobs queued on it returned, so that no job writes to (or
punches a hole in) a number reused for another file.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.python.failure import Failure

from txpypi.core.names import Hasher
from txpypi.fetch.wanted import FlightFailed

log = Logger(namespace="txpypi.download")


@attrs.define
class SpoolHealth:
    """
    The last error writing a spool file, shared by the flights of one file
    cache: a full disk is logged once, not once per download, and shows on
    C{/health} until a file is cached again.
    """

    message: str | None = None

    def failed(self, error: OSError) -> bool:
        """
        Note a spool error; C{True} if it is news (and worth logging).
        """
        message = f"{error.strerror} ({error.__class__.__name__}, errno {error.errno})"
        if message == self.message:
            return False
        self.message = message
        return True

    def clear(self) -> None:
        """
        A file was cached: the spool works again.
        """
        self.message = None


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
class Lane:
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


@attrs.define(eq=False)
class HashLane:
    """
    Hashes a download's bytes in a worker thread, checking them against
    what the index said.
    """

    _hasher: Hasher
    _run: Callable[..., Deferred[Any]]
    _hashed: Callable[[], None]
    _crashed: Callable[[Failure], None]
    _lane: Lane = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._lane = Lane(self._start, lambda result, batch: self._hashed(), self._crashed)

    def _start(self, batch: list[bytes]) -> Deferred[None]:
        return self._run(_hash, self._hasher, batch)

    def push(self, data: bytes) -> None:
        self._lane.push(data)

    def stop(self) -> None:
        self._lane.take()

    @property
    def pending(self) -> int:
        return self._lane.pending

    @property
    def idle(self) -> bool:
        return self._lane.idle

    def matches(self) -> bool:
        return self._hasher.matches()

    def sha256(self) -> str:
        return self._hasher.sha256()


@attrs.define(eq=False)
class Spool:
    """
    One download's spool file, and its bytes held in memory until they are
    written (for good once the file cannot be written: the download then
    streams from memory, uncached).

    Its read descriptor is counted: the flight holds it, and so does each of
    its readers; it is closed when the last lets go (L{hold}, L{release}).
    """

    _run: Callable[..., Deferred[Any]]
    #: Told of every batch written, with the error that stopped it, if one did.
    _on_written: Callable[[OSError | None], None]
    _crashed: Callable[[Failure], None]
    #: How bytes are written to the spool file (a test may inject a full disk).
    write: Callable[[int, memoryview], int] = os.write
    path: str = ""
    #: Bytes written to the spool file.
    spooled: int = 0
    #: Bytes not spooled (yet, or at all once the spool failed).
    memory: Chunks = attrs.field(factory=Chunks)
    #: False once the spool failed: its bytes are in memory only.
    cacheable: bool = True
    #: The flight failed: what the workers still return is dropped.
    _abandoned: bool = False
    _writer: SharedFd | None = None
    _read_fd: int = -1
    _holders: int = 1
    #: The bytes are read from another worker's spool file, where they
    #: already are (L{follow}): nothing is written or held here.
    following: bool = False
    _lane: Lane = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._lane = Lane(self._start_write, self._written, self._crashed)

    def open(self, path: str) -> None:
        """
        Create the spool file.

        @raise OSError: if it cannot be created.
        """
        self.path = path
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            self._read_fd = os.open(path, os.O_RDONLY)
        except OSError:
            os.close(fd)
            self.unlink()
            raise
        self._writer = SharedFd(fd)

    def follow(self, fd: int) -> None:
        """
        Read the bytes from the spool file of the worker this flight
        follows (C{fd}, read-only, now ours; see L{txpypi.fetch.tail}),
        where each byte pushed already is at its offset: the spool's own
        file is let go, and nothing is written twice.  That file only ever
        grows, and an unlinked or landed one keeps its bytes for C{fd}.
        """
        own, self._read_fd, self.following = self._read_fd, fd, True
        self.release_writer()
        try:
            if own >= 0:
                os.close(own)
            self.unlink()
        except OSError as e:  # an empty file left in our own spool directory
            log.warn("cannot let go of the spool {path}: {error}", path=self.path, error=e)

    # -- writing

    def push(self, data: bytes) -> None:
        """
        Hold C{data} in memory, and write it to the file (if it can be);
        when following, it is in the followed file already.
        """
        if self.following:
            self.spooled += len(data)
            return
        self.memory.append(data)
        if self.cacheable:
            self._lane.push(data)

    def _start_write(self, batch: list[bytes]) -> Deferred[tuple[int, OSError | None]]:
        """
        Write a batch in a worker thread, holding the descriptor until the
        write returns.
        """
        writer = self._writer
        if writer is None or writer.closing:
            return succeed((0, OSError("the spool is closed")))
        return writer.run(self._run, _spool, self.write, batch)

    def _written(self, result: tuple[int, OSError | None], batch: list[bytes]) -> None:
        if self._abandoned:
            return
        spooled, error = result
        # Spooled bytes are read from the spool from now on.
        self.spooled += spooled
        self.memory.drop_before(self.spooled)
        self._on_written(error)

    def give_up(self, error: OSError, health: SpoolHealth, filename: str) -> None:
        """
        The disk is full or unwritable: the rest stays in memory, and the
        file is not cached.
        """
        self._lane.take()
        self.cacheable = False
        self.release_writer()
        if health.failed(error):
            log.error(
                "cannot write the spool for {filename}: {error}; streaming it uncached",
                filename=filename,
                error=health.message,
            )

    def abandon(self) -> None:
        """
        The flight failed: write nothing more.
        """
        self._abandoned = True
        self._lane.take()
        self.release_writer()

    @property
    def idle(self) -> bool:
        """
        Whether every byte pushed was written (or given up).
        """
        return self._lane.idle

    @property
    def writable(self) -> bool:
        """
        Whether work may still be queued on the write descriptor.
        """
        return self._writer is not None and not self._writer.closing

    def on_writer(self, f: Callable[..., Any], *args: Any) -> Deferred[Any]:
        """
        C{f(fd, *args)} in a worker thread on the write descriptor (see
        L{SharedFd.run}).
        """
        assert self._writer is not None
        return self._writer.run(self._run, f, *args)

    def release_writer(self) -> None:
        """
        Done writing and punching: the write descriptor is closed once the
        work already queued on it has returned.
        """
        if self._writer is not None:
            self._writer.close()

    @property
    def write_fd(self) -> SharedFd | None:
        return self._writer

    # -- reading

    def read(self, offset: int, length: int) -> bytes:
        """
        Up to C{length} bytes at C{offset}, from the file or from memory.

        @raise FlightFailed: if they are no longer held anywhere.
        """
        if offset < self.spooled:
            data = os.pread(self._read_fd, min(length, self.spooled - offset), offset)
        elif offset >= self.memory.start:
            data = self.memory.read(offset, length)
        else:
            raise FlightFailed(503, "the disk is full and these bytes are no longer held")
        if not data:
            raise FlightFailed(502, "spool file shorter than written")
        return data

    @property
    def read_fd(self) -> int:
        """
        The spool file's read descriptor (-1 once its last holder let go):
        its bytes before L{spooled} are in the file.
        """
        return self._read_fd

    def trim(self, lowest: int) -> None:
        """
        Drop the bytes in memory before C{lowest}, which every reader is
        past (only once the spool failed: before, memory is dropped as the
        file is written).
        """
        if not self.cacheable:
            self.memory.drop_before(lowest)

    def hold(self) -> None:
        self._holders += 1

    def release(self) -> None:
        self._holders -= 1
        if self._holders == 0 and self._read_fd >= 0:
            os.close(self._read_fd)
            self._read_fd = -1

    def unlink(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

"""
Streaming files to clients while caching them.

A L{Flight} is the one upstream fetch of one file.  It writes the upstream's
bytes to a spool file as they arrive, hashing them, and never throttles the
upstream: the spool on disk is the buffer, so memory stays flat however many
clients read and however slow they are.  Every client is a L{Sender}: a push
producer registered on its request that reads the spool at its own pace with
C{pread}, waiting for more bytes when it has caught up.  The last byte written
is held back from every client until the hash and length check out, so a
client never receives a complete-looking wrong file; on failure every
client's connection is aborted and nothing is cached.

Cached files are sent by the same L{Sender} from a store reader.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Callable
from typing import Any, Protocol

import attrs
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http import PotentialDataLoss
from twisted.web.iweb import UNKNOWN_LENGTH, IResponse
from twisted.web.server import Request
from zope.interface import implementer

from txpypi.metadata import FileRecord, IMetadata
from txpypi.names import Hasher
from txpypi.stores import IFileStore, file_key
from txpypi.upstream import UpstreamClient, UpstreamError, UpstreamNotFound

log = Logger()

CHUNK = 256 * 1024

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
    size: int | None = None
    written: int = 0
    verified: bool = False
    failure: FlightFailed | None = None
    has_started: bool = False
    _spool_path: str = ""
    _fd: int = -1
    _read_fd: int = -1
    _refs: int = 1
    _hasher: Hasher | None = None
    done: bool = False
    _waiters: list[Deferred[None]] = attrs.field(factory=list)
    _over: Ended = attrs.field(factory=Ended)
    _body: Any = None
    _idle: Any = None
    #: False once the spool failed: the file still streams, but from memory,
    #: and is not cached.
    cacheable: bool = True
    _spooled: int = 0
    _memory: bytearray = attrs.field(factory=bytearray)
    _memory_start: int = 0
    _readers: list[FlightReader] = attrs.field(factory=list)
    _paused: bool = False
    #: How spool bytes are written (a test may inject a full disk).
    spool_write: Callable[[int, memoryview], int] = os.write
    #: Called with "files" when the file store fails us (for metrics).
    on_store_error: Callable[[str], None] = lambda store: None

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
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            self._read_fd = os.open(path, os.O_RDONLY)
        except OSError:
            os.close(self._fd)
            self._unlink()
            raise
        self._hasher = Hasher(self.wanted.expected_hash)
        Deferred.fromCoroutine(self._fetch()).addErrback(self._crashed)

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
            response: IResponse = await self._client.open_file(self.wanted.url)
        except UpstreamNotFound:
            self._fail(FlightFailed(404, f"upstream has no file at {self.wanted.url}"))
            return
        except UpstreamError as e:
            self._fail(FlightFailed(e.status, e.reason))
            return
        length = None if response.length is UNKNOWN_LENGTH else int(response.length)
        if self.wanted.size is not None and length is not None and length != self.wanted.size:
            response.deliverBody(_Sink(None))  # drops the connection
            self._fail(FlightFailed(502, "upstream Content-Length disagrees with the index's size"))
            return
        self.size = length if length is not None else self.wanted.size
        self.has_started = True
        self._wake()
        self._idle = self._clock.callLater(self.read_timeout, self._stalled)
        response.deliverBody(_Sink(self))

    def _stalled(self) -> None:
        self._idle = None
        self._fail(FlightFailed(504, f"upstream sent nothing for {self.read_timeout:g} seconds"))

    def receiving(self, transport: Any) -> None:
        self._body = transport

    # -- called by the body protocol

    def data(self, data: bytes) -> None:
        if self.failure is not None:
            return
        assert self._hasher is not None
        if self._idle is not None:
            self._idle.reset(self.read_timeout)
        if self.size is not None and self.written + len(data) > self.size:
            self._fail(FlightFailed(502, "upstream sent more bytes than announced"))
            return
        if self.cacheable:
            view = memoryview(data)
            try:
                while view:
                    view = view[self.spool_write(self._fd, view) :]
            except OSError as e:
                # What was written of this chunk is in the spool; the rest,
                # and everything after, is held in memory from there on.
                self._spooled += len(data) - len(view)
                self._spool_failed(e)
                self._memory += view
            else:
                self._spooled += len(data)
        else:
            self._memory += data
        self._hasher.update(data)
        self.written += len(data)
        self._wake()
        if len(self._memory) > MEMORY_HIGH and not self._paused and self._body is not None:
            self._paused = True
            self._cancel_idle()  # our own pause is not the upstream stalling
            self._body.pauseProducing()

    def _spool_failed(self, error: OSError) -> None:
        """
        The disk is full or unwritable: go on streaming from memory to the
        clients, without caching.
        """
        self.cacheable = False
        self.on_store_error("files")
        self._memory_start = self._spooled
        os.close(self._fd)
        self._fd = -1
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
        lowest = min((max(r.position, self._memory_start) for r in self._readers), default=self.written)
        drop = lowest - self._memory_start
        if drop > 0:
            del self._memory[:drop]
            self._memory_start = lowest
        if self._paused and len(self._memory) <= MEMORY_HIGH // 2 and self._body is not None:
            self._paused = False
            self._idle = self._clock.callLater(self.read_timeout, self._stalled)
            self._body.resumeProducing()

    def ended(self, reason: Failure) -> None:
        if self.failure is not None:
            return
        self._body = None
        self._cancel_idle()
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
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self.size = self.written
        self.verified = True
        self._wake()
        if not self.cacheable:
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
        try:
            await self._store.commit(self._spool_path, record.store_key)
            await self._metadata.put_file(record)
        except Exception:
            self.on_store_error("files")
            log.failure("could not cache {filename}", filename=self.wanted.filename)
            try:  # no object without a record: it would never be counted or evicted
                await self._store.delete(record.store_key)
            except Exception:
                log.failure("could not remove the unrecorded {key}", key=record.store_key)
            self._unlink()
            self._finish(None)
            return
        _spool_error.clear()
        log.info(
            "cached {filename} ({size} bytes, sha256 {sha256}) from {url}",
            filename=self.wanted.filename,
            size=record.size,
            sha256=sha256,
            url=record.url,
        )
        self._finish(record)

    # -- failure and cleanup

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
            url=self.wanted.url,
            reason=failure.reason,
        )
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._unlink()
        self._wake()
        self._finish(None)

    def _cancel_idle(self) -> None:
        if self._idle is not None:
            if self._idle.active():
                self._idle.cancel()
            self._idle = None

    def _unlink(self) -> None:
        try:
            os.unlink(self._spool_path)
        except FileNotFoundError:
            pass

    def _finish(self, record: FileRecord | None) -> None:
        self.done = True
        self._on_done(self, record)
        self.release()
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

    async def read(self, offset: int, length: int, stop: int | None = None) -> bytes:
        """
        Read up to C{length} bytes at C{offset}, waiting for them to arrive.
        With C{stop} (a range's exclusive end), the byte before C{stop} is
        held back until the file is verified, like the file's last byte.

        @raise FlightFailed: if the fetch failed.
        """
        while True:
            if self.failure is not None:
                raise self.failure
            limit = self.readable()
            if stop is not None:
                limit = min(limit, stop if self.verified else stop - 1)
            if offset < limit:
                if offset < self._spooled:
                    n = min(length, limit - offset, self._spooled - offset)
                    data = os.pread(self._read_fd, n, offset)
                elif offset >= self._memory_start:
                    start = offset - self._memory_start
                    data = bytes(self._memory[start : start + min(length, limit - offset)])
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
    #: The end of the range being read, if it is not the whole file.
    stop: int | None = None

    @property
    def size(self) -> int | None:
        return self._flight.size

    #: Where this reader has read up to (for trimming bytes held in memory).
    position: int = 0

    def read(self, offset: int, length: int) -> Deferred[bytes]:
        d = Deferred.fromCoroutine(self._flight.read(offset, length, self.stop))
        d.addCallback(self._advanced, offset)
        return d

    def _advanced(self, data: bytes, offset: int) -> bytes:
        self.position = offset + len(data)
        self._flight._trim()
        return data

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._flight._forget_reader(self)


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

    def __init__(self, request: Request, source: ByteSource, start: int = 0, end: int | None = None) -> None:
        """
        @param start: the first byte to send.
        @param end: the (exclusive) end of the bytes to send, or L{None} for
            the end of the source.
        """
        self._request = request
        self._source = source
        self._paused = False
        self._resume: Deferred[None] | None = None
        self._pending: Deferred[bytes] | None = None
        self._stopped = False
        self._offset = start
        self._end = end
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
            pass
        except Exception as e:
            # The client has headers and part of the body: all we can do is
            # make sure it cannot mistake that part for the whole.
            if not isinstance(e, FlightFailed):
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

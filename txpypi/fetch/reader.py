"""
What clients read from a flight: a L{FlightReader} each, and the flight's
read side, L{Readers}, which holds the file's last byte back until it is
verified and lets each read wait for its bytes to arrive.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Iterator
from typing import Any, Protocol

import attrs
from twisted.internet.defer import Deferred, fail

from txpypi.concurrency.waiters import Once
from txpypi.fetch.punch import Puncher
from txpypi.fetch.spool import Spool
from txpypi.fetch.wanted import FlightFailed


class ReadFrom(Protocol):
    """
    What a reader reads from (a flight's L{Readers}).
    """

    @property
    def size(self) -> int | None: ...

    def read(self, offset: int, length: int) -> Coroutine[Any, Any, bytes]: ...

    def reader_moved(self) -> None:
        """
        A reader read on: what every reader is past may be let go.
        """

    def reader_closed(self, reader: FlightReader) -> None:
        """
        A reader is done (its client left, or it was cut off).
        """

    def sendable(self, offset: int, end: int) -> tuple[int, int]:
        """
        See L{Readers.sendable}.
        """


@attrs.define(eq=False)
class FlightReader:
    """
    One client's reads of a flight's bytes, at the client's own pace.
    """

    _flight: ReadFrom
    #: Where this reader has read up to (for trimming bytes held in memory).
    position: int = 0
    #: Called when the flight cuts this reader off (its sender aborts).
    on_cut: Callable[[], None] | None = None
    _closed: bool = False
    _cut: bool = False

    @property
    def size(self) -> int | None:
        return self._flight.size

    def read(self, offset: int, length: int) -> Deferred[bytes]:
        if self._cut:
            return fail(FlightFailed(503, "cut off: too slow while the disk is full"))
        d = Deferred.fromCoroutine(self._flight.read(offset, length))
        d.addCallback(self._advanced, offset)
        return d

    def _advanced(self, data: bytes, offset: int) -> bytes:
        self.moved_to(offset + len(data))
        return data

    # -- for a sender that sends from the spool file itself (by sendfile)

    def sendable(self, offset: int, end: int) -> tuple[int, int]:
        """
        What may be sent now of the bytes from C{offset} to C{end}: how
        many are in the spool file, and the file's descriptor; C{(0, -1)}
        when they are not (yet), or only in memory: L{read} them.

        @raise FlightFailed: the flight failed, or this reader was cut off.
        """
        if self._cut:
            raise FlightFailed(503, "cut off: too slow while the disk is full")
        return self._flight.sendable(offset, end)

    def moved_to(self, position: int) -> None:
        """
        The client has the bytes before C{position}.
        """
        self.position = position
        self._flight.reader_moved()

    def cut(self) -> None:
        """
        Cut this reader off: its client is aborted and its reads fail.
        """
        self._cut = True
        self.close()
        if self.on_cut is not None:
            self.on_cut()

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._flight.reader_closed(self)


class ReadState(Protocol):
    """
    What the read side needs to know of its flight (a
    L{txpypi.fetch.flight.Flight}).
    """

    @property
    def size(self) -> int | None: ...

    @property
    def written(self) -> int:
        """
        Bytes received: spooled, or held in memory until they are.
        """

    @property
    def failure(self) -> FlightFailed | None: ...

    @property
    def has_started(self) -> bool: ...

    @property
    def verified(self) -> bool: ...


@attrs.define(eq=False)
class Readers:
    """
    A flight's read side: its clients' readers, and the reads that wait for
    bytes to arrive.  The flight L{wake}s them at every change they may care
    for.
    """

    _flight: ReadState
    _spool: Spool
    _puncher: Puncher
    #: Called when a reader read on: the bytes every reader is past may be let go.
    _on_moved: Callable[[], None]
    #: Called when a reader closed, before it lets go of the spool.
    _on_closed: Callable[[], None]
    _readers: list[FlightReader] = attrs.field(factory=list)
    #: Happens at the next change a waiting reader may care for.
    _changed: Once[None] = attrs.field(factory=Once)

    def __len__(self) -> int:
        return len(self._readers)

    def __iter__(self) -> Iterator[FlightReader]:
        return iter(self._readers)

    def lowest(self, default: int) -> int:
        """
        Where the slowest reader is (C{default} without readers).
        """
        return min((r.position for r in self._readers), default=default)

    def reader(self) -> FlightReader:
        """
        A new reader of the flight's bytes; its owner closes it.
        """
        self._spool.hold()
        reader = FlightReader(self)
        self._readers.append(reader)
        return reader

    @property
    def size(self) -> int | None:
        return self._flight.size

    def reader_moved(self) -> None:
        self._on_moved()

    def reader_closed(self, reader: FlightReader) -> None:
        """
        A reader is done: it no longer holds bytes or the spool.
        """
        if reader in self._readers:
            self._readers.remove(reader)
        self._on_closed()
        self._spool.release()

    def wake(self) -> None:
        """
        Something a waiting reader may care for happened: bytes came, the
        fetch started, verified or failed.
        """
        changed, self._changed = self._changed, Once()
        changed.happen(None)

    async def wait_started(self) -> None:
        """
        Wait until the upstream's response headers arrived (so the flight's
        size is known if it ever will be).

        @raise FlightFailed: if the fetch failed first.
        """
        while True:
            if self._flight.failure is not None:
                raise self._flight.failure
            if self._flight.has_started:
                return
            await self._changed.wait()

    def readable(self) -> int:
        """
        How many bytes clients may have: all once verified, else all but the
        last one written.
        """
        written = self._flight.written
        return written if self._flight.verified else max(0, written - 1)

    def sendable(self, offset: int, end: int) -> tuple[int, int]:
        """
        How many of the bytes from C{offset} to C{end} may be sent now
        from the spool file, and its descriptor: those in the file and
        readable (the last one of C{end} held back until the file is
        verified, as L{read} holds it); C{(0, -1)} if none (L{read} them:
        from memory, or once they arrive).

        @raise FlightFailed: if the fetch failed, or its bytes at C{offset}
            were freed.
        """
        if self._flight.failure is not None:
            raise self._flight.failure
        if offset < self._puncher.floor:
            raise FlightFailed(503, "these bytes are no longer held here")
        limit = self.readable() if self._flight.verified else min(self.readable(), end - 1)
        count = min(limit, end, self._spool.spooled) - offset
        if count <= 0 or self._spool.read_fd < 0:
            return 0, -1
        return count, self._spool.read_fd

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
            if self._flight.failure is not None:
                raise self._flight.failure
            if offset < self._puncher.floor:
                raise FlightFailed(503, "these bytes are no longer held here")
            verified = self._flight.verified
            limit = self.readable() if verified else min(self.readable(), offset + length - 1)
            if offset < limit:
                return self._spool.read(offset, min(length, limit - offset))
            if verified:
                return b""
            await self._changed.wait()

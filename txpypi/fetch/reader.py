"""
What a client reads from a flight: a L{FlightReader} each, and the flight's
L{Readers}.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine, Iterator
from typing import Any, Protocol

import attrs
from twisted.internet.defer import Deferred, fail

from txpypi.fetch.wanted import FlightFailed


class ReadFrom(Protocol):
    """
    What a reader reads from (a L{txpypi.fetch.flight.Flight}).
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
        self.position = offset + len(data)
        self._flight.reader_moved()
        return data

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


@attrs.define(eq=False)
class Readers:
    """
    A flight's readers.
    """

    _readers: list[FlightReader] = attrs.field(factory=list)

    def __len__(self) -> int:
        return len(self._readers)

    def __iter__(self) -> Iterator[FlightReader]:
        return iter(self._readers)

    def add(self, reader: FlightReader) -> None:
        self._readers.append(reader)

    def discard(self, reader: FlightReader) -> None:
        if reader in self._readers:
            self._readers.remove(reader)

    def lowest(self, default: int) -> int:
        """
        Where the slowest reader is (C{default} without readers).
        """
        return min((r.position for r in self._readers), default=default)

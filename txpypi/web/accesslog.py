"""
Access log lines: the client's address (honouring X-Forwarded-For only
from trusted proxies) and the line in the combined format or as JSON,
pure; and L{AccessLogWriter}, which writes them, buffered.
"""

from __future__ import annotations

import json
import os
import select
import time
from collections.abc import Callable, Collection, Iterator
from typing import Any, BinaryIO

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

log = Logger(namespace="txpypi.access")

FORMATS = ("combined", "json", "none")


def client_address(peer: str, forwarded_for: str | None, trusted: Collection[str]) -> str:
    """
    The address of the client: the peer, unless the peer is a trusted proxy,
    in which case C{X-Forwarded-For} is walked from the right past every
    trusted proxy.
    """
    if peer not in trusted or not forwarded_for:
        return peer
    hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
    address = peer
    while hops and address in trusted:
        address = hops.pop()
    return address


@attrs.frozen
class Entry:
    client: str
    method: str
    path: str
    protocol: str
    status: int
    size: int
    duration: float
    cache: str
    referer: str
    user_agent: str
    time: float


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def stamp(seconds: float) -> str:
    """
    A time as the combined format writes it.
    """
    return time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(seconds))


class Stamps:
    """
    L{stamp}, worked out once per second (many lines share one).
    """

    def __init__(self) -> None:
        self._second = -1
        self._text = ""

    def __call__(self, seconds: float) -> str:
        second = int(seconds)
        if second != self._second:
            self._second, self._text = second, stamp(second)
        return self._text


def combined(entry: Entry, stamps: Callable[[float], str] = stamp) -> str:
    """
    The Apache/nginx combined format, plus the cache state and the duration.
    """
    head, tail = combined_parts(entry)
    return head + stamps(entry.time) + tail + f"{entry.duration:.6f}"


def combined_parts(entry: Entry) -> tuple[str, str]:
    """
    A combined line but for its time and its duration: what comes before
    the time, and what comes between it and the duration (the same for
    every answer of a kind, which the quick lane keeps).
    """
    return (
        f"{entry.client} - - [",
        f'] "{_quote(entry.method)} {_quote(entry.path)} {_quote(entry.protocol)}" '
        f'{entry.status} {entry.size} "{_quote(entry.referer)}" "{_quote(entry.user_agent)}" '
        f"{entry.cache or '-'} ",
    )


def json_line(entry: Entry) -> str:
    fields: dict[str, Any] = attrs.asdict(entry)
    fields["duration"] = round(entry.duration, 6)
    return json.dumps(fields, separators=(",", ":"))


#: Where the access log goes: standard output, the twisted.logger events of
#: namespace C{txpypi.access} (as before), or else a file path.
STDOUT = "-"
LOGGER = "log"

#: How often the buffered lines are written, in seconds.
FLUSH_EVERY = 1.0

#: The most bytes of lines held before they are written at once, whatever
#: the time: a burst of requests cannot grow the buffer past this.
MAX_BUFFERED = 1024 * 1024

#: The most bytes handed to the writing thread and not written yet (a full
#: pipe, a stalled disk); past it, lines are dropped and counted, and the
#: count is logged once the writes catch up.
MAX_PENDING = 16 * 1024 * 1024


def pieces(data: bytes, most: int) -> Iterator[bytes]:
    """
    C{data} (whole lines) in pieces of whole lines of at most C{most}
    bytes, but for a single longer line.
    """
    start = 0
    while len(data) - start > most:
        end = data.rfind(b"\n", start, start + most) + 1
        if end <= start:  # one line longer than that
            end = data.find(b"\n", start) + 1 or len(data)
        yield data[start:end]
        start = end
    if start < len(data):
        yield data[start:]


class AccessLogWriter:
    """
    Access log lines, buffered and written once a second (and when
    L{MAX_BUFFERED} bytes wait, and at shutdown) to standard output or a
    file: a line costs a string join, not a logger event.  The writes run
    one after the other through C{run} (a thread pool: a full pipe or a
    slow disk never stalls the reactor thread); the target is opened again
    by L{reopen} (at SIGHUP, so that log rotation works).
    """

    def __init__(self, clock: IReactorTime, run: Callable[..., Deferred[Any]], target: str = STDOUT) -> None:
        self._clock = clock
        self._run = run
        self.target = target
        self._lines: list[bytes] = []
        self._size = 0
        self._file: BinaryIO | None = None
        self._writing: Deferred[Any] = succeed(None)
        self._loop: LoopingCall | None = None
        #: Bytes handed to the thread and not written yet; lines dropped.
        self.pending = 0
        self.dropped = 0

    def start(self) -> None:
        self._then(self._open, self.target)
        loop = self._loop = LoopingCall(self.flush)
        loop.clock = self._clock
        loop.start(FLUSH_EVERY, now=False)

    def write(self, line: str) -> None:
        data = (line + "\n").encode("utf-8", "replace")
        if self.pending + self._size + len(data) > MAX_PENDING:
            self.dropped += 1  # the writes fall behind: bounded, and said
            return
        self._lines.append(data)
        self._size += len(data)
        if self._size >= MAX_BUFFERED:
            self.flush()

    def flush(self) -> Deferred[Any]:
        """
        Write what waits; fires once it (and every write before) is written.
        """
        if self._lines:
            data, self._lines, self._size = b"".join(self._lines), [], 0
            self.pending += len(data)
            self._then(self._write, data)
            self._writing.addBoth(self._written, len(data))
        return self._writing

    def _written(self, result: Any, size: int) -> Any:
        self.pending -= size
        if self.dropped and not self.pending:
            log.warn("access log: {count} line(s) dropped while writing fell behind", count=self.dropped)
            self.dropped = 0
        return result

    def reopen(self, target: str) -> None:
        """
        Write what waits to the current target, then open C{target}.
        """
        self.flush()
        self.target = target
        self._then(self._open, target)

    def stop(self) -> Deferred[Any]:
        """
        Stop the timer, write what waits, and close the file.
        """
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self.flush()
        self._then(self._close)
        return self._writing

    def _then(self, f: Callable[..., None], *args: Any) -> None:
        # One write after the other, in order; a failure is logged and the
        # next write still runs.
        self._writing = self._writing.addCallback(lambda _: self._run(f, *args)).addErrback(
            lambda failure: log.failure("access log: could not write", failure)
        )

    # In the thread.

    def _open(self, target: str) -> None:
        self._close()
        if target == STDOUT:
            self._file = None
        elif target != LOGGER:
            self._file = open(target, "ab")

    def _write(self, data: bytes) -> None:
        if self._file is None:
            # Worker processes share standard output: a pipe keeps a write
            # of at most PIPE_BUF bytes whole, so lines never interleave.
            for piece in pieces(data, select.PIPE_BUF):
                view = memoryview(piece)
                while view:  # a pipe may take part of it
                    view = view[os.write(1, view) :]
            return
        self._file.write(data)
        self._file.flush()

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

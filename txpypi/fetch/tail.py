"""
Following a download of another worker of this machine by reading its
spool file as it grows, instead of asking that worker over HTTP: the bytes
are on the same disk (mostly in the page cache still), and a follower has
its first byte a poll after the leader's upstream answered.

The leader leaves a L{SpoolNote} in its lock file once its upstream's
headers came (L{txpypi.storage.filelocks.FileLocks.note}); a follower's
flight opens the file it names (L{open_spool}) and reads it to the size the
note gives (L{SpoolTail}), hashing the bytes itself as from any upstream;
its own clients read them from that file too (L{txpypi.fetch.spool.Spool.follow}),
so that they are on the disk once.
A leader that fails unlinks its spool before it is whole: the follower's
body is cut (as a peer's connection would be).  A leader that dies is found
out when its process is gone; one that stalls, by the flight's read timeout.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.internet.task import deferLater
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from zope.interface import implementer

from txpypi.concurrency.waiters import Timer

#: The first wait, in seconds, before looking again at a note or a spool
#: that has nothing new; it grows by half at each empty look up to
#: L{POLL_MAX}, and starts again once something came.
POLL_FIRST = 0.001
POLL_MAX = 0.02
#: For this long a note is looked for every L{POLL_FIRST} (a follower's
#: first byte waits for it), and only then less and less often.
NOTE_EAGER = 0.2
#: After this many seconds with no new byte, check that the leader lives.
STALL_CHECK = 0.5
#: The most read from the spool at once, between two turns of the reactor.
CHUNK = 1024 * 1024

#: What a leader's note says when its spool is not for followers to read
#: (its size is unknown, or its store frees the spool's start as it
#: uploads): follow it over HTTP.
OVER_HTTP = "peer\n"


@attrs.frozen
class SpoolNote:
    """
    Where a leader on this machine spools a download: its process, the
    file's size, and the spool file's path.
    """

    pid: int
    size: int
    path: str

    def text(self) -> str:
        return f"spool {self.pid} {self.size} {self.path}\n"

    @classmethod
    def parse(cls, text: str) -> SpoolNote | None:
        """
        The note in C{text}, or L{None} if it is not one (or not whole yet:
        it ends with a newline).
        """
        if not text.startswith("spool ") or not text.endswith("\n"):
            return None
        parts = text[:-1].split(" ", 3)
        if len(parts) != 4 or not parts[1].isdigit() or not parts[2].isdigit():
            return None
        return cls(int(parts[1]), int(parts[2]), parts[3])


#: Reads the note the lock's holder left: L{None} once the lock is let go,
#: C{""} while it is held with no note yet.
NoteReader = Callable[[], str | None]


async def open_spool(
    notes: NoteReader, spool_dir: str, clock: IReactorTime, timeout: float
) -> SpoolTail | None:
    """
    Wait for the leader's note (at most C{timeout} seconds) and open the
    spool it names; L{None} to follow the leader over HTTP instead: it
    said so, its lock was let go, no note came in time, or the spool is
    gone already (landed, or failed).  Only a spool in C{spool_dir} or a
    directory beside it (each worker of this machine spools in its own) is
    ever opened: a note never leads out of the cache.
    """
    waited, wait = 0.0, POLL_FIRST
    while True:
        text = notes()
        if text is None or text == OVER_HTTP:
            return None
        if text:
            break
        if waited >= timeout:
            return None
        await deferLater(clock, wait)
        waited += wait
        if waited >= NOTE_EAGER:
            wait = _slower(wait)
    note = SpoolNote.parse(text)
    if note is None or not _beside(note.path, spool_dir):
        return None
    try:
        fd = os.open(note.path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    return SpoolTail(fd, note, clock)


def _slower(wait: float) -> float:
    """
    The wait after an empty look that waited C{wait}.
    """
    return min(wait * 1.5, POLL_MAX)


def _beside(path: str, spool_dir: str) -> bool:
    """
    Whether C{path} is a file in C{spool_dir} or in a directory beside it
    (each worker of this machine spools in its own, all in one directory).
    """
    path, spool_dir = os.path.normpath(path), os.path.normpath(spool_dir)
    parent = os.path.dirname(path)
    return os.path.isabs(path) and (
        parent == spool_dir or os.path.dirname(parent) == os.path.dirname(spool_dir)
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as e:
        return e.errno == errno.EPERM
    return True


@implementer(IPushProducer)
@attrs.define(eq=False)
class SpoolTail:
    """
    A leader's spool file read to its end as it grows: the response of a
    follower's flight (its C{length} and C{deliverBody}), and the producer
    of its body (paused, resumed and stopped by the flight).  It owns the
    descriptor, closed once the body ends or is stopped.
    """

    _fd: int
    _note: SpoolNote
    _clock: IReactorTime
    _protocol: Any = None
    _offset: int = 0
    _paused: bool = False
    _closed: bool = False
    #: The next look at the spool, while one is to come.
    _next: Timer = attrs.field(init=False)
    _wait: float = POLL_FIRST
    #: When the last byte came, or reading began.
    _grew_at: float = 0.0

    def __attrs_post_init__(self) -> None:
        self._next = Timer(self._clock)

    @property
    def length(self) -> int:
        return self._note.size

    def dup(self) -> int:
        """
        A descriptor of the followed spool of one's own, to read it by.
        """
        return os.dup(self._fd)

    code = 200

    def deliverBody(self, protocol: Any) -> None:
        self._protocol = protocol
        self._grew_at = self._clock.seconds()
        protocol.makeConnection(self)
        if not self._closed:
            self._later(0)

    # -- IPushProducer

    def pauseProducing(self) -> None:
        self._paused = True
        self._next.cancel()

    def resumeProducing(self) -> None:
        if self._paused and not self._closed:
            self._paused = False
            self._grew_at = self._clock.seconds()  # a pause of ours is no stall of the leader's
            self._later(0)

    def stopProducing(self) -> None:
        self._close()

    # -- reading

    def _later(self, seconds: float) -> None:
        self._next.start(seconds, self._read)

    def _read(self) -> None:
        if self._closed or self._paused:
            return
        size = self._note.size
        try:
            st = os.fstat(self._fd)
            ready = min(st.st_size, size) - self._offset
            data = os.pread(self._fd, min(ready, CHUNK), self._offset) if ready > 0 else b""
        except OSError as e:
            self._end(Failure(ConnectionLost(f"cannot read the spool followed: {e.strerror or e}")))
            return
        if data:
            self._offset += len(data)
            self._wait, self._grew_at = POLL_FIRST, self._clock.seconds()
            self._protocol.dataReceived(data)
            if self._offset >= size:
                self._end(Failure(ResponseDone()))
            elif not self._closed and not self._paused:
                self._later(0)
            return
        if self._offset >= size:
            self._end(Failure(ResponseDone()))
        elif st.st_nlink == 0:
            # Unlinked before it was whole: the leader's download failed.
            self._end(Failure(ConnectionLost("the download followed failed")))
        elif self._clock.seconds() - self._grew_at >= STALL_CHECK and not _alive(self._note.pid):
            self._end(Failure(ConnectionLost("the worker whose download was followed is gone")))
        else:
            self._later(self._wait)
            self._wait = _slower(self._wait)

    def _end(self, reason: Failure) -> None:
        protocol = self._protocol
        self._close()
        protocol.connectionLost(reason)

    def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._next.cancel()
        os.close(self._fd)


__all__ = ["OVER_HTTP", "NoteReader", "SpoolNote", "SpoolTail", "open_spool"]

"""
Following a worker's download from its spool file (L{txpypi.fetch.tail}):
a real file that the test grows, a real lock file, and a L{Clock} for the
polls.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone

from txpypi.fetch.tail import (
    NOTE_EAGER,
    OVER_HTTP,
    POLL_FIRST,
    POLL_MAX,
    STALL_CHECK,
    SpoolNote,
    SpoolTail,
    open_spool,
)
from txpypi.storage.filelocks import FileLocks


class Body:
    """
    A body protocol that keeps what it is given.
    """

    def __init__(self) -> None:
        self.data = b""
        self.reason: Failure | None = None
        self.transport: Any = None

    def makeConnection(self, transport: Any) -> None:
        self.transport = transport

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure) -> None:
        self.reason = reason


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def tail(path: Path, size: int, clock: Clock, pid: int | None = None) -> tuple[SpoolTail, Body]:
    note = SpoolNote(os.getpid() if pid is None else pid, size, str(path))
    spool = SpoolTail(os.open(path, os.O_RDONLY), note, clock)
    body = Body()
    spool.deliverBody(body)
    return spool, body


def test_a_note_reads_back_and_only_whole() -> None:
    note = SpoolNote(12, 3_000_000, "/c/tmp/w0/1-2-3.part")
    assert SpoolNote.parse(note.text()) == note
    assert SpoolNote.parse(note.text()[:-1]) is None  # cut short: not whole yet
    assert SpoolNote.parse(OVER_HTTP) is None
    assert SpoolNote.parse("spool x 3 /a\n") is None


def test_the_spool_is_read_as_it_grows_to_its_size(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "a.part"
    path.write_bytes(b"")
    before = open_fds()
    spool, body = tail(path, 10, clock)
    assert spool.length == 10 and body.transport is spool
    clock.advance(0)
    assert body.data == b"" and body.reason is None
    with open(path, "ab") as f:
        f.write(b"01234")
    clock.advance(POLL_MAX)
    assert body.data == b"01234"
    with open(path, "ab") as f:
        f.write(b"56789")
    clock.advance(POLL_MAX)
    assert body.data == b"0123456789"
    assert body.reason is not None and body.reason.check(ResponseDone)
    assert open_fds() == before  # its descriptor is closed again
    assert not clock.getDelayedCalls()


def test_a_paused_tail_reads_nothing_until_resumed(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "a.part"
    path.write_bytes(b"0123")
    spool, body = tail(path, 8, clock)
    spool.pauseProducing()
    clock.advance(1)
    assert body.data == b"" and not clock.getDelayedCalls()  # no poll while paused
    spool.resumeProducing()
    clock.advance(0)
    assert body.data == b"0123"
    spool.stopProducing()
    assert not clock.getDelayedCalls() and body.reason is None


def test_a_spool_unlinked_before_it_is_whole_cuts_the_body(tmp_path: Path) -> None:
    """
    The leader failed (it unlinks its spool): the body is cut, never ended
    as if whole; once whole, an unlinked spool (it landed) still reads to
    its end.
    """
    clock = Clock()
    path = tmp_path / "a.part"
    path.write_bytes(b"0123")
    _, body = tail(path, 8, clock)
    clock.advance(0)
    path.unlink()
    clock.advance(POLL_MAX)
    assert body.data == b"0123"
    assert body.reason is not None and body.reason.check(ConnectionLost)
    assert not clock.getDelayedCalls()

    path.write_bytes(b"01234567")
    _, whole = tail(path, 8, clock)
    path.unlink()
    clock.advance(0)
    assert whole.data == b"01234567" and whole.reason is not None and whole.reason.check(ResponseDone)


def test_a_spool_whose_leader_died_is_given_up_once_it_stalls(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "a.part"
    path.write_bytes(b"0123")
    gone = subprocess.Popen(["true"])
    gone.wait()  # reaped: its pid names no process
    _, body = tail(path, 8, clock, pid=gone.pid)
    clock.advance(0)
    while clock.seconds() < STALL_CHECK - POLL_MAX:
        clock.advance(POLL_MAX)
    assert body.reason is None  # not given up before the stall is long enough
    clock.advance(2 * POLL_MAX)
    assert body.reason is not None and body.reason.check(ConnectionLost)
    assert "gone" in str(body.reason.value)

    _, alive = tail(path, 8, clock)  # this process: alive, so it waits on
    for _ in range(100):
        clock.advance(POLL_MAX)
    assert alive.reason is None and clock.getDelayedCalls()


def test_the_locks_carry_a_note_under_the_holders_name(tmp_path: Path) -> None:
    leader, follower = FileLocks(tmp_path, owner="host:1:a http://x/"), FileLocks(tmp_path, owner="b")
    assert follower.notes("k") is None
    assert leader.acquire("k").result
    assert follower.notes("k") == ""  # held, no note yet
    leader.note("k", "spool 1 2 /p\n")
    follower.note("k", "not the holder\n")  # only the holder writes one
    assert follower.notes("k") == "spool 1 2 /p\n"
    assert follower.holder("k").result == "host:1:a http://x/"
    leader.release("k")
    assert follower.notes("k") is None
    assert leader.acquire("k").result
    os.close(leader._held.pop("k"))  # as if it died: the lock is let go, its file is left
    assert (tmp_path / os.listdir(tmp_path)[0]).exists()
    assert follower.notes("k") is None


def run(d: Deferred[Any], clock: Clock, steps: int = 5000) -> Any:
    """
    Drive C{clock}, from one poll to the next, until C{d} fires; its result.
    """
    got: list[Any] = []
    d.addBoth(got.append)
    for _ in range(steps):
        if got or not clock.getDelayedCalls():
            break
        clock.advance(min(c.getTime() for c in clock.getDelayedCalls()) - clock.seconds())
    assert got, "never fired"
    if isinstance(got[0], Failure):
        got[0].raiseException()
    return got[0]


@pytest.mark.parametrize(
    ("notes", "opened"),
    [
        (["", "", "{note}"], True),
        ([None], False),  # let go: landed, or failed before it started
        (["", OVER_HTTP], False),  # the leader says: over HTTP
        (["spool 1 8 /etc/passwd\n"], False),  # never out of the spool directories
        (["spool 1 8 {spool}/../../x.part\n"], False),
        (["spool 1 8 {spool}/gone.part\n"], False),  # gone already
    ],
)
def test_open_spool_waits_for_the_note_and_opens_only_a_spool(
    tmp_path: Path, notes: list[str | None], opened: bool
) -> None:
    clock = Clock()
    spools = tmp_path / "tmp"
    mine, theirs = spools / "w1", spools / "w0"
    mine.mkdir(parents=True)
    theirs.mkdir()
    (theirs / "a.part").write_bytes(b"0123")
    (tmp_path / "x.part").write_bytes(b"0123")
    note = SpoolNote(os.getpid(), 8, str(theirs / "a.part")).text()
    said = iter(n if n is None else n.format(note=note, spool=mine) for n in notes)
    tail = run(Deferred.fromCoroutine(open_spool(lambda: next(said), str(mine), clock, 5.0)), clock)
    assert (tail is not None) == opened
    if tail is not None:
        body = Body()
        tail.deliverBody(body)
        clock.advance(0)
        assert body.data == b"0123"
        tail.stopProducing()


def test_open_spool_gives_up_waiting_after_its_timeout() -> None:
    """
    Every 1 ms for the first 0.2 s (a follower's first byte waits on the
    note), then less and less often, and no longer than the timeout.
    """
    clock, looks = Clock(), []

    def notes() -> str:
        looks.append(clock.seconds())
        return ""

    d = Deferred.fromCoroutine(open_spool(notes, "/c/tmp/w0", clock, 1.0))
    assert run(d, clock) is None and 1.0 <= clock.seconds() < 1.0 + POLL_MAX
    eager = [t for t in looks if t < NOTE_EAGER - POLL_FIRST / 2]
    assert len(eager) == round(NOTE_EAGER / POLL_FIRST)
    assert len(looks) - len(eager) < (1.0 - NOTE_EAGER) / POLL_FIRST / 10

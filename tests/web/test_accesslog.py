"""
The buffered access log on a L{Clock}, its writes run by hand: lines
written once a second, at 1 MiB, and at stop, in order; bounded when the
writes fall behind; the target opened again on reopen.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from txpypi.web import accesslog
from txpypi.web.accesslog import AccessLogWriter, pieces


class HeldRuns:
    """
    Runs each call when told to (a thread that may fall behind).
    """

    def __init__(self) -> None:
        self.waiting: list[tuple[Deferred[Any], Any, tuple[Any, ...]]] = []

    def __call__(self, f: Any, *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.waiting.append((d, f, args))
        return d

    def run_all(self) -> None:
        while self.waiting:
            d, f, args = self.waiting.pop(0)
            d.callback(f(*args))


def test_lines_are_written_once_a_second_in_order_and_at_stop(tmp_path: Path) -> None:
    clock, runs = Clock(), HeldRuns()
    path = tmp_path / "access.log"
    writer = AccessLogWriter(clock, runs, str(path))
    writer.start()
    runs.run_all()
    writer.write("one")
    writer.write("two")
    runs.run_all()
    assert path.read_text() == ""  # buffered
    clock.advance(1)
    runs.run_all()
    assert path.read_text() == "one\ntwo\n"
    writer.write("three")
    done: list[Any] = []
    writer.stop().addBoth(done.append)
    runs.run_all()
    assert done == [None] and path.read_text() == "one\ntwo\nthree\n"


def test_a_full_buffer_is_written_at_once_and_a_stalled_writer_drops_lines(
    tmp_path: Path, monkeypatch: Any
) -> None:
    monkeypatch.setattr(accesslog, "MAX_BUFFERED", 10)
    monkeypatch.setattr(accesslog, "MAX_PENDING", 30)
    clock, runs = Clock(), HeldRuns()
    path = tmp_path / "access.log"
    writer = AccessLogWriter(clock, runs, str(path))
    writer.start()
    runs.run_all()
    writer.write("0123456789")  # 11 bytes: written at once, without the second
    assert writer.pending == 11 and len(runs.waiting) == 1
    for _ in range(3):
        writer.write("0123456789")
    assert writer.dropped == 2  # 11 + 11 handed over, the next two past 30: dropped
    runs.run_all()
    assert writer.pending == 0 and writer.dropped == 0  # caught up: the count is logged
    assert path.read_text() == "0123456789\n" * 2


def test_reopen_moves_to_a_new_file(tmp_path: Path) -> None:
    clock, runs = Clock(), HeldRuns()
    first, second = tmp_path / "a.log", tmp_path / "b.log"
    writer = AccessLogWriter(clock, runs, str(first))
    writer.start()
    writer.write("before")
    writer.reopen(str(second))
    writer.write("after")
    writer.stop()
    runs.run_all()
    assert (first.read_text(), second.read_text()) == ("before\n", "after\n")


def test_lines_go_to_a_shared_pipe_in_whole_pieces() -> None:
    """
    Worker processes share standard output: each write is whole lines of
    at most PIPE_BUF bytes (which a pipe never interleaves), but for a
    line longer than that, written alone.
    """
    lines = [b"x" * n + b"\n" for n in (100, 3000, 2000, 5000, 10, 4095)]
    data = b"".join(lines)
    cut = list(pieces(data, 4096))
    assert b"".join(cut) == data
    assert all(piece.endswith(b"\n") for piece in cut)
    assert all(len(piece) <= 4096 or piece.count(b"\n") == 1 for piece in cut)
    assert len(cut) == 5  # 100+3000, 2000, 5000, 10, 4095

"""
One upstream fetch (L{Flight}) driven by hand: a fake response whose body
the test delivers byte by byte, and a L{Clock} for the idle timeout.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import attrs
import pytest
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone, ResponseFailed
from twisted.web.http import PotentialDataLoss
from twisted.web.http_headers import Headers
from twisted.web.iweb import UNKNOWN_LENGTH

from txpypi.concurrency.waiters import in_thread_now
from txpypi.fetch.flight import Flight
from txpypi.fetch.spool import Chunks
from txpypi.fetch.tuning import FlightTuning
from txpypi.fetch.wanted import FlightFailed, Wanted
from txpypi.storage.memory import MemoryStore
from txpypi.storage.metadata import FileRecord, MemoryMetadata

DATA = b"0123456789" * 100
SHA = hashlib.sha256(DATA).hexdigest()


class BodyTransport:
    def __init__(self) -> None:
        self.stopped = False
        self.paused = False

    def stopProducing(self) -> None:
        self.stopped = True

    def pauseProducing(self) -> None:
        self.paused = True

    def resumeProducing(self) -> None:
        self.paused = False


@attrs.define
class FakeResponse:
    length: Any
    code: int = 200
    headers: Headers = attrs.field(factory=Headers)
    protocol: Any = None
    transport: BodyTransport = attrs.field(factory=BodyTransport)

    def deliverBody(self, protocol: Any) -> None:
        self.protocol = protocol
        protocol.makeConnection(self.transport)

    def send(self, data: bytes) -> None:
        for i in range(len(data)):  # one byte at a time
            self.protocol.dataReceived(data[i : i + 1])

    def end(self, exception: BaseException) -> None:
        self.protocol.connectionLost(Failure(exception))


@attrs.define
class FakeClient:
    response: FakeResponse
    read_timeout: float = 5.0

    async def open_file(self, url: str) -> FakeResponse:
        return self.response


@attrs.define
class Harness:
    flight: Flight
    response: FakeResponse
    clock: Clock
    store: MemoryStore
    landed: list[FileRecord | None]
    spool: Path


class ManualRun:
    """
    Stands in for the worker threads: holds each job until the test runs it.
    """

    def __init__(self) -> None:
        self.jobs: list[tuple[Any, tuple[Any, ...], Deferred[Any]]] = []

    def __call__(self, f: Any, *args: Any) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.jobs.append((f, args, d))
        return d

    def step(self, name: str | None = None) -> None:
        """
        Run the oldest job (of the method called C{name}, if given).
        """
        for job in self.jobs:
            if name is None or job[0].__name__ == name:
                self.jobs.remove(job)
                f, args, d = job
                d.callback(f(*args))
                return
        raise AssertionError(f"no {name} job waiting")

    def drain(self, name: str | None = None) -> None:
        while any(name is None or f.__name__ == name for f, _, _ in self.jobs):
            self.step(name)


def harness(
    tmp_path: Path,
    length: Any = len(DATA),
    expected: tuple[str, str] | None = ("sha256", SHA),
    size: int | None = None,
    run: Any = None,
    **options: Any,
) -> Harness:
    """
    A started flight of L{DATA}; C{options} go to its L{FlightTuning}.
    """
    response = FakeResponse(length)
    clock = Clock()
    store = MemoryStore(str(tmp_path))
    landed: list[FileRecord | None] = []
    wanted = Wanted("g/p/p-1.whl", "p-1.whl", "http://u/", "http://u/p-1.whl", expected, size)
    flight = Flight(
        wanted,
        FakeClient(response),  # type: ignore[arg-type]
        store,
        MemoryMetadata(),
        clock,
        tuning=FlightTuning(read_timeout=5.0, run=run or in_thread_now, **options),
    )
    flight.finished().addCallback(landed.append)
    flight.start()
    return Harness(flight, response, clock, store, landed, tmp_path)


def read(flight: Flight, offset: int) -> Any:
    """
    Read through a reader of its own, as a client does; the result, a
    Failure, or None while the read waits.
    """
    reader = flight.reader()
    out: list[Any] = []
    reader.read(offset, 1 << 20).addBoth(out.append)
    if out:
        reader.close()
    return out[0] if out else None


def test_verified_file_is_committed(tmp_path: Path) -> None:
    h = harness(tmp_path)
    client = h.flight.reader()  # a client keeps the spool open past the commit
    h.response.send(DATA)
    # Everything but the last byte is available before verification.
    assert h.flight.readers.readable() == len(DATA) - 1
    assert read(h.flight, 0) == DATA[:-1]
    assert read(h.flight, len(DATA) - 1) is None  # waits
    h.response.end(ResponseDone())
    assert h.flight.verified and h.flight.sha256() == SHA
    assert read(h.flight, len(DATA) - 1) == DATA[-1:]
    (record,) = h.landed
    assert record is not None and record.sha256 == SHA and record.size == len(DATA)
    assert h.store.files[record.store_key] == DATA
    client.close()


def test_what_may_be_sent_from_the_spool_file(tmp_path: Path) -> None:
    """
    A sender from the spool file may send what is in the file: up to the
    end it asks for, the last byte of that end held back until the file is
    verified (as a read holds it), and nothing past the end even then.
    """
    h = harness(tmp_path)
    client = h.flight.reader()
    h.response.send(DATA)
    count, fd = client.sendable(0, 10)
    assert count == 9 and fd >= 0  # the range's last byte waits
    assert os.pread(fd, count, 0) == DATA[:9]
    assert client.sendable(0, len(DATA)) == (len(DATA) - 1, fd)
    assert client.sendable(len(DATA) - 1, len(DATA)) == (0, -1)  # wait: read it once verified
    h.response.end(ResponseDone())
    assert client.sendable(0, 10) == (10, fd)  # verified: the whole range, not the file
    assert client.sendable(5, 10) == (5, fd)
    assert client.sendable(len(DATA) - 1, len(DATA)) == (1, fd)
    client.close()


@pytest.mark.parametrize(
    "send, end, why",
    [
        (DATA[:-1] + b"X", ResponseDone(), "hash"),
        (DATA[:500], ResponseFailed([Failure(ConnectionResetError())]), "connection lost"),
        (DATA[:500], PotentialDataLoss(), "of 1000"),
    ],
)
def test_bad_bodies_fail_and_leave_nothing(tmp_path: Path, send: bytes, end: BaseException, why: str) -> None:
    h = harness(tmp_path)
    h.response.send(send)
    h.response.end(end)
    assert h.flight.failure is not None and why in h.flight.failure.reason
    failure = read(h.flight, 0)
    assert isinstance(failure, Failure) and failure.check(FlightFailed)
    assert h.landed == [None] and h.store.files == {}
    assert list(h.spool.iterdir()) == []


def test_close_delimited_body_needs_a_length_or_a_hash(tmp_path: Path) -> None:
    """
    A body that ends when the connection closes cannot be told from a cut
    one: without a size or a hash to check, it is refused.
    """
    h = harness(tmp_path, length=UNKNOWN_LENGTH, expected=None)
    h.response.send(DATA[:300])
    h.response.end(PotentialDataLoss())
    assert h.flight.failure is not None and h.landed == [None]

    (tmp_path / "checked").mkdir()
    checked = harness(tmp_path / "checked", length=UNKNOWN_LENGTH)
    checked.response.send(DATA)
    checked.response.end(PotentialDataLoss())
    assert checked.flight.verified


def test_more_bytes_than_the_index_said(tmp_path: Path) -> None:
    h = harness(tmp_path, length=UNKNOWN_LENGTH, expected=None, size=100)
    h.response.send(DATA[:101])
    assert h.flight.failure is not None and "more bytes" in h.flight.failure.reason
    assert h.response.transport.stopped  # the rest is not downloaded


def test_stalled_upstream_times_out(tmp_path: Path) -> None:
    """
    The idle timer restarts with every byte; when it runs out the fetch fails
    with 504 and the upstream connection is dropped.
    """
    h = harness(tmp_path)
    h.response.send(DATA[:10])
    h.clock.advance(4)
    h.response.send(DATA[10:20])
    h.clock.advance(4)
    assert h.flight.failure is None
    h.clock.advance(1.5)
    assert h.flight.failure is not None and h.flight.failure.status == 504
    assert h.response.transport.stopped
    assert h.landed == [None] and list(h.spool.iterdir()) == []
    assert h.clock.getDelayedCalls() == []


def full_disk_after(n: int) -> Any:
    """
    A spool writer that fails with ENOSPC once C{n} bytes were written.
    """
    import errno

    written = [0]

    def write(fd: int, data: memoryview) -> int:
        room = n - written[0]
        if room <= 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        chunk = min(room, len(data))
        written[0] += chunk
        return os.write(fd, data[:chunk])

    return write


@pytest.mark.parametrize("room", [300, 310])  # 310: the disk fills in the middle of a chunk
def test_full_disk_still_streams_the_whole_file(room: int, tmp_path: Path) -> None:
    """
    ENOSPC half way: every client still gets the whole, verified file, read
    from the spool and then from memory; nothing is cached; memory held for
    a lagging client is bounded by pausing the upstream.
    """
    h = harness(tmp_path, memory_high=200)
    h.flight.spool.write = full_disk_after(room)
    fast, slow = h.flight.reader(), h.flight.reader()
    got_fast = bytearray()

    def pump(reader: Any, into: bytearray) -> None:
        while True:
            out: list[Any] = []
            d = reader.read(len(into), 1 << 20)
            d.addBoth(out.append)
            if not out:
                d.cancel()  # caught up: stop waiting
                return
            if not out[0]:
                return
            if isinstance(out[0], Failure):
                out[0].raiseException()
            into += out[0]

    for i in range(0, len(DATA), 50):
        h.response.send(DATA[i : i + 50])
        pump(fast, got_fast)
        if h.response.transport.paused:
            break
    # The slow reader has read nothing: the upstream waits for it.
    assert h.response.transport.paused and not h.flight.spool.cacheable
    assert len(h.flight.spool.memory) <= 200 + 50
    got_slow = bytearray()
    pump(slow, got_slow)
    assert not h.response.transport.paused
    h.response.send(DATA[i + 50 :])
    h.response.end(ResponseDone())
    pump(fast, got_fast)
    pump(slow, got_slow)
    assert bytes(got_fast) == bytes(got_slow) == DATA
    assert h.flight.verified and h.landed == [None] and h.store.files == {}
    fast.close()
    slow.close()
    assert list(h.spool.iterdir()) == [] and len(h.flight.spool.memory) == 0


def test_clients_are_not_held_back_by_the_workers(tmp_path: Path) -> None:
    """
    Hashing and spool writes run in worker threads: clients read the bytes
    from memory as they arrive, the last byte waits for the hash only, and
    the file is cached once the spool is written too.
    """
    run = ManualRun()
    h = harness(tmp_path, run=run)
    client = h.flight.reader()
    h.response.send(DATA)
    assert h.flight.spool.spooled == 0 and read(h.flight, 0) == DATA[:1]  # from memory, chunk by chunk
    assert read(h.flight, len(DATA) - 2) == DATA[-2:-1]
    h.response.end(ResponseDone())
    assert not h.flight.verified and read(h.flight, len(DATA) - 1) is None
    run.drain("_hash")
    assert h.flight.verified and read(h.flight, len(DATA) - 1) == DATA[-1:]
    assert h.landed == []  # the spool is still being written
    run.drain("_spool")
    (record,) = h.landed
    assert record is not None and h.store.files[record.store_key] == DATA
    assert len(h.flight.spool.memory) == 0
    client.close()


def test_upstream_waits_for_a_lagging_hash(tmp_path: Path) -> None:
    """
    The upstream is paused while the hashing worker is behind by more than
    QUEUE_HIGH bytes, and resumed once it caught up.
    """
    run = ManualRun()
    h = harness(tmp_path, run=run, queue_high=100)
    h.response.send(DATA[:50])
    assert not h.response.transport.paused
    h.response.send(DATA[50:300])
    assert h.response.transport.paused
    run.drain("_hash")
    assert not h.response.transport.paused
    h.response.send(DATA[300:])
    h.response.end(ResponseDone())
    run.drain()
    assert h.flight.verified and len(h.landed) == 1


def test_failure_while_the_spool_is_written(tmp_path: Path) -> None:
    """
    A download that fails while a worker writes its spool keeps the spool's
    descriptor open until that write returns, then cleans up: nothing is
    cached and no descriptor leaks.
    """
    run = ManualRun()
    h = harness(tmp_path, run=run)
    h.response.send(DATA[:500])
    spool = h.flight.spool.write_fd
    assert spool is not None
    fd = spool.fd
    h.clock.advance(6)  # the upstream stalls
    assert h.flight.failure is not None and spool.fd == fd
    os.fstat(fd)  # still open for the worker
    run.drain()
    assert spool.fd == -1 and h.landed == [None] and h.store.files == {}
    with pytest.raises(OSError):
        os.fstat(fd)
    assert list(h.spool.iterdir()) == []


def test_chunks() -> None:
    chunks = Chunks()
    for part in (b"abc", b"defg", b"hi"):
        chunks.append(part)
    assert len(chunks) == 9 and chunks.read(4, 10) == b"efg" and chunks.read(9, 1) == b""
    chunks.drop_before(5)
    assert (chunks.start, len(chunks), chunks.read(5, 10)) == (5, 4, b"fg")
    chunks.drop_before(9)
    assert (chunks.start, len(chunks)) == (9, 0)


def test_a_stuck_client_is_cut_off_while_the_disk_is_full(tmp_path: Path) -> None:
    """
    With the disk full, a client that reads nothing for a whole read
    timeout while it holds the memory window back is cut off; the upstream
    resumes and the others get the whole file.
    """
    h = harness(tmp_path, memory_high=200)
    h.flight.spool.write = full_disk_after(0)
    fast, stuck = h.flight.reader(), h.flight.reader()
    cut: list[bool] = []
    stuck.on_cut = lambda: cut.append(True)
    got = bytearray()
    h.response.send(DATA[:300])
    assert h.response.transport.paused
    got += read_all(fast, len(got))
    h.clock.advance(4.9)
    assert h.response.transport.paused and not cut  # not yet: the timeout is 5 s
    h.clock.advance(0.2)
    assert cut == [True] and not h.response.transport.paused
    failed = []
    stuck.read(0, 10).addErrback(failed.append)
    assert failed and failed[0].check(FlightFailed)
    h.response.send(DATA[300:])
    h.response.end(ResponseDone())
    got += read_all(fast, len(got))
    assert bytes(got) == DATA and h.flight.verified
    fast.close()
    assert h.clock.getDelayedCalls() == []


def read_all(reader: Any, offset: int) -> bytes:
    """
    Read what a reader can have without waiting.
    """
    got = bytearray()
    while True:
        out: list[Any] = []
        d = reader.read(offset + len(got), 1 << 20)
        d.addBoth(out.append)
        if not out:
            d.cancel()
            return bytes(got)
        if not out[0]:
            return bytes(got)
        got += out[0]

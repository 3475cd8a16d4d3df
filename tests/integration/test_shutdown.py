"""
Shutdown leaves nothing behind: the drain waits on the downloads without
cancelling what is not its own (no "Unhandled error"), stops the ones still
running past the grace and waits for those that are landing; a commit that
never got its record (the process killed, or its metadata store closed
under it) is found by the commit journal at the next start, and its object
removed.
"""

from __future__ import annotations

import gc
import json
import os
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred
from twisted.logger import LogEvent, globalLogPublisher

from tests.fetch.test_flight import DATA, ManualRun, harness
from tests.integration.test_proxy import find
from tests.web.test_file_answers import world
from txpypi.cache.files import FileCache
from txpypi.fetch.commit import CommitJournal
from txpypi.storage.memory import MemoryStore
from txpypi.storage.metadata import FileRecord, MemoryMetadata
from txpypi.testing import Dist

BIG = "big-1.0-py3-none-any.whl"
GAMMA = "gamma-0.5-py3-none-any.whl"
ALPHA = "alpha-1.0-py3-none-any.whl"


def test_the_drain_stops_what_is_left_and_logs_no_unhandled_error(tmp_path: Path, dists: list[Dist]) -> None:
    w = world(tmp_path, dists)
    w.fake.holds[BIG] = Deferred()  # half the body, then nothing
    request, channel = w.get(f"/files/big/{BIG}")
    assert not request.finished
    flight = w.files.downloads.flights[w.files.key("big", BIG)]
    clock = w.files._clock
    logged: list[LogEvent] = []
    globalLogPublisher.addObserver(logged.append)
    try:
        drained = Deferred.fromCoroutine(w.files.drain(1.0, w.senders))
        assert not drained.called
        clock.advance(1.0)  # type: ignore[attr-defined]
        assert drained.called  # nothing is left to wait for
        assert flight.failure is not None and "shutting down" in flight.failure.reason
        assert flight.done and not w.files.downloads.flights and w.files._records == {}
        del drained
        gc.collect()
    finally:
        globalLogPublisher.removeObserver(logged.append)
    unhandled = [e for e in logged if "Unhandled error" in str(e.get("log_format", "")) or e.get("isError")]
    assert unhandled == []
    assert channel.transport.written.getvalue()  # it had part of the body...
    assert not channel.transport.written.getvalue().endswith(find(dists, BIG).content)  # ...never all


def test_the_drain_waits_for_a_download_that_is_landing(tmp_path: Path) -> None:
    """
    A download verified at the end of the grace is not stopped: it lands,
    and the drain ends only once it has.
    """
    run = ManualRun()
    h = harness(tmp_path, run=run)
    h.response.send(DATA)
    h.response.end(__import__("twisted.web.client", fromlist=["ResponseDone"]).ResponseDone())
    files = FileCache(h.clock, None, h.store, MemoryMetadata(), None)  # type: ignore[arg-type]
    files.downloads.flights[h.flight.wanted.key] = h.flight
    drained = Deferred.fromCoroutine(files.drain(0.0, set()))
    h.clock.advance(0)
    assert h.flight.failure is None and not drained.called  # all its bytes came: not stopped
    run.drain()  # the hash catches up, the spool is written
    assert h.landed and h.landed[0] is not None
    assert drained.called


def _marker(journal: CommitJournal, record: FileRecord, owner: str) -> str:
    """
    A marker for C{record} as the process C{owner} left it.
    """
    path = journal.begin(record)
    moved = os.path.join(journal.directory, f"{owner}-{record.sha256}-1.json")
    os.rename(path, moved)
    return moved


def test_start_up_removes_objects_whose_commit_never_finished(tmp_path: Path) -> None:
    store = MemoryStore(str(tmp_path))
    metadata = MemoryMetadata()
    journal = CommitJournal(str(tmp_path / "commits"))
    files = FileCache(None, None, store, metadata, None, journal=journal)  # type: ignore[arg-type]
    orphan = FileRecord("default/a/a-1.whl", "u", "u/a-1.whl", "aa" * 32, 3, "aa/x/a-1.whl", 1.0)
    landed = FileRecord("default/b/b-1.whl", "u", "u/b-1.whl", "bb" * 32, 3, "bb/x/b-1.whl", 1.0)
    mine = FileRecord("default/c/c-1.whl", "u", "u/c-1.whl", "cc" * 32, 3, "cc/x/c-1.whl", 1.0)
    for record in (orphan, landed, mine):
        store.files[record.store_key] = b"abc"
    metadata.files[landed.key] = landed
    _marker(journal, orphan, "dead")  # left by a process that died
    _marker(journal, landed, "dead")
    ours = _marker(journal, mine, journal.owner)  # a commit of this process, in progress
    with open(os.path.join(journal.directory, ".half-written.json"), "w") as f:
        f.write('{"key": ')  # one being written right now: not touched
    out: list[Any] = []
    Deferred.fromCoroutine(files.recover_commits()).addBoth(out.append)
    assert out == [None]
    assert orphan.store_key not in store.files  # removed: nothing recorded it
    assert landed.store_key in store.files and mine.store_key in store.files
    assert sorted(os.listdir(journal.directory)) == [".half-written.json", os.path.basename(ours)]


def test_a_commit_whose_record_and_cleanup_both_fail_leaves_its_marker(tmp_path: Path) -> None:
    """
    The metadata store refuses the record (it was closed under the commit)
    and the object cannot be removed either: the marker stays, and the next
    start removes the object.
    """

    class Closed(MemoryMetadata):
        def put_file(self, record: FileRecord) -> Deferred[FileRecord | None]:
            raise RuntimeError("the database is closed")

    class Stuck(MemoryStore):
        def delete(self, key: str) -> Deferred[None]:
            raise RuntimeError("cannot delete now")

    store = Stuck(str(tmp_path))
    h = harness(tmp_path)
    h.flight._store = store
    h.flight._metadata = Closed()
    journal = CommitJournal(str(tmp_path / "commits"))
    h.flight.journal = journal
    h.response.send(DATA)
    h.response.end(__import__("twisted.web.client", fromlist=["ResponseDone"]).ResponseDone())
    assert h.landed == [None] and len(store.files) == 1
    [marker] = os.listdir(journal.directory)
    entry = json.loads((Path(journal.directory) / marker).read_text())
    os.rename(Path(journal.directory) / marker, Path(journal.directory) / "dead-1-1.json")  # a dead process's
    restarted = FileCache(None, None, MemoryStore(str(tmp_path)), MemoryMetadata(), None, journal=journal)  # type: ignore[arg-type]
    restarted._store.files.update(store.files)  # type: ignore[attr-defined]
    Deferred.fromCoroutine(restarted.recover_commits())
    assert entry["store_key"] not in restarted._store.files  # type: ignore[attr-defined]
    assert os.listdir(journal.directory) == []


def test_at_shutdown_no_download_starts_and_stopped_ones_are_waited_for(
    tmp_path: Path, dists: list[Dist]
) -> None:
    """
    A request waiting for a download slot at shutdown gets 503 (stopping
    the running download frees a slot: it must not start a new one), a new
    request for a file not downloading yet gets 503, and the drain ends only
    once the stopped download has cleaned up after itself.
    """
    w = world(tmp_path, dists)
    w.files.downloads.slots.limit = 1
    w.fake.holds[BIG] = Deferred()
    running, _ = w.get(f"/files/big/{BIG}")
    queued, _ = w.get(f"/files/gamma/{GAMMA}")
    flight = w.files.downloads.flights[w.files.key("big", BIG)]
    aborted: Deferred[None] = Deferred()

    class Upload:
        sent = 0

        def spooled(self, length: int) -> None:
            pass

        def abort(self) -> Deferred[None]:
            return aborted

    flight.upload = Upload()  # type: ignore[assignment]
    drained = Deferred.fromCoroutine(w.files.drain(1.0, w.senders))
    assert queued.finished and queued.code == 503  # refused at once: no slot for it any more
    late, _ = w.get(f"/files/alpha/{ALPHA}")
    assert late.finished and late.code == 503
    w.files._clock.advance(1.0)  # type: ignore[attr-defined]
    assert flight.failure is not None and not w.files.downloads.flights  # stopped, nothing new started
    assert w.fake.requests["/packages/" + GAMMA] == 0 and w.fake.requests["/packages/" + ALPHA] == 0
    assert not drained.called  # its upload is still being aborted
    aborted.callback(None)
    assert drained.called

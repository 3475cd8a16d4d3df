"""
No wrong byte, and no wrong count: the spool descriptor's one owner, files
served only while their index lists them, S3 reads that fail or ignore
Range, and the cache's size and count under every interleaving of opens,
purges, evictions and landings.
"""

from __future__ import annotations

import errno
import os
import tempfile
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred, succeed
from twisted.internet.testing import MemoryReactorClock
from twisted.web.client import ResponseDone
from zope.interface import implementer

from tests.conftest import Served, get_reactor, listen
from tests.fetch.test_flight import DATA, ManualRun, harness
from tests.integration.test_outages import Events, events, outage_line  # noqa: F401  (fixture)
from tests.integration.test_proxy import cached_files, find, header
from tests.s3faults import FaultyS3
from tests.servers import S3
from tests.storage.test_stores import s3_settings
from tests.web.test_file_answers import fetch
from txpypi.cache.files import FileCache
from txpypi.cache.pages import PageCache
from txpypi.fetch import punch as punching
from txpypi.fetch.punch import PunchPolicy
from txpypi.fetch.upstream import Upstream, UpstreamClient
from txpypi.storage.memory import MemoryStore
from txpypi.storage.metadata import FileRecord, MemoryMetadata
from txpypi.storage.s3 import check_range
from txpypi.storage.stores import IUpload
from txpypi.testing import Dist, FakeUpstream, build_wheel

GAMMA = "gamma-0.5-py3-none-any.whl"
BIG = "big-1.0-py3-none-any.whl"


# -- the spool descriptor has one owner


class FailableRun(ManualRun):
    """
    Worker threads by hand, where a job may fail.
    """

    def step(self, name: str | None = None) -> None:
        for job in self.jobs:
            if name is None or job[0].__name__ == name:
                self.jobs.remove(job)
                f, args, d = job
                try:
                    result = f(*args)
                except Exception:
                    d.errback()
                else:
                    d.callback(result)
                return
        raise AssertionError(f"no {name} job waiting")


@implementer(IUpload)
@attrs.define
class HeldUpload:
    """
    An upload that has everything spooled at once (so the spool's prefix
    may be freed), and completes when asked.
    """

    sent: int = 1 << 40

    def spooled(self, length: int) -> None:
        pass

    def wait_sent(self, length: int) -> Deferred[None]:
        return succeed(None)

    def complete(self, length: int) -> Deferred[None]:
        return succeed(None)

    def abort(self) -> Deferred[None]:
        return succeed(None)


def test_a_queued_punch_runs_on_its_own_spool_after_a_write_fails(tmp_path: Path) -> None:
    """
    A spool write fails while a hole punch is queued on the same
    descriptor: the descriptor stays open until the punch has run, so the
    punch frees part of this spool -- not whatever file the number would
    otherwise have been reused for (another download's spool, whose
    clients would read zeros, or the database).
    """
    punched: list[tuple[int, int]] = []

    def punch(fd: int, offset: int, length: int) -> None:
        punched.append((os.fstat(fd).st_ino, offset))

    run = ManualRun()
    h = harness(tmp_path, run=run, punch=punch, punch_policy=PunchPolicy(min_size=100, step=100))
    h.flight.upload = HeldUpload()
    spool_inode = os.stat(h.flight.spool.path).st_ino
    h.response.send(DATA[:300])
    run.drain("_spool")  # spooled: a punch of the first 300 bytes is queued
    assert [f.__name__ for f, _, _ in run.jobs].count("punch") == 1

    def full(fd: int, data: memoryview) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    h.flight.spool.write = full
    h.response.send(DATA[300:400])
    run.drain("_spool")  # the disk is full: the spool is given up
    decoy = os.open(tmp_path / "decoy", os.O_RDWR | os.O_CREAT)  # would take a freed number
    try:
        run.drain("punch")
        assert punched == [(spool_inode, 0)]
    finally:
        os.close(decoy)
    run.drain()
    h.response.send(DATA[400:])
    h.response.end(ResponseDone())
    run.drain()
    assert h.flight.verified and h.landed == [None]  # served, not cached


def test_a_failing_punch_stops_punching_for_that_file_only(tmp_path: Path) -> None:
    def cannot(fd: int, offset: int, length: int) -> None:
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    (tmp_path / "1").mkdir()
    (tmp_path / "2").mkdir()
    policy = PunchPolicy(min_size=100, step=100)
    one = harness(tmp_path / "1", run=FailableRun(), punch=cannot, punch_policy=policy)
    two = harness(tmp_path / "2", run=FailableRun(), punch_policy=policy)
    default = two.flight.puncher.punch
    assert default is not None
    assert one.flight.puncher.punch is cannot
    one.flight.upload = HeldUpload()
    one.response.send(DATA[:300])
    run = one.flight.tuning.run
    assert isinstance(run, FailableRun)
    run.drain()
    assert one.flight.puncher.punch is None
    assert two.flight.puncher.punch is default and punching.PUNCH_HOLE is default


# -- a hit only while the index lists it


@pytest_twisted.ensureDeferred
async def test_a_delisted_file_is_no_longer_served(
    json_upstream: Served, proxy_factory: Any, tmp_path: Path, dists: list[Dist]
) -> None:
    """
    The upstream removes a file (a malicious release, say): the next request
    gets 404 and the cached copy is dropped, record and bytes.  While the
    upstream fails, the stale page still vouches for what it lists.
    """
    fake = json_upstream.fake
    running = proxy_factory(json_upstream.url, tmp_path / "cache", index_ttl=0.0)
    files = running.proxy.files
    url = f"{running.url}/files/gamma/{GAMMA}"
    response, body = await fetch(url)
    assert response.code == 200 and body == find(dists, GAMMA).content
    await files.wait_idle()
    response, _ = await fetch(url)
    assert header(response, "x-cache") == "HIT"

    fake.page_faults["gamma"] = "500"  # the upstream fails: the stale page lists it
    response, _ = await fetch(url)
    assert response.code == 200 and header(response, "x-cache") == "HIT"
    del fake.page_faults["gamma"]

    kept = [d for d in fake.dists["gamma"] if d.filename != GAMMA]
    fake.dists["gamma"] = kept  # delisted
    response, body = await fetch(url)
    assert response.code == 404
    assert await files._metadata.get_file(files.key("gamma", GAMMA)) is None
    assert not [p for p in cached_files(running) if p.name == GAMMA]
    assert fake.requests["/packages/" + GAMMA] == 1


@pytest_twisted.ensureDeferred
async def test_a_file_of_a_project_gone_upstream_is_dropped(
    json_upstream: Served, proxy_factory: Any, tmp_path: Path
) -> None:
    fake = json_upstream.fake
    running = proxy_factory(json_upstream.url, tmp_path / "cache", index_ttl=0.0)
    files = running.proxy.files
    url = f"{running.url}/files/gamma/{GAMMA}"
    await fetch(url)
    await files.wait_idle()
    del fake.dists["gamma"]
    response, _ = await fetch(url)
    assert response.code == 404
    assert await files._metadata.get_file(files.key("gamma", GAMMA)) is None
    assert files.usage.count == 0 and files.usage.size == 0


# -- S3 reads that fail, or ignore Range


@pytest.fixture
def faulty_s3(s3_bucket: S3) -> Any:
    """
    The test's corner of the S3 bucket, through a fault injector.
    """
    faults = FaultyS3(get_reactor(), s3_bucket.endpoint)
    from twisted.web.server import Site

    port = listen(Site(faults))
    bucket = S3(f"http://127.0.0.1:{port.getHost().port}", s3_bucket.bucket, s3_bucket.prefix)
    yield faults, bucket
    pytest_twisted.blockon(port.stopListening())
    pytest_twisted.blockon(faults.close())


@pytest_twisted.ensureDeferred
async def test_s3_failing_reads_fall_back_to_the_upstream_and_the_probe_reads(
    json_upstream: Served,
    proxy_factory: Any,
    tmp_path: Path,
    faulty_s3: Any,
    events: Events,  # noqa: F811
    dists: list[Dist],
) -> None:
    """
    S3 answers 500 to every read while its gateway is up (HEAD works): the
    first GET of a cached file is served whole from the upstream, not cut
    off; the outage is told once and does not flap "back" while reads still
    fail, because the probe reads a known object; once reads work again the
    store is back and the file a hit, its record kept all along.
    """
    faults, bucket = faulty_s3
    running = proxy_factory(json_upstream.url, tmp_path / "cache", **s3_settings(bucket, s3_timeout=2.0))
    files = running.proxy.files
    data = find(dists, GAMMA).content
    url = f"{running.url}/files/gamma/{GAMMA}"
    response, body = await fetch(url)
    assert body == data
    await files.wait_idle()
    response, body = await fetch(url)
    assert header(response, "x-cache") == "HIT" and body == data

    faults.fail_reads = True
    response, body = await fetch(url)
    assert response.code == 200 and body == data and header(response, "x-cache") == "MISS"
    await events.wait(outage_line("files", "failing"))
    await faults.next_read("txpypi-probe/ok")  # a probe, while reads fail
    await faults.next_read("txpypi-probe/ok")  # and the next: it was told to wait again
    assert events.count(outage_line("files", "back")) == 0
    response, body = await fetch(url)
    assert response.code == 200 and body == data
    await files.wait_idle()
    assert await files._metadata.get_file(files.key("gamma", GAMMA)) is not None

    faults.fail_reads = False
    await events.wait(outage_line("files", "back"))
    response, body = await fetch(url)
    assert header(response, "x-cache") == "HIT" and body == data
    assert events.count(outage_line("files", "failing")) == 1
    assert events.count(outage_line("files", "back")) == 1


@pytest_twisted.ensureDeferred
async def test_an_s3_gateway_that_ignores_range_never_gives_wrong_bytes(
    json_upstream: Served,
    proxy_factory: Any,
    tmp_path: Path,
    faulty_s3: Any,
    events: Events,  # noqa: F811
    dists: list[Dist],
) -> None:
    """
    A gateway that answers every read with the whole object (200, from
    offset 0): a whole file is read from that one body, right; a range is
    refused, never taken for the bytes asked for, and comes right from the
    upstream; the store is then down, and its probe (a ranged read too)
    keeps it down rather than bringing it "back" after every read.
    """
    faults, bucket = faulty_s3
    running = proxy_factory(json_upstream.url, tmp_path / "cache", **s3_settings(bucket, s3_timeout=2.0))
    files = running.proxy.files
    data, big = find(dists, GAMMA).content, find(dists, BIG).content
    url = f"{running.url}/files/gamma/{GAMMA}"
    big_url = f"{running.url}/files/big/{BIG}"
    await fetch(url)
    await fetch(big_url)
    await files.wait_idle()
    faults.ignore_range = True

    store = files._store.inner
    record = await files._metadata.get_file(files.key("gamma", GAMMA))
    reader = await store.open(record.store_key)
    try:
        with pytest.raises(OSError, match="200"):
            await reader.read(100, 100)
    finally:
        reader.close()

    response, body = await fetch(big_url)  # many chunks, one whole body
    assert response.code == 200 and header(response, "x-cache") == "HIT" and body == big
    response, body = await fetch(url, {b"Range": [b"bytes=100-199"]})
    assert response.code == 206 and body == data[100:200]
    await events.wait(outage_line("files", "failing"))
    await faults.next_read("txpypi-probe/ok")
    await faults.next_read("txpypi-probe/ok")
    assert events.count(outage_line("files", "back")) == 0


def test_check_range() -> None:
    ok = {"ResponseMetadata": {"HTTPStatusCode": 206}, "ContentRange": "bytes 10-19/100"}
    check_range(ok, 10, 19)
    check_range({"ResponseMetadata": {"HTTPStatusCode": 200}}, 0, 99)
    for answer, first, last in [
        ({"ResponseMetadata": {"HTTPStatusCode": 200}}, 10, 19),
        ({"ResponseMetadata": {"HTTPStatusCode": 206}, "ContentRange": "bytes 0-9/100"}, 10, 19),
        ({"ResponseMetadata": {"HTTPStatusCode": 206}}, 10, 19),
        ({"ResponseMetadata": {"HTTPStatusCode": 500}}, 0, 9),
    ]:
        with pytest.raises(OSError):
            check_range(answer, first, last)


# -- the size and count stay exact


class HandMetadata(MemoryMetadata):
    """
    Memory metadata whose file calls wait until the test runs them, one at
    a time, in the order it chooses: each runs atomically when it is run.
    """

    def __init__(self) -> None:
        super().__init__()
        self.pending: list[tuple[str, Any, Deferred[Any]]] = []
        self.hand = False

    def _later(self, name: str, f: Any, *args: Any) -> Deferred[Any]:
        if not self.hand:
            d: Deferred[Any] = f(*args)
            return d
        waiter: Deferred[Any] = Deferred()
        self.pending.append((name, lambda: f(*args), waiter))
        return waiter

    def run(self, i: int) -> None:
        _, call, waiter = self.pending.pop(i)
        call().chainDeferred(waiter)

    def get_file(self, key: str) -> Deferred[FileRecord | None]:
        return self._later("get_file", super().get_file, key)

    def put_file(self, record: FileRecord) -> Deferred[FileRecord | None]:
        return self._later("put_file", super().put_file, record)

    def delete_file(self, key: str, expected: FileRecord | None = None) -> Deferred[FileRecord | None]:
        return self._later("delete_file", super().delete_file, key, expected)

    def least_recent(self, limit: int) -> Deferred[list[FileRecord]]:
        return self._later("least_recent", super().least_recent, limit)


def accounting_world(directory: Path) -> tuple[FileCache, HandMetadata, MemoryStore, FakeUpstream]:
    wheel = build_wheel("gamma", "0.5")
    fake = FakeUpstream([wheel])
    reactor = MemoryReactorClock()
    client = UpstreamClient(reactor, agent=RequestTraversalAgent(fake))
    metadata = HandMetadata()
    pages = PageCache(reactor, client, metadata, Upstream("test", "http://upstream.test/simple/"))
    store = MemoryStore(str(directory))
    files = FileCache(reactor, client, store, metadata, pages)
    return files, metadata, store, fake


def _result(d: Deferred[Any]) -> Any:
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "did not complete"
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


@given(st.data())
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_size_and_count_stay_exact_under_every_interleaving(data: st.DataObject) -> None:
    """
    One cached file; at once: an open that finds its bytes gone, a purge,
    an eviction, and a new landing of the same file (fetched again).  The
    metadata store runs their calls in an order hypothesis picks; whatever
    it is, the cache's size and count end equal to what the store holds.
    """
    with tempfile.TemporaryDirectory() as directory:
        files, metadata, store, fake = accounting_world(Path(directory))
        wheel = fake.dists["gamma"][0]
        opened = _result(Deferred.fromCoroutine(files.open("gamma", wheel.filename)))
        assert opened.source is not None
        opened.source.close()
        _result(Deferred.fromCoroutine(files.load_usage()))
        assert (files.usage.size, files.usage.count) == (len(wheel.content), 1)

        metadata.hand = True
        files._records.clear()  # as after a restart: the record is read from the store
        if data.draw(st.booleans(), label="bytes gone"):
            store.files.clear()
        work: list[Deferred[Any]] = []

        async def open_and_close() -> None:
            got = await files.open("gamma", wheel.filename)
            if got.source is not None:
                got.source.close()

        async def refetch() -> None:
            got = await files.open("gamma", wheel.filename, use_store=False)
            if got.source is not None:
                got.source.close()

        chosen = data.draw(
            st.lists(
                st.sampled_from(["open", "purge", "evict", "refetch"]), min_size=1, max_size=4, unique=True
            ),
            label="operations",
        )
        for name in chosen:
            if name == "open":
                work.append(Deferred.fromCoroutine(open_and_close()))
            elif name == "purge":
                work.append(Deferred.fromCoroutine(files.purge("gamma", wheel.filename)))
            elif name == "evict":
                files.usage.max_size = 1
                files.maybe_evict()
            else:
                work.append(Deferred.fromCoroutine(refetch()))
        steps = 0
        while metadata.pending:
            steps += 1
            assert steps < 200, "no end"
            metadata.run(data.draw(st.integers(0, len(metadata.pending) - 1), label="next call"))
        for d in work:
            d.addErrback(lambda f: None)  # a refused open is fine; a wrong count is not
        recorded = list(metadata.files.values())
        assert files.usage.size == sum(r.size for r in recorded)
        assert files.usage.count == len(recorded)


def test_a_file_recorded_again_is_counted_once(tmp_path: Path) -> None:
    """
    A file whose record was kept through a store outage and that is then
    fetched and recorded again replaces its record: counted once.
    """
    files, metadata, store, fake = accounting_world(tmp_path)
    wheel = fake.dists["gamma"][0]
    agent = files._client._agent
    assert isinstance(agent, RequestTraversalAgent)
    _result(Deferred.fromCoroutine(files.load_usage()))
    for _ in range(3):
        rest: Deferred[None] = Deferred()
        fake.holds[wheel.filename] = rest  # a download takes time
        opening = Deferred.fromCoroutine(files.open("gamma", wheel.filename, use_store=False))
        rest.callback(None)
        agent.flush()
        _result(opening).source.close()
    assert (files.usage.size, files.usage.count) == (len(wheel.content), 1)
    assert list(store.files.values()) == [wheel.content]

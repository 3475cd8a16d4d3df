"""
Deterministic unit tests with Twisted's test doubles: index freshness on a
L{Clock}, the client sender's back-pressure on a real L{Request} over a
L{DummyChannel}, and the metadata stores' shared contract.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.python.threadpool import ThreadPool
from twisted.web.server import Request
from twisted.web.test.requesthelper import DummyChannel
from zope.interface.verify import verifyObject

from tests.conftest import get_reactor
from txpypi.cache.pages import PageCache
from txpypi.fetch.upstream import Upstream, UpstreamClient
from txpypi.storage.metadata import FileRecord, IMetadata, MemoryMetadata, PageRecord, SqliteMetadata
from txpypi.testing import FakeUpstream, build_wheel
from txpypi.web.sender import CHUNK, Sender


def page_cache(fake: FakeUpstream, clock: Clock, metadata: IMetadata) -> PageCache:
    client = UpstreamClient(clock, agent=RequestTraversalAgent(fake))
    return PageCache(clock, client, metadata, Upstream("test", "http://upstream.test/simple"), ttl=600)


def result(d: Any) -> Any:
    out: list[Any] = []
    Deferred.fromCoroutine(d).addBoth(out.append)
    assert out, "did not complete synchronously"
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


def test_page_freshness_follows_the_clock() -> None:
    """
    A page is a hit until C{index-ttl} seconds passed, then fetched again.
    """
    fake = FakeUpstream([build_wheel("alpha", "1.0")])
    clock = Clock()
    pages = page_cache(fake, clock, MemoryMetadata())
    page, state = result(pages.get("alpha"))
    assert state == "MISS" and fake.requests["/simple/alpha/"] == 1
    assert pages.remaining(page) == 600
    clock.advance(599)
    assert result(pages.get("alpha"))[1] == "HIT"
    assert pages.remaining(page) == 1
    clock.advance(2)
    assert pages.fresh("alpha") is None
    again, state = result(pages.get("alpha"))
    assert state == "MISS" and again is not page and fake.requests["/simple/alpha/"] == 2


def test_stored_pages_are_used_after_a_restart() -> None:
    fake = FakeUpstream([build_wheel("alpha", "1.0")])
    clock = Clock()
    metadata = MemoryMetadata()
    result(page_cache(fake, clock, metadata).get("alpha"))
    clock.advance(100)
    fresh_process = page_cache(fake, clock, metadata)
    page, state = result(fresh_process.get("alpha"))
    assert state == "HIT" and fresh_process.remaining(page) == 500
    assert fake.requests["/simple/alpha/"] == 1


class _Source:
    """
    A byte source that can be told when to have more bytes.
    """

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.available = 0
        self.waiting: Deferred[bytes] | None = None
        self.closed = False
        self.size: int | None = len(data)

    def read(self, offset: int, length: int) -> Deferred[bytes]:
        if offset < self.available:
            return succeed(self.data[offset : min(self.available, offset + length)])
        if offset >= len(self.data):
            return succeed(b"")
        self.waiting = Deferred()
        self._offset, self._length = offset, length
        return self.waiting

    def more(self, n: int) -> None:
        self.available = min(len(self.data), self.available + n)
        waiting, self.waiting = self.waiting, None
        if waiting is not None:
            waiting.callback(self.data[self._offset : min(self.available, self._offset + self._length)])

    def close(self) -> None:
        self.closed = True


def _request() -> tuple[Request, Any]:
    channel = DummyChannel()
    request = Request(channel, False)
    request.method = b"GET"
    request.clientproto = b"HTTP/1.1"
    return request, channel.transport


def test_sender_honours_back_pressure() -> None:
    """
    While the client's transport has paused us, no more bytes are read or
    written; on resume they flow again, and the request finishes at the end.
    """
    data = bytes(range(256)) * (3 * CHUNK // 256)
    source = _Source(data)
    request, transport = _request()
    request.setHeader(b"content-length", b"%d" % len(data))
    sender = Sender(request, source)
    done = sender.start()
    assert sender.sent == 0 and source.waiting is not None
    source.more(CHUNK)
    assert sender.sent == CHUNK
    sender.pauseProducing()
    source.more(2 * CHUNK)  # answers the pending read
    assert sender.sent == 2 * CHUNK
    written = len(transport.written.getvalue())
    source.more(0)
    assert sender.sent == 2 * CHUNK and len(transport.written.getvalue()) == written
    sender.resumeProducing()
    assert sender.sent == 3 * CHUNK
    assert done.called and request.finished and source.closed
    assert transport.written.getvalue().endswith(b"\r\n\r\n" + data)


def test_sender_stops_when_the_client_leaves() -> None:
    source = _Source(b"x" * 10)
    request, _ = _request()
    sender = Sender(request, source)
    done = sender.start()
    pending = source.waiting
    sender.stopProducing()
    assert pending is not None and pending.called  # cancelled
    assert done.called and source.closed and not request.finished


# -- one contract for every metadata store


@pytest.fixture(params=["memory", "sqlite", "redis"])
def metadata(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    if request.param == "memory":
        yield MemoryMetadata()
        return
    if request.param == "redis":
        from txpypi.storage.redismeta import RedisMetadata, connect

        server = request.getfixturevalue("redis_server")
        redis = RedisMetadata(connect(server.url), clock=get_reactor())
        yield redis
        pytest_twisted.blockon(redis.close())
        return
    from twisted.internet import reactor

    pool = ThreadPool(1, 1)
    pool.start()
    store = SqliteMetadata(tmp_path / "m.sqlite", pool, reactor)
    yield store
    pytest_twisted.blockon(store.close())
    pool.stop()


@pytest.mark.usefixtures("metadata")
class TestMetadataContract:
    @pytest.fixture(autouse=True)
    def _store(self, metadata: Any) -> None:
        self.store = metadata

    def test_interface(self) -> None:
        assert verifyObject(IMetadata, self.store)

    async def _round_trip(self) -> None:
        page = PageRecord("g/simple/a/", "up", "http://u/a/", b'{"x": 1}', 12.5, '"etag"', None)
        assert await self.store.get_page(page.key) is None
        await self.store.put_page(page)
        assert await self.store.get_page(page.key) == page
        newer = PageRecord(page.key, "up", page.url, b"{}", 13.0)
        await self.store.put_page(newer)
        assert await self.store.get_page(page.key) == newer
        record = FileRecord("g/a/a-1.whl", "up", "http://u/a-1.whl", "ab" * 32, 10, "ab/x/a-1.whl", 1.0)
        assert await self.store.get_file(record.key) is None
        await self.store.put_file(record)
        assert await self.store.get_file(record.key) == record
        await self.store.delete_file(record.key)
        assert await self.store.get_file(record.key) is None

    async def _lru(self) -> None:
        a = FileRecord("g/a/a-1.whl", "up", "u", "aa" * 32, 10, "k/a", 1.0)
        b = FileRecord("g/b/b-1.whl", "up", "u", "bb" * 32, 20, "k/b", 2.0)
        c = FileRecord("g/c/c-1.whl", "up", "u", "cc" * 32, 30, "k/c", 3.0)
        for r in (a, b, c):
            await self.store.put_file(r)
        assert await self.store.usage() == (60, 3)
        assert await self.store.least_recent(2) == [a, b]
        await self.store.touch_files({a.key: 5.0, "g/gone/x.whl": 9.0})
        assert await self.store.least_recent(3) == [b, c, a]
        await self.store.delete_file(b.key)
        assert await self.store.usage() == (40, 2)
        await self.store.touch_page("g/simple/nothing/", 1.0)  # no such page: no error

    @pytest_twisted.ensureDeferred
    async def test_access_times_and_usage(self) -> None:
        await self._lru()

    @pytest_twisted.ensureDeferred
    async def test_download_counts(self) -> None:
        await self.store.add_downloads({("a", "1.0", "a-1.0.whl"): 2, ("b", "2.0", "b-2.0.tar.gz"): 1})
        await self.store.add_downloads({("a", "1.1", "a-1.1.whl"): 3})
        assert await self.store.top_projects(10) == [("a", 5), ("b", 1)]
        assert await self.store.top_projects(1) == [("a", 5)]
        assert await self.store.project_downloads("a") == [("1.0", "a-1.0.whl", 2), ("1.1", "a-1.1.whl", 3)]
        assert await self.store.project_downloads("zzz") == []
        await self.store.ping()

    @pytest_twisted.ensureDeferred
    async def test_round_trip(self) -> None:
        await self._round_trip()

    @pytest_twisted.ensureDeferred
    async def test_replacing_and_deleting_say_what_they_changed(self) -> None:
        """
        put_file gives the record it replaced; delete_file gives the record
        it deleted, and with an expected record deletes only that landing
        of the file (same sha256, same time of caching, whatever the float).
        """
        for cached_at in (1.0, 0.1 + 0.2, 1e-7, 1733091234.123456, 123456789012.5):
            old = FileRecord("g/a/a-1.whl", "up", "u", "aa" * 32, 10, "k/a", cached_at)
            new = FileRecord("g/a/a-1.whl", "up", "u", "aa" * 32, 12, "k/a", cached_at + 1)
            assert await self.store.put_file(old) is None
            assert await self.store.put_file(new) == old
            assert await self.store.usage() == (12, 1)
            assert await self.store.delete_file(old.key, old) is None  # it is not that landing any more
            assert await self.store.get_file(old.key) == new
            assert await self.store.delete_file(new.key, new) == new
            assert await self.store.delete_file(new.key) is None  # nothing left to delete
            assert await self.store.usage() == (0, 0)
            await self.store.put_file(old)
            assert await self.store.delete_file(old.key) == old  # unconditional


def test_sender_aborts_the_client_on_a_read_error() -> None:
    """
    A store that fails mid-file must never yield a complete-looking body:
    the connection is aborted instead of finished.
    """
    from twisted.internet.testing import StringTransport

    class Broken(_Source):
        def read(self, offset: int, length: int) -> Deferred[bytes]:
            if offset >= 10:
                raise OSError(5, "Input/output error")
            return succeed(self.data[offset:10])

    request, _ = _request()
    transport = StringTransport()
    request.channel.transport = transport
    request.setHeader(b"content-length", b"20")
    source = Broken(b"x" * 20)
    Sender(request, source).start()
    assert transport.disconnected and not request.finished and source.closed
    assert transport.value().endswith(b"\r\n\r\n" + b"x" * 10)


# -- revalidation, stale-if-error and offline, on a Clock


def test_expired_page_is_revalidated_with_its_validators() -> None:
    fake = FakeUpstream([build_wheel("alpha", "1.0")])
    clock = Clock()
    metadata = MemoryMetadata()
    pages = page_cache(fake, clock, metadata)
    first, _ = result(pages.get("alpha"))
    clock.advance(601)
    again, state = result(pages.get("alpha"))
    assert state == "MISS" and fake.not_modified == 1 and fake.requests["/simple/alpha/"] == 2
    assert again.json is first.json and pages.remaining(again) == 600
    assert metadata.pages[again.key].fetched_at == 601


def test_stale_if_error_then_give_up() -> None:
    from txpypi.fetch.upstream import UpstreamError

    fake = FakeUpstream([build_wheel("alpha", "1.0")])
    clock = Clock()
    pages = page_cache(fake, clock, MemoryMetadata())
    pages.stale_ttl = 3600
    first, _ = result(pages.get("alpha"))
    fake.page_faults["alpha"] = "500"
    clock.advance(600 + 3599)
    page, state = result(pages.get("alpha"))
    assert state == "STALE" and page is first and pages.age(page) == 4199
    clock.advance(2)
    with pytest.raises(UpstreamError):
        result(pages.get("alpha"))
    pages.stale_ttl = 0  # off: errors are never hidden
    clock.advance(-2000)
    with pytest.raises(UpstreamError):
        result(pages.get("alpha"))


def test_offline_serves_what_is_cached_and_asks_nobody() -> None:
    from txpypi.cache.pages import NotFound

    fake = FakeUpstream([build_wheel("alpha", "1.0"), build_wheel("beta", "1.0")])
    clock = Clock()
    metadata = MemoryMetadata()
    result(page_cache(fake, clock, metadata).get("alpha"))
    offline = page_cache(fake, clock, metadata)
    offline.offline = True
    clock.advance(10**7)
    page, state = result(offline.get("alpha"))
    assert state == "STALE"
    with pytest.raises(NotFound):
        result(offline.get("beta"))
    assert fake.requests["/simple/alpha/"] == 1 and "/simple/beta/" not in fake.requests

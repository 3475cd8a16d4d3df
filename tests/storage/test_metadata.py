"""
One contract for every metadata store: memory, SQLite and a real
redis-server.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.python.threadpool import ThreadPool
from zope.interface.verify import verifyObject

from tests.conftest import get_reactor
from txpypi.storage.metadata import FileRecord, IMetadata, MemoryMetadata, PageRecord, SqliteMetadata


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


@pytest_twisted.ensureDeferred
async def test_a_groups_owners_are_shared_through_the_store(metadata: Any) -> None:
    """
    Who owns a project, as one instance's L{Owners} records it, is what
    another instance (its own memory empty) reads from the same store; a
    forget reaches it too.  Against every store: Redis is how a cluster
    shares it.
    """
    from txpypi.cache.owners import Owners

    one, two = Owners(metadata, "default", get_reactor()), Owners(metadata, "default", get_reactor())
    await one.set("acme-lib", "private")  # the write the answer does not wait for
    assert await two.get("acme-lib") == "private"
    assert await Owners(metadata, "mirror", get_reactor()).get("acme-lib") is None  # per group
    await one.forget("acme-lib")
    assert await Owners(metadata, "default", get_reactor()).get("acme-lib") is None

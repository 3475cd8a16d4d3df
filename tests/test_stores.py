"""
One contract for every file store: the local disk and S3 (a real SeaweedFS).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.python.threadpool import ThreadPool
from zope.interface.verify import verifyObject

from tests.conftest import get_reactor
from txpypi.names import BadName
from txpypi.stores import DiskStore, IFileStore, file_key


@pytest.fixture(params=["disk", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    pool = ThreadPool(1, 4)
    pool.start()
    try:
        if request.param == "disk":
            disk = DiskStore(tmp_path / "cache", pool, get_reactor())
            disk.prepare()
            yield disk
        else:
            from txpypi.s3store import S3Store

            bucket = request.getfixturevalue("s3_bucket")
            spool = tmp_path / "spool"
            spool.mkdir()
            yield S3Store(bucket.client(), bucket.bucket, bucket.prefix, str(spool), pool, get_reactor())
    finally:
        pool.stop()


def spool(store: Any, data: bytes) -> str:
    path = os.path.join(store.spool_dir, "x.part")
    with open(path, "wb") as f:
        f.write(data)
    return path


def test_interface(store: Any) -> None:
    assert verifyObject(IFileStore, store)


@pytest_twisted.ensureDeferred
async def test_commit_open_read_delete(store: Any) -> None:
    data = bytes(range(256)) * 4000  # 1 MB: a multipart upload on S3 is fine too
    key = file_key("ab" * 32, "a-1.0-py3-none-any.whl")
    assert await store.open(key) is None
    path = spool(store, data)
    await store.commit(path, key)
    assert not os.path.exists(path)  # the spool file is consumed
    reader = await store.open(key)
    assert reader is not None and reader.size == len(data)
    assert await reader.read(0, 10) == data[:10]
    assert await reader.read(len(data) - 5, 100) == data[-5:]
    assert await reader.read(len(data), 10) == b""
    reader.close()
    await store.delete(key)
    assert await store.open(key) is None
    await store.delete(key)  # deleting what is gone is no error


@pytest_twisted.ensureDeferred
async def test_replacing_a_key(store: Any) -> None:
    key = file_key("cd" * 32, "b-1.0.tar.gz")
    await store.commit(spool(store, b"first"), key)
    await store.commit(spool(store, b"second!"), key)
    reader = await store.open(key)
    assert reader.size == 7 and await reader.read(0, 100) == b"second!"
    reader.close()


@pytest_twisted.ensureDeferred
async def test_disk_store_stays_inside_its_root(tmp_path: Path) -> None:
    pool = ThreadPool(1, 1)
    pool.start()
    try:
        store = DiskStore(tmp_path, pool, get_reactor())
        (tmp_path / "tmp").mkdir()
        (tmp_path / "tmp" / "leftover.part").write_bytes(b"crash")
        store.prepare()
        assert list((tmp_path / "tmp").iterdir()) == []  # leftovers cleaned
        for key in ("../../etc/passwd", "/etc/passwd", "aa/../../x"):
            with pytest.raises(BadName):
                store.open(key)
    finally:
        pool.stop()

"""
One contract for every file store: the local disk, S3 (a real SeaweedFS) and
memory; and one for every upload taken while a file spools (S3 and memory).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from zope.interface.verify import verifyObject

from tests.conftest import get_reactor
from txpypi.core.names import BadName
from txpypi.storage.memory import MemoryStore, MemoryStreamingStore
from txpypi.storage.stores import DiskStore, IFileStore, IStreamingUpload, IUpload, UploadFailed, file_key


@pytest.fixture(params=["disk", "s3", "memory"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    pool = ThreadPool(1, 4)
    pool.start()
    try:
        if request.param == "memory":
            spool = tmp_path / "spool"
            spool.mkdir()
            yield MemoryStore(str(spool))
        elif request.param == "disk":
            disk = DiskStore(tmp_path / "cache", pool, get_reactor())
            disk.prepare()
            yield disk
        else:
            from txpypi.storage.s3 import S3Store

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


@pytest.fixture(params=["s3", "memory"])
def streaming(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Any]:
    """
    A store that takes files while they spool (L{IStreamingUpload}).
    """
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    if request.param == "memory":
        yield MemoryStreamingStore(str(spool_dir))
        return
    from txpypi.storage.s3 import S3Store

    pool = ThreadPool(1, 4)
    pool.start()
    try:
        bucket = request.getfixturevalue("s3_bucket")
        # Small parts, so that a few hundred kilobytes make a multipart upload.
        yield S3Store(
            bucket.client(),
            bucket.bucket,
            bucket.prefix,
            str(spool_dir),
            pool,
            get_reactor(),
            part_size=5 * 2**20,
        )
    finally:
        pool.stop()


def grow(path: str, data: bytes) -> None:
    with open(path, "ab") as f:
        f.write(data)


@pytest_twisted.ensureDeferred
async def test_an_upload_lands_only_when_complete(streaming: Any) -> None:
    """
    Bytes told as spooled are sent; the file is visible under its key only
    once C{complete} verified it, and the spool file is then consumed.
    """
    import hashlib

    data = os.urandom(6 * 2**20 + 123)  # more than one part on S3
    key = file_key(hashlib.sha256(data).hexdigest(), "u-1.0-py3-none-any.whl")
    path = spool(streaming, b"")
    upload = IStreamingUpload(streaming).start_upload(path, key, hashlib.sha256(data).hexdigest())
    assert verifyObject(IUpload, upload)
    half = len(data) // 2
    grow(path, data[:half])
    upload.spooled(half)
    assert await streaming.open(key) is None  # nothing visible yet
    grow(path, data[half:])
    upload.spooled(len(data))
    await upload.complete(len(data))
    assert upload.sent == len(data)
    await upload.wait_sent(len(data))  # fires at once now
    assert not os.path.exists(path)
    reader = await streaming.open(key)
    assert reader is not None and reader.size == len(data)
    assert await reader.read(0, len(data)) == data
    reader.close()


@pytest_twisted.ensureDeferred
async def test_an_upload_with_the_wrong_bytes_leaves_nothing(streaming: Any) -> None:
    """
    Bytes that do not have the sha256 the upload started with fail
    C{complete}, and nothing becomes visible.
    """
    data = b"not what the index listed" * 1000
    key = file_key("00" * 32, "w-1.0-py3-none-any.whl")
    path = spool(streaming, b"")
    upload = IStreamingUpload(streaming).start_upload(path, key, "00" * 32)
    grow(path, data)
    upload.spooled(len(data))
    with pytest.raises(UploadFailed):
        await upload.complete(len(data))
    assert await streaming.open(key) is None


@pytest_twisted.ensureDeferred
async def test_an_aborted_upload_leaves_nothing_and_the_spool_to_its_caller(streaming: Any) -> None:
    import hashlib

    data = b"abandoned" * 1000
    key = file_key(hashlib.sha256(data).hexdigest(), "a-1.0-py3-none-any.whl")
    path = spool(streaming, b"")
    upload = IStreamingUpload(streaming).start_upload(path, key, hashlib.sha256(data).hexdigest())
    grow(path, data)
    upload.spooled(len(data))
    await upload.abort()
    assert os.path.exists(path)  # the spool file is the caller's to remove
    assert await streaming.open(key) is None
    with pytest.raises(UploadFailed):
        await upload.complete(len(data))  # over: exactly one of complete or abort
    assert await streaming.open(key) is None


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
        for key in ("../../etc/passwd", "/etc/passwd", "aa/../../x", "aa/\0x"):
            with pytest.raises(BadName):
                store.open(key)
        # A link out of the store, planted in it: never written through, nor
        # removed through.
        outside = tmp_path / "outside"
        outside.mkdir()
        (tmp_path / "files" / "aa").mkdir(parents=True)
        (tmp_path / "files" / "aa" / "link").symlink_to(outside)
        spool = tmp_path / "tmp" / "x.part"
        spool.write_bytes(b"data")
        with pytest.raises(BadName):
            await store.commit(str(spool), "aa/link/x")
        (outside / "y").write_bytes(b"keep")
        with pytest.raises(BadName):
            await store.delete("aa/link/y")
        assert (outside / "y").read_bytes() == b"keep" and not (outside / "x").exists()
    finally:
        pool.stop()


# -- S3 only: presigned redirects (--s3-redirect)


def s3_settings(s3: Any, **more: Any) -> dict[str, Any]:
    """
    A proxy's settings for files in the test's corner of the bucket.
    """
    return {
        "store": "s3",
        "s3_bucket": s3.bucket,
        "s3_prefix": s3.prefix,
        "s3_endpoint_url": s3.endpoint,
        "s3_region": "us-east-1",
        **more,
    }


def test_s3_redirect_options() -> None:
    from twisted.python.usage import UsageError

    from txpypi.tap import Options

    def parse(*argv: str) -> Any:
        options = Options()
        options.parseOptions(list(argv))
        return options.settings

    assert parse().s3_redirect is False and parse().s3_redirect_ttl == 300
    s = parse("--store", "s3", "--s3-bucket", "b", "--s3-redirect", "--s3-redirect-ttl", "60")
    assert s.s3_redirect is True and s.s3_redirect_ttl == 60
    for bad, message in (
        (["--s3-redirect"], "s3-redirect: only with store: s3"),
        (["--store", "s3", "--s3-bucket", "b", "--s3-redirect-ttl", "0"], "s3-redirect-ttl"),
        (["--store", "s3", "--s3-bucket", "b", "--s3-redirect-ttl", "604801"], "s3-redirect-ttl"),
    ):
        with pytest.raises(UsageError, match=message):
            parse(*bad)


@pytest_twisted.ensureDeferred
async def test_s3_redirect_answers_hits_with_a_presigned_url(
    json_upstream: Any, s3_bucket: Any, proxy_factory: Any, dists: list[Any], tmp_path: Path
) -> None:
    """
    A cached hit gets a 302 to a presigned URL on the S3 endpoint, which
    gives the exact bytes and honours Range; a miss, a HEAD and a matching
    If-None-Match are still answered by the proxy; off by default.
    """
    from tests.integration.test_http_semantics import get
    from tests.integration.test_proxy import find, header

    running = proxy_factory(
        json_upstream.url, tmp_path / "a", **s3_settings(s3_bucket, s3_redirect=True, s3_redirect_ttl=120)
    )
    name = "gamma-0.5-py3-none-any.whl"
    data = find(dists, name).content
    url = f"{running.url}/files/gamma/{name}"
    response, body = await get(url)
    assert (response.code, header(response, "x-cache"), body) == (200, "MISS", data)
    await running.proxy.files.wait_idle()

    response, body = await get(url)
    assert (response.code, header(response, "x-cache")) == (302, "HIT")
    assert header(response, "cache-control") == "no-store" and body == b"found in the file store\n"
    location = header(response, "location")
    assert location is not None and location.startswith(f"{s3_bucket.endpoint}/{s3_bucket.bucket}/")
    assert "X-Amz-Expires=120" in location and "X-Amz-Signature=" in location
    response, body = await get(location)
    assert response.code == 200 and body == data

    response, _ = await get(url, {b"Range": [b"bytes=10-19"]})
    assert response.code == 302
    response, body = await get(header(response, "location") or "", {b"Range": [b"bytes=10-19"]})
    assert response.code == 206 and body == data[10:20]

    response, body = await get(url, method=b"HEAD")  # a URL signed for GET would refuse a HEAD
    assert response.code == 200 and header(response, "content-length") == str(len(data))
    etag = f'"{find(dists, name).sha256}"'
    response, body = await get(url, {b"If-None-Match": [etag.encode()]})
    assert response.code == 304
    # An If-Range naming another version: only the proxy knows its ETags.
    response, body = await get(url, {b"Range": [b"bytes=0-9"], b"If-Range": [b'"other"']})
    assert response.code == 200 and body == data

    # Whole downloads count for /stats, redirected or not; ranges do not.
    assert await running.proxy.files.project_downloads("gamma") == [("0.5", name, 3)]
    assert json_upstream.fake.requests["/packages/" + name] == 1

    # Off by default: restarted without the option, the proxy sends the bytes.
    await running.stop()
    plain = proxy_factory(json_upstream.url, tmp_path / "a", **s3_settings(s3_bucket))
    response, body = await get(f"{plain.url}/files/gamma/{name}")
    assert (response.code, header(response, "x-cache"), body) == (200, "HIT", data)


@pytest_twisted.ensureDeferred
async def test_s3_redirect_falls_back_to_sending_and_reloads(
    json_upstream: Any, s3_bucket: Any, proxy_factory: Any, dists: list[Any]
) -> None:
    """
    When no URL can be presigned the proxy sends the file itself (and counts
    a store error); SIGHUP's settings turn redirects off and on.
    """
    import attrs

    from tests.integration.test_http_semantics import get
    from tests.integration.test_proxy import find, header
    from txpypi.config import Settings
    from txpypi.options import Running

    settings = s3_settings(s3_bucket, s3_redirect=True)
    running = proxy_factory(json_upstream.url, **settings)
    name = "gamma-0.5-py3-none-any.whl"
    data = find(dists, name).content
    url = f"{running.url}/files/gamma/{name}"
    await get(url)
    await running.proxy.files.wait_idle()
    store = running.proxy.files._store.inner  # the S3 store inside the outage watcher

    class Refusing:
        def generate_presigned_url(self, *args: Any, **kwargs: Any) -> str:
            raise RuntimeError("no credentials")

    store._presigner = Refusing()
    response, body = await get(url)
    assert (response.code, header(response, "x-cache"), body) == (200, "HIT", data)
    errors = running.proxy.metrics.registry.get_sample_value("txpypi_store_errors_total", {"store": "files"})
    assert errors == 1
    store._presigner = None

    live = Settings(upstream=json_upstream.url, **settings)
    reload = Running(live, running.proxy.live).reload  # what SIGHUP does
    reload(attrs.evolve(live, s3_redirect=False))
    response, body = await get(url)
    assert response.code == 200 and body == data
    reload(attrs.evolve(live, s3_redirect_ttl=30))
    response, body = await get(url)
    assert response.code == 302 and "X-Amz-Expires=30" in (header(response, "location") or "")


# -- S3 only: reading a hit


@pytest_twisted.ensureDeferred
async def test_s3_reader_streams_one_body_for_sequential_reads(s3_bucket: Any, tmp_path: Path) -> None:
    """
    A whole object read chunk by chunk costs two GETs, not one per chunk; a
    small range costs one; a body that breaks under a slow client is opened
    again where it stood; and closing a reader mid-way closes its body.
    """
    from txpypi.storage.s3 import S3Store

    pool = ThreadPool(1, 1)  # one thread: jobs run in order
    pool.start()
    try:
        spool_dir = tmp_path / "spool"
        spool_dir.mkdir()
        real = s3_bucket.client()
        bodies: list[Any] = []

        class Counting:
            def __getattr__(self, name: str) -> Any:
                return getattr(real, name)

            def get_object(self, **kwargs: Any) -> Any:
                answer = real.get_object(**kwargs)
                bodies.append(answer["Body"])
                return answer

        store = S3Store(Counting(), s3_bucket.bucket, s3_bucket.prefix, str(spool_dir), pool, get_reactor())
        data = os.urandom(3 * 1024 * 1024 + 17)
        key = file_key("ef" * 32, "c-1.0-py3-none-any.whl")
        await store.commit(spool(store, data), key)

        async def read_all(reader: Any, chunk: int = 256 * 1024) -> bytes:
            got = b""
            while piece := await reader.read(len(got), chunk):
                got += piece
            return got

        reader = await store.open(key)
        assert await read_all(reader) == data and len(bodies) == 2
        reader.close()

        bodies.clear()
        reader = await store.open(key)
        assert await reader.read(1000, 10) == data[1000:1010] and len(bodies) == 1
        assert await reader.read(1010, 10) == data[1010:1020] and len(bodies) == 2
        bodies[-1].close()  # the connection drops while the client is paused
        assert await reader.read(1020, 100_000) == data[1020:101_020] and len(bodies) == 3
        open_body = bodies[-1]
        reader.close()
        await deferToThreadPool(get_reactor(), pool, lambda: None)  # the close ran before this
        assert open_body._raw_stream.closed
    finally:
        pool.stop()

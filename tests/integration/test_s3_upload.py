"""
A miss streams into S3 as it downloads (a real SeaweedFS): a multipart
upload fed from the spool, completed only once the file is verified,
aborted on anything else, leaving neither an object nor an upload.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread
from twisted.python.threadpool import ThreadPool
from twisted.web.client import ResponseFailed

from tests.conftest import Served, get_reactor
from tests.servers import S3
from tests.storage.test_stores import s3_settings
from txpypi.fetch.wanted import Wanted
from txpypi.storage.s3 import PART_SIZE, PROBE_KEY, S3Store, UploadFailed
from txpypi.storage.stores import file_key
from txpypi.testing import Dist, build_wheel

HUGE = "huge-1.0-py3-none-any.whl"


def within(d: Deferred[Any], seconds: float = 30) -> Deferred[Any]:
    """
    C{d}, failing with a timeout if it takes over C{seconds}: no test waits
    forever.
    """
    return d.addTimeout(seconds, get_reactor())


@pytest.fixture(scope="module")
def huge() -> Dist:
    """
    A wheel of three parts: two whole ones and a short last one.
    """
    dist = build_wheel("huge", "1.0", padding=2 * PART_SIZE + 4 * 1024 * 1024)
    assert dist.filename == HUGE
    return dist


def objects(s3: S3) -> Deferred[list[str]]:
    """
    The object names in this test's corner of the bucket (boto3 in a
    thread: the reactor must go on serving meanwhile), but for the object
    the store's health probe reads.
    """

    def names() -> list[str]:
        answer = s3.client().list_objects_v2(Bucket=s3.bucket, Prefix=s3.prefix)  # type: ignore[attr-defined]
        return [o["Key"] for o in answer.get("Contents", []) if not o["Key"].endswith(PROBE_KEY)]

    return deferToThread(names)


def uploads(s3: S3) -> Deferred[list[tuple[str, list[int]]]]:
    """
    The multipart uploads in progress in this test's corner: each one's key
    and the sizes of its parts.
    """

    def listed() -> list[tuple[str, list[int]]]:
        client: Any = s3.client()
        answer = client.list_multipart_uploads(Bucket=s3.bucket, Prefix=s3.prefix)
        found = []
        for upload in answer.get("Uploads", []):
            parts = client.list_parts(Bucket=s3.bucket, Key=upload["Key"], UploadId=upload["UploadId"])
            found.append((upload["Key"], [p["Size"] for p in parts.get("Parts", [])]))
        return found

    return deferToThread(listed)


def fetch_object(s3: S3, key: str) -> Deferred[bytes]:
    def get() -> bytes:
        answer = s3.client().get_object(Bucket=s3.bucket, Key=s3.prefix + key)  # type: ignore[attr-defined]
        data: bytes = answer["Body"].read()
        return data

    return deferToThread(get)


async def start_held(running: Any, http: Any, project: str, filename: str) -> tuple[Any, Any]:
    """
    Start a download that the upstream holds half-way; its client's
    response and the flight, once the flight sent its first whole part.
    """
    response = await http.get(f"{running.url}/files/{project}/{filename}", unbuffered=True)
    assert response.code == 200
    flight = running.proxy.files.downloads.flights[running.proxy.files.key(project, filename)]
    assert flight.upload is not None
    await within(flight.upload.wait_sent(PART_SIZE))
    return response, flight


@pytest_twisted.ensureDeferred
async def test_a_miss_streams_into_s3_and_lands_once_verified(
    json_upstream: Served, s3_bucket: S3, proxy_factory: Any, http: Any, huge: Dist
) -> None:
    """
    While the upstream holds the second half back, S3 already has the
    first part of an upload in progress and no object; once the rest came
    and was verified, the object has the exact bytes and no upload is left.
    """
    json_upstream.fake.add(huge)
    gate: Deferred[None] = Deferred()
    json_upstream.fake.holds[HUGE] = gate
    running = proxy_factory(json_upstream.url, **s3_settings(s3_bucket))
    key = s3_bucket.prefix + file_key(huge.sha256, HUGE)

    response, flight = await start_held(running, http, "huge", HUGE)
    assert await uploads(s3_bucket) == [(key, [PART_SIZE])]
    assert await objects(s3_bucket) == []  # nothing visible before it is verified

    gate.callback(None)
    assert await response.content() == huge.content
    await within(flight.when_done())
    assert await objects(s3_bucket) == [key]
    assert await uploads(s3_bucket) == []
    assert await fetch_object(s3_bucket, file_key(huge.sha256, HUGE)) == huge.content
    assert os.listdir(flight._store.spool_dir) == []  # the spool was consumed
    # A hit now comes from S3.
    response = await http.get(f"{running.url}/files/huge/{HUGE}")
    assert response.headers.getRawHeaders(b"x-cache") == [b"HIT"]
    assert await response.content() == huge.content
    assert json_upstream.fake.requests["/packages/" + HUGE] == 1


@pytest.mark.parametrize("fault", ["wrong-bytes", "cut"])
@pytest_twisted.ensureDeferred
async def test_a_bad_download_leaves_nothing_in_s3(
    json_upstream: Served, s3_bucket: S3, proxy_factory: Any, http: Any, huge: Dist, fault: Any
) -> None:
    """
    A file whose hash does not match, or whose upstream is cut mid-body,
    aborts its upload: no object, no upload in progress, no spool file, and
    the client's connection is cut.
    """
    json_upstream.fake.add(huge)
    gate: Deferred[None] = Deferred()
    json_upstream.fake.holds[HUGE] = gate
    json_upstream.fake.faults[HUGE] = fault
    running = proxy_factory(json_upstream.url, **s3_settings(s3_bucket))

    response, flight = await start_held(running, http, "huge", HUGE)
    assert [sizes for _, sizes in await uploads(s3_bucket)] == [[PART_SIZE]]
    gate.callback(None)
    with pytest.raises(ResponseFailed):  # cut short of its length
        await response.content()
    await within(flight.when_done())
    assert flight.failure is not None
    assert await uploads(s3_bucket) == []
    assert await objects(s3_bucket) == []
    assert os.listdir(flight._store.spool_dir) == []


@pytest_twisted.ensureDeferred
async def test_an_s3_failure_mid_download_still_serves_the_file(
    json_upstream: Served, s3_bucket: S3, proxy_factory: Any, http: Any, huge: Dist
) -> None:
    """
    When S3 refuses a part, the client still gets the whole verified file;
    it is just not cached, and the parts already sent are aborted.
    """
    json_upstream.fake.add(huge)
    running = proxy_factory(json_upstream.url, **s3_settings(s3_bucket))
    store = running.proxy.files._store.inner  # the S3 store inside the outage watcher
    real = store.client
    sent = [0]

    class SecondPartFails:
        def __getattr__(self, name: str) -> Any:
            return getattr(real, name)

        def upload_part(self, **kwargs: Any) -> Any:
            sent[0] += 1
            if sent[0] == 2:
                raise OSError("S3 went away")
            return real.upload_part(**kwargs)

    store.client = SecondPartFails()
    response = await http.get(f"{running.url}/files/huge/{HUGE}", unbuffered=True)
    flight = running.proxy.files.downloads.flights[running.proxy.files.key("huge", HUGE)]
    assert response.code == 200 and await response.content() == huge.content
    await within(flight.when_done())
    assert sent[0] == 2 and flight.verified
    store.client = real
    assert await uploads(s3_bucket) == []
    assert await objects(s3_bucket) == []
    errors = running.proxy.metrics.registry.get_sample_value("txpypi_store_errors_total", {"store": "files"})
    assert errors == 1
    assert await running.proxy.files._metadata.get_file(running.proxy.files.key("huge", HUGE)) is None


@pytest_twisted.ensureDeferred
async def test_without_a_sha256_the_file_is_uploaded_once_verified(
    json_upstream: Served, s3_bucket: S3, proxy_factory: Any, huge: Dist
) -> None:
    """
    When the index gives no sha256, the key is unknown until the end: no
    upload while downloading, the verified spool file is uploaded after.
    """
    json_upstream.fake.add(huge)
    running = proxy_factory(json_upstream.url, **s3_settings(s3_bucket))
    files = running.proxy.files
    url = json_upstream.url.replace("/simple/", "/packages/") + HUGE
    wanted = Wanted(files.key("huge", HUGE), HUGE, files.pages.upstream.url, url, None, len(huge.content))
    flight = files.downloads._start(wanted, None)
    assert flight.upload is None
    await within(flight.when_done())
    assert flight.verified and await objects(s3_bucket) == [s3_bucket.prefix + file_key(huge.sha256, HUGE)]


# -- the store's upload on its own


@pytest.fixture
def s3_store(s3_bucket: S3, tmp_path: Path) -> Any:
    pool = ThreadPool(1, 2)
    pool.start()
    spool = tmp_path / "spool"
    spool.mkdir()
    yield S3Store(s3_bucket.client(), s3_bucket.bucket, s3_bucket.prefix, str(spool), pool, get_reactor())
    pool.stop()


@pytest_twisted.ensureDeferred
async def test_small_files_are_one_put_and_spool_bytes_are_checked(s3_store: Any, s3_bucket: S3) -> None:
    """
    A file smaller than a part is one PUT once complete; and an upload whose
    spool file does not read back with the expected sha256 is refused.
    """
    data = b"x" * 1000
    path = os.path.join(s3_store.spool_dir, "small.part")
    Path(path).write_bytes(data)
    sha256 = hashlib.sha256(data).hexdigest()
    upload = s3_store.start_upload(path, file_key(sha256, "s.whl"), sha256)
    upload.spooled(len(data))
    assert upload.upload_id is None
    await upload.complete(len(data))
    assert not os.path.exists(path)
    assert await fetch_object(s3_bucket, file_key(sha256, "s.whl")) == data

    # The spool changed under us after the download was verified.
    Path(path).write_bytes(b"y" * (PART_SIZE + 10))
    sha256 = hashlib.sha256(b"z" * (PART_SIZE + 10)).hexdigest()
    upload = s3_store.start_upload(path, file_key(sha256, "t.whl"), sha256)
    upload.spooled(PART_SIZE + 10)
    await within(upload.wait_sent(PART_SIZE))
    with pytest.raises(UploadFailed, match="sha256"):
        await upload.complete(PART_SIZE + 10)
    assert await uploads(s3_bucket) == []
    small = s3_bucket.prefix + file_key(hashlib.sha256(data).hexdigest(), "s.whl")
    assert await objects(s3_bucket) == [small]
    await upload.abort()  # after the end: nothing to do


@pytest_twisted.ensureDeferred
async def test_a_big_download_is_never_whole_on_local_disk(
    json_upstream: Served,
    s3_bucket: S3,
    proxy_factory: Any,
    http: Any,
    huge: Dist,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """
    The part of the spool that S3 already has and the client already read
    is freed while the download goes on; a client that comes after that
    waits for the file to land and reads it from S3.
    """
    from tests.integration.test_shared import receive_until
    from txpypi.fetch.punch import PunchPolicy

    json_upstream.fake.add(huge)
    gate: Deferred[None] = Deferred()
    json_upstream.fake.holds[HUGE] = gate
    running = proxy_factory(json_upstream.url, **s3_settings(s3_bucket))
    # Instead of 64 MiB files, 8 MiB at a time:
    running.proxy.files.downloads.punch_policy = PunchPolicy(min_size=PART_SIZE, step=1024 * 1024)

    response, flight = await start_held(running, http, "huge", HUGE)
    got, reached, done = receive_until(response, PART_SIZE)
    await within(reached)
    await within(flight.puncher.freed.wait(PART_SIZE))
    spool = os.stat(flight.spool.path)
    assert spool.st_size == len(huge.content) // 2  # what the upstream sent so far
    assert spool.st_blocks * 512 <= spool.st_size - PART_SIZE + 64 * 1024  # but the first part is freed
    assert not flight.joinable

    late = http.get(f"{running.url}/files/huge/{HUGE}")
    gate.callback(None)
    await within(done)
    assert bytes(got) == huge.content
    late_response = await within(late)
    assert late_response.headers.getRawHeaders(b"x-cache") == [b"HIT"]
    assert await late_response.content() == huge.content
    assert json_upstream.fake.requests["/packages/" + HUGE] == 1

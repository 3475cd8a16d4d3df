"""
Several instances sharing one cache: files in S3 (a real SeaweedFS) and
metadata in Redis (a real redis-server).  What one instance fetched is a hit
on the other.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet.defer import Deferred

from tests.conftest import Served
from tests.servers import S3, Redis
from tests.test_http_semantics import get
from tests.test_proxy import find, header
from txpypi.testing import Dist


@pytest_twisted.ensureDeferred
async def test_two_instances_share_s3_and_redis(
    json_upstream: Served,
    redis_server: Redis,
    s3_bucket: S3,
    proxy_factory: Any,
    tmp_path: Path,
    dists: list[Dist],
) -> None:
    shared = {
        "store": "s3",
        "s3_bucket": s3_bucket.bucket,
        "s3_prefix": s3_bucket.prefix,
        "s3_endpoint_url": s3_bucket.endpoint,
        "s3_region": "us-east-1",
        "redis": redis_server.url,
    }
    one = proxy_factory(json_upstream.url, tmp_path / "one", **shared)
    two = proxy_factory(json_upstream.url, tmp_path / "two", **shared)
    name = "big-1.0-py3-none-any.whl"
    data = find(dists, name).content

    response, body = await get(f"{one.url}/files/big/{name}")
    assert header(response, "x-cache") == "MISS" and body == data
    await Deferred.fromCoroutine(one.proxy.files.wait_idle())

    # The other instance: the index page from Redis, the file from S3.
    response, _ = await get(f"{two.url}/simple/big/")
    assert header(response, "x-cache") == "HIT"
    response, body = await get(f"{two.url}/files/big/{name}")
    assert header(response, "x-cache") == "HIT" and body == data
    response, body = await get(f"{two.url}/files/big/{name}", {b"Range": [b"bytes=100-199"]})
    assert response.code == 206 and body == data[100:200]
    assert json_upstream.fake.requests["/packages/" + name] == 1
    assert json_upstream.fake.requests["/simple/big/"] == 1
    # Nothing of it on the instances' local disks.
    assert not list((tmp_path / "one").rglob("*.whl")) and not list((tmp_path / "two").rglob("*.whl"))
    await Deferred.fromCoroutine(two.proxy.files.load_usage())
    assert (two.proxy.files.size, two.proxy.files.count) == (len(data), 1)

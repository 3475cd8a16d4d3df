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


def cluster_settings(redis: Redis, s3: S3) -> dict[str, Any]:
    """
    What instances sharing one cache have in common.
    """
    return {
        "store": "s3",
        "s3_bucket": s3.bucket,
        "s3_prefix": s3.prefix,
        "s3_endpoint_url": s3.endpoint,
        "s3_region": "us-east-1",
        "redis": redis.url,
    }


@pytest_twisted.ensureDeferred
async def test_two_instances_share_s3_and_redis(
    json_upstream: Served,
    redis_server: Redis,
    s3_bucket: S3,
    proxy_factory: Any,
    tmp_path: Path,
    dists: list[Dist],
) -> None:
    shared = cluster_settings(redis_server, s3_bucket)
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


@pytest_twisted.ensureDeferred
async def test_one_upstream_fetch_for_the_whole_cluster(
    json_upstream: Served,
    redis_server: Redis,
    s3_bucket: S3,
    proxy_factory: Any,
    tmp_path: Path,
    http: Any,
    dists: list[Dist],
) -> None:
    """
    Three instances, thirty clients, one uncached file: the instance that
    takes the cluster lock fetches it; the others wait for it to land in
    the shared store and serve it from there. The upstream serves it once.
    """
    from tests.test_proxy import _count_arrivals

    shared = cluster_settings(redis_server, s3_bucket)
    instances = [proxy_factory(json_upstream.url, tmp_path / f"i{i}", **shared) for i in range(3)]
    name = "big-1.0-py3-none-any.whl"
    data = find(dists, name).content
    gate: Deferred[None] = Deferred()
    json_upstream.fake.holds[name] = gate
    # The leader's own clients get their headers while the upstream holds
    # the second half back...
    leader = [await http.get(f"{instances[0].url}/files/big/{name}", unbuffered=True) for _ in range(10)]
    # ...and the other instances' clients wait for the file to land.
    arrived = [_count_arrivals(p, 10) for p in instances[1:]]
    followers = [http.get(f"{p.url}/files/big/{name}") for p in instances[1:] for _ in range(10)]
    for a in arrived:
        await a
    gate.callback(None)
    bodies = [await r.content() for r in leader]
    for response in followers:
        r = await response
        assert r.code == 200
        bodies.append(await r.content())
    assert len(bodies) == 30 and all(b == data for b in bodies)
    assert json_upstream.fake.requests["/packages/" + name] == 1


@pytest_twisted.ensureDeferred
async def test_a_dead_leaders_lock_expires_and_another_takes_over(
    json_upstream: Served,
    redis_server: Redis,
    s3_bucket: S3,
    proxy_factory: Any,
    tmp_path: Path,
    dists: list[Dist],
) -> None:
    """
    A lock held by an instance that died (nobody renews it) expires after
    its TTL; a waiting instance then fetches the file itself, once.
    """
    from txpypi.redismeta import RedisLocks, connect

    shared = cluster_settings(redis_server, s3_bucket)
    running = proxy_factory(json_upstream.url, tmp_path / "i", **shared)
    name = "gamma-0.5-py3-none-any.whl"
    dead = RedisLocks(connect(redis_server.url), owner="dead-instance")
    key = running.proxy.files.key("gamma", name)
    assert await dead.acquire(key, 0.5)
    response, body = await get(f"{running.url}/files/gamma/{name}")
    assert response.code == 200 and body == find(dists, name).content
    assert json_upstream.fake.requests["/packages/" + name] == 1
    await dead.redis.disconnect()

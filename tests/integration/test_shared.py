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

from tests.conftest import Served, get_reactor
from tests.integration.test_http_semantics import get
from tests.integration.test_proxy import find, header
from tests.servers import S3, Redis
from txpypi.testing import Dist


def cluster_settings(redis: Redis, s3: S3) -> dict[str, Any]:
    """
    What instances sharing one cache have in common.
    """
    from tests.storage.test_stores import s3_settings

    return s3_settings(s3, redis=redis.url)


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
    assert (two.proxy.files.usage.size, two.proxy.files.usage.count) == (len(data), 1)


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
    from tests.integration.test_proxy import _count_arrivals

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
    from txpypi.storage.redismeta import RedisLocks, connect

    shared = cluster_settings(redis_server, s3_bucket)
    running = proxy_factory(json_upstream.url, tmp_path / "i", **shared)
    name = "gamma-0.5-py3-none-any.whl"
    dead = RedisLocks(connect(redis_server.url), owner="dead-instance", clock=get_reactor())
    key = running.proxy.files.key("gamma", name)
    assert await dead.acquire(key, 0.5)
    response, body = await get(f"{running.url}/files/gamma/{name}")
    assert response.code == 200 and body == find(dists, name).content
    assert json_upstream.fake.requests["/packages/" + name] == 1
    await dead.redis.disconnect()


@pytest_twisted.ensureDeferred
async def test_the_size_limit_holds_for_the_whole_cluster(
    json_upstream: Served,
    redis_server: Redis,
    s3_bucket: S3,
    proxy_factory: Any,
    tmp_path: Path,
    dists: list[Dist],
) -> None:
    """
    With a shared cache, --max-cache-size bounds what all the instances
    store together: each learns the shared total, and the instance that
    goes over it evicts the least recently used file, even one that another
    instance cached.
    """
    small, large = find(dists, "gamma-0.5-py3-none-any.whl"), find(dists, "big-1.0-py3-none-any.whl")
    limit = len(small.content) + len(large.content) - 1
    shared = {**cluster_settings(redis_server, s3_bucket), "max_cache_size": limit}
    one = proxy_factory(json_upstream.url, tmp_path / "one", **shared)
    two = proxy_factory(json_upstream.url, tmp_path / "two", **shared)
    response, _ = await get(f"{one.url}/files/gamma/{small.filename}")
    assert response.code == 200
    await Deferred.fromCoroutine(one.proxy.files.wait_idle())
    await Deferred.fromCoroutine(two.proxy.files.upkeep())
    assert (two.proxy.files.usage.size, two.proxy.files.usage.count) == (len(small.content), 1)
    response, _ = await get(f"{two.url}/files/big/{large.filename}")
    assert response.code == 200
    await Deferred.fromCoroutine(two.proxy.files.wait_idle())
    await Deferred.fromCoroutine(two.proxy.files.upkeep())
    await Deferred.fromCoroutine(two.proxy.files.wait_idle())
    assert two.proxy.files.usage.evictions == 1
    for instance in (one, two):
        await Deferred.fromCoroutine(instance.proxy.files.upkeep())
        assert (instance.proxy.files.usage.size, instance.proxy.files.usage.count) == (len(large.content), 1)
    # The other instance serves what is left, and fetches the evicted file again.
    response, _ = await get(f"{one.url}/files/big/{large.filename}")
    assert header(response, "x-cache") == "HIT"
    response, body = await get(f"{one.url}/files/gamma/{small.filename}")
    assert header(response, "x-cache") == "MISS" and body == small.content
    assert json_upstream.fake.requests["/packages/" + small.filename] == 2


SECRET = "cluster-secret-0123456789"


def peer_instance(
    proxy_factory: Any, upstream: Served, cache: Path, shared: dict[str, Any], **more: Any
) -> Any:
    """
    An instance of a cluster whose members stream downloads to each other.
    """
    from tests.servers import free_port

    port = free_port()
    settings = {"peer_url": f"http://127.0.0.1:{port}", "peer_secret": SECRET, **shared, **more}
    return proxy_factory(upstream.url, cache, f"tcp:{port}:interface=127.0.0.1", **settings)


def receive_until(response: Any, n: int) -> tuple[bytearray, Deferred[None], Deferred[None]]:
    """
    Collect a streamed body: the bytes so far, a Deferred that fires once
    C{n} of them arrived, and one that fires at the end.
    """
    import treq

    got = bytearray()
    reached: Deferred[None] = Deferred()

    def chunk(data: bytes) -> None:
        got.extend(data)
        if len(got) >= n and not reached.called:
            reached.callback(None)

    return got, reached, treq.collect(response, chunk)


@pytest_twisted.ensureDeferred
async def test_a_follower_streams_a_download_in_progress_from_the_leader(
    json_upstream: Served,
    redis_server: Redis,
    s3_bucket: S3,
    proxy_factory: Any,
    tmp_path: Path,
    http: Any,
    dists: list[Dist],
) -> None:
    """
    A client of another instance receives the leader's bytes as they
    arrive, over the peer route, before the upstream has sent the rest; the
    follower verifies them itself and caches nothing; the upstream serves
    the file once.
    """
    from tests.integration.test_operations import sample, scrape
    from tests.integration.test_s3_upload import objects, uploads

    shared = cluster_settings(redis_server, s3_bucket)
    one = peer_instance(proxy_factory, json_upstream, tmp_path / "one", shared)
    two = peer_instance(proxy_factory, json_upstream, tmp_path / "two", shared)
    name = "big-1.0-py3-none-any.whl"
    data = find(dists, name).content
    half = len(data) // 2  # the fake upstream holds the rest back
    gate: Deferred[None] = Deferred()
    json_upstream.fake.holds[name] = gate

    lead = await http.get(f"{one.url}/files/big/{name}", unbuffered=True)
    # Each hop holds back the last byte it has until the file is verified.
    lead_got, lead_half, lead_done = receive_until(lead, half - 1)
    await lead_half
    follow = await http.get(f"{two.url}/files/big/{name}", unbuffered=True)
    assert follow.code == 200 and header(follow, "x-cache") == "MISS"
    follow_got, follow_half, follow_done = receive_until(follow, half - 2)
    await follow_half  # while the upstream still holds the second half
    assert bytes(follow_got) == data[: len(follow_got)] and not gate.called
    gate.callback(None)
    await lead_done
    await follow_done
    assert bytes(lead_got) == bytes(follow_got) == data
    assert json_upstream.fake.requests["/packages/" + name] == 1
    peer = {"upstream": "upstream", "kind": "peer"}  # counted under the proxy's upstream
    assert sample(await scrape(two.url), "txpypi_upstream_requests_total", **peer, outcome="ok") == 1
    await Deferred.fromCoroutine(one.proxy.files.wait_idle())
    await Deferred.fromCoroutine(two.proxy.files.wait_idle())
    response, body = await get(f"{two.url}/files/big/{name}")
    assert header(response, "x-cache") == "HIT" and body == data
    assert not list((tmp_path / "two").rglob("*.part"))
    # One object, uploaded by the leader alone; no upload left behind.
    assert len(await objects(s3_bucket)) == 1 and await uploads(s3_bucket) == []


def called(owner: Any, name: str) -> Deferred[None]:
    """
    Fire once C{owner.name} is called (it goes on doing what it does).
    """
    original = getattr(owner, name)
    fired: Deferred[None] = Deferred()

    def calling(*args: Any, **kwargs: Any) -> Any:
        result = original(*args, **kwargs)
        if not fired.called:
            fired.callback(None)
        return result

    setattr(owner, name, calling)
    return fired


@pytest_twisted.ensureDeferred
async def test_a_follower_that_asks_before_the_leaders_download_starts_waits_for_it(
    json_upstream: Served,
    redis_server: Redis,
    s3_bucket: S3,
    proxy_factory: Any,
    tmp_path: Path,
    http: Any,
    dists: list[Dist],
) -> None:
    """
    The leader holds the claim of a file but its download waits for a
    slot; another instance sees the claim and asks the leader for the
    download at once.  The leader answers once its download starts,
    instead of "not downloading here", which would send the follower to
    wait for the landing.
    """
    from tests.integration.test_operations import sample, scrape

    shared = cluster_settings(redis_server, s3_bucket)
    one = peer_instance(proxy_factory, json_upstream, tmp_path / "one", shared, max_downloads=1)
    two = peer_instance(proxy_factory, json_upstream, tmp_path / "two", shared)
    big, gamma = find(dists, "big-1.0-py3-none-any.whl"), find(dists, "gamma-0.5-py3-none-any.whl")
    gate: Deferred[None] = Deferred()
    json_upstream.fake.holds[big.filename] = gate
    occupant = await http.get(f"{one.url}/files/big/{big.filename}", unbuffered=True)  # the one slot
    downloads = one.proxy.files.downloads
    queued, asked = called(downloads.slots, "acquire"), called(one.proxy.files, "peer_flight")
    lead = http.get(f"{one.url}/files/gamma/{gamma.filename}")
    await queued  # the leader holds the claim and waits for the slot
    follow = http.get(f"{two.url}/files/gamma/{gamma.filename}")
    await asked  # the follower asks before the leader's download started
    gate.callback(None)
    assert await occupant.content() == big.content
    for response in (await lead, await follow):
        assert response.code == 200 and await response.content() == gamma.content
    assert json_upstream.fake.requests["/packages/" + gamma.filename] == 1
    metrics = await scrape(two.url)
    peer = {"upstream": "upstream", "kind": "peer"}
    assert sample(metrics, "txpypi_upstream_requests_total", **peer, outcome="ok") == 1
    assert sample(metrics, "txpypi_upstream_requests_total", **peer, outcome="error") == 0


@pytest_twisted.ensureDeferred
async def test_a_claim_whose_download_never_starts_is_let_go(
    json_upstream: Served,
    redis_server: Redis,
    s3_bucket: S3,
    proxy_factory: Any,
    tmp_path: Path,
    http: Any,
    dists: list[Dist],
) -> None:
    """
    A claimed file whose download found no slot in time (503) is claimed
    no more: asked again once a slot is free, it downloads, instead of
    waiting for ever for a download of its own that never started.
    """
    shared = cluster_settings(redis_server, s3_bucket)
    one = peer_instance(
        proxy_factory, json_upstream, tmp_path / "one", shared, max_downloads=1, response_timeout=1.0
    )
    big, gamma = find(dists, "big-1.0-py3-none-any.whl"), find(dists, "gamma-0.5-py3-none-any.whl")
    gate: Deferred[None] = Deferred()
    json_upstream.fake.holds[big.filename] = gate
    occupant = await http.get(f"{one.url}/files/big/{big.filename}", unbuffered=True)
    response, body = await get(f"{one.url}/files/gamma/{gamma.filename}")
    assert response.code == 503 and b"downloads are in progress" in body
    assert not one.proxy.files.coordinator.holds(one.proxy.files.key("gamma", gamma.filename))
    gate.callback(None)
    assert await occupant.content() == big.content
    asking = Deferred.fromCoroutine(get(f"{one.url}/files/gamma/{gamma.filename}"))
    response, body = await asking.addTimeout(10, get_reactor())
    assert response.code == 200 and body == gamma.content


@pytest_twisted.ensureDeferred
async def test_an_unreachable_leader_is_waited_for_in_the_store(
    json_upstream: Served,
    redis_server: Redis,
    s3_bucket: S3,
    proxy_factory: Any,
    tmp_path: Path,
    http: Any,
    dists: list[Dist],
) -> None:
    """
    When the leader's peer URL cannot be reached, a follower falls back to
    waiting for the file to land in the shared store.
    """
    from tests.integration.test_operations import sample, scrape
    from tests.servers import free_port

    shared = cluster_settings(redis_server, s3_bucket)
    nowhere = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    one = peer_instance(proxy_factory, json_upstream, tmp_path / "one", shared, peer_url=nowhere)
    two = peer_instance(proxy_factory, json_upstream, tmp_path / "two", shared)
    name = "big-1.0-py3-none-any.whl"
    data = find(dists, name).content
    gate: Deferred[None] = Deferred()
    json_upstream.fake.holds[name] = gate
    lead = await http.get(f"{one.url}/files/big/{name}", unbuffered=True)
    lead_got, lead_half, lead_done = receive_until(lead, 1)
    await lead_half
    following = http.get(f"{two.url}/files/big/{name}")
    peer = {"upstream": "upstream", "kind": "peer"}
    while not sample(await scrape(two.url), "txpypi_upstream_requests_total", **peer, outcome="error"):
        await Deferred.fromCoroutine(two.proxy.files.wait_idle())  # the failed peer flight is over
    gate.callback(None)
    response = await following
    assert response.code == 200 and await response.content() == data
    await lead_done
    assert bytes(lead_got) == data
    assert json_upstream.fake.requests["/packages/" + name] == 1


@pytest_twisted.ensureDeferred
async def test_the_peer_route_answers_only_signed_requests_for_downloads_in_progress(
    json_upstream: Served, proxy_factory: Any, dists: list[Dist]
) -> None:
    from txpypi.core.peer import HEADER, peer_path, sign

    running = proxy_factory(json_upstream.url)
    name = "gamma-0.5-py3-none-any.whl"
    path = peer_path(running.proxy.files.pages.group, "gamma", name)
    url = running.url + path
    clock = running.proxy.clock

    def signed(
        secret: str = SECRET, at: float | None = None, for_path: str = path
    ) -> dict[bytes, list[bytes]]:
        return {HEADER: [sign(secret, for_path, clock.seconds() if at is None else at).encode()]}

    response, _ = await get(url, signed())
    assert response.code == 404  # no peers configured
    running.proxy.files.peer_secret = SECRET
    for headers in (
        None,
        signed("another-secret-456789"),
        signed(at=clock.seconds() - 120),
        signed(for_path="/x"),
    ):
        response, body = await get(url, headers)
        assert response.code == 403 and b"signed" in body
    response, body = await get(url, signed())
    assert response.code == 404 and b"not downloading here" in body
    # Nothing was fetched for the peer.
    assert json_upstream.fake.requests["/packages/" + name] == 0
    # A download in progress is served.
    gate: Deferred[None] = Deferred()
    json_upstream.fake.holds[name] = gate
    client = await get_started(running.url + f"/files/gamma/{name}")
    response, body = await _with_gate(get(url, signed()), gate)
    assert response.code == 200 and body == find(dists, name).content
    await client


async def get_started(url: str) -> Deferred[Any]:
    """
    Start a GET and return (once the response headers arrived) a Deferred
    of its body.
    """
    from twisted.web.client import Agent, readBody

    response = await Agent(get_reactor()).request(b"GET", url.encode())
    return readBody(response)


async def _with_gate(request: Any, gate: Deferred[None]) -> Any:
    gate.callback(None)
    return await request

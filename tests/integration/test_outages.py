"""
Outages of the stores: a real redis-server and a real SeaweedFS S3 server
stopped under running proxies and started again on the same port.  The
proxies keep serving whole, correct files; C{/health}, the metrics and one
log line per outage say what is wrong; and they rejoin once the store is
back.  The outage logic itself is also run on a fake clock.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet import task
from twisted.internet.defer import CancelledError, Deferred, fail, succeed
from twisted.logger import globalLogPublisher
from zope.interface import implementer

from tests.conftest import Served, get_reactor
from tests.fixtures import redis_process, s3_gateway  # noqa: F401  (fixtures)
from tests.integration.test_http_semantics import get
from tests.integration.test_operations import sample, scrape
from tests.integration.test_proxy import find, header
from tests.servers import RedisProcess, S3Gateway
from txpypi.storage.memory import MemoryStore
from txpypi.storage.metadata import MemoryMetadata
from txpypi.storage.outages import Outage, Unavailable, WatchedMetadata, WatchedStore
from txpypi.storage.stores import IFileReader
from txpypi.testing import Dist
from txpypi.web.metrics import Metrics

GAMMA = "gamma-0.5-py3-none-any.whl"
BIG = "big-1.0-py3-none-any.whl"
BETA = "beta-1.1-py3-none-any.whl"


class Events:
    """
    The log events of a test, and Deferreds that fire on the ones awaited.
    """

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self._waiting: list[tuple[Callable[[dict[str, Any]], bool], int, Deferred[None]]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        self.events.append(event)
        for waiting in list(self._waiting):
            matches, n, d = waiting
            if self.count(matches) >= n:
                self._waiting.remove(waiting)
                get_reactor().callLater(0, d.callback, None)

    def count(self, matches: Callable[[dict[str, Any]], bool]) -> int:
        return sum(1 for e in self.events if matches(e))

    def wait(
        self, matches: Callable[[dict[str, Any]], bool], n: int = 1, timeout: float = 20
    ) -> Deferred[None]:
        """
        Fire once C{n} events match (they may have happened already).
        """
        d: Deferred[None] = Deferred()
        if self.count(matches) >= n:
            d.callback(None)
        else:
            self._waiting.append((matches, n, d))
            d.addTimeout(timeout, get_reactor())
        return d


def outage_line(store: str, what: str) -> Callable[[dict[str, Any]], bool]:
    """
    Matches the line that starts (C{"failing"}) or ends (C{"back"}) an outage.
    """
    start = {"failing": "{what} is failing", "back": "{what} is back"}[what]

    def matches(event: dict[str, Any]) -> bool:
        return (
            event.get("log_namespace") == "txpypi.outages"
            and event.get("store") == store
            and event.get("log_format", "").startswith(start)
        )

    return matches


@pytest.fixture
def events() -> Iterator[Events]:
    observer = Events()
    globalLogPublisher.addObserver(observer)
    try:
        yield observer
    finally:
        globalLogPublisher.removeObserver(observer)


async def timed_get(url: str, within: float) -> tuple[Any, bytes]:
    """
    GET C{url}, and check that the answer came within C{within} seconds
    (an outage must not hang requests).
    """
    started = time.monotonic()
    response, body = await get(url)
    took = time.monotonic() - started
    assert took < within, f"{url} took {took:.1f} s"
    return response, body


async def health(url: str) -> tuple[int, dict[str, Any]]:
    response, body = await get(url + "/health")
    return response.code, json.loads(body)


async def idle(running: Any) -> None:
    await Deferred.fromCoroutine(running.proxy.files.wait_idle())


@pytest_twisted.ensureDeferred
async def test_redis_outage_keeps_instances_serving_and_they_rejoin(
    json_upstream: Served,
    redis_process: RedisProcess,  # noqa: F811
    s3_bucket: Any,
    proxy_factory: Any,
    tmp_path: Path,
    http: Any,
    events: Events,
    dists: list[Dist],
) -> None:
    """
    Redis stops under two instances sharing S3.  The one that knows a file
    serves it from S3, the other fetches pages and files from the upstream
    (one fetch for five concurrent clients); nobody waits past the Redis
    timeout; /health says degraded with a 200; one log line per instance
    for the whole outage; download counts are kept.  Redis starts again on
    the same port, empty: both instances rejoin without a restart, and what
    one of them caches then is a hit on the other.
    """
    shared = {
        "store": "s3",
        "s3_bucket": s3_bucket.bucket,
        "s3_prefix": s3_bucket.prefix,
        "s3_endpoint_url": s3_bucket.endpoint,
        "s3_region": "us-east-1",
        "redis": redis_process.url,
        # Under /health's 1 s wait, so that the first /health of an
        # instance that had not noticed yet gets its probe's answer.
        "redis_timeout": 0.5,
    }
    one = proxy_factory(json_upstream.url, tmp_path / "one", **shared)
    two = proxy_factory(json_upstream.url, tmp_path / "two", **shared)
    fake = json_upstream.fake
    gamma, big, beta = (find(dists, name).content for name in (GAMMA, BIG, BETA))
    response, body = await get(f"{one.url}/files/gamma/{GAMMA}")
    assert header(response, "x-cache") == "MISS" and body == gamma
    await idle(one)

    redis_process.stop()
    # The instance that knows the page and the file: memory, then S3.
    response, _ = await timed_get(f"{one.url}/simple/gamma/", 4)
    assert response.code == 200 and header(response, "x-cache") == "HIT"
    response, body = await timed_get(f"{one.url}/files/gamma/{GAMMA}", 4)
    assert header(response, "x-cache") == "HIT" and body == gamma
    assert fake.requests["/packages/" + GAMMA] == 1
    # The other: the upstream, for the page and the file.
    response, _ = await timed_get(f"{two.url}/simple/gamma/", 4)
    assert response.code == 200 and header(response, "x-cache") == "MISS"
    response, body = await timed_get(f"{two.url}/files/gamma/{GAMMA}", 4)
    assert response.code == 200 and body == gamma
    assert fake.requests["/packages/" + GAMMA] == 2
    # Single flight on the instance still holds without the cluster lock.
    gate: Deferred[None] = Deferred()
    fake.holds[BIG] = gate
    readers = [await http.get(f"{two.url}/files/big/{BIG}", unbuffered=True) for _ in range(5)]
    gate.callback(None)
    bodies = [await r.content() for r in readers]
    assert all(r.code == 200 for r in readers) and all(b == big for b in bodies)
    assert fake.requests["/packages/" + BIG] == 1
    await idle(two)
    # The minute's flush of download counts fails: they are kept.
    await Deferred.fromCoroutine(two.proxy.files.flush_accesses())
    assert two.proxy.files._metadata.kept()[1] == 2  # gamma and big

    for running in (one, two):
        code, state = await health(running.url)
        assert code == 200 and state["status"] == "degraded"
        assert state["metadata_store"]["state"] == "failing"
        assert "Redis" in state["metadata_store"]["reason"]
        metrics = await scrape(running.url)
        assert sample(metrics, "txpypi_store_up", store="metadata") == 0
    assert sample(await scrape(two.url), "txpypi_store_errors_total", store="metadata") >= 4
    # The routes that need the metadata store say so in one line.
    response, body = await get(f"{two.url}/stats")
    assert response.code == 503 and body.startswith(b"unavailable:") and body.count(b"\n") == 1
    # Many failed calls, one line per instance; no page-by-page failures, no
    # traceback per file that could not be cached.
    assert events.count(outage_line("metadata", "failing")) == 2
    assert not [e for e in events.events if "could not store page" in e.get("log_format", "")]
    assert not [e for e in events.events if "could not cache" in e.get("log_format", "")]
    assert [e for e in events.events if "not caching" in e.get("log_format", "")]

    redis_process.start()
    await events.wait(outage_line("metadata", "back"), n=2)
    for running in (one, two):
        await running.proxy.files._metadata.outage.recovery
    for running in (one, two):
        code, state = await health(running.url)
        assert code == 200 and state["status"] == "ok", state
        assert sample(await scrape(running.url), "txpypi_store_up", store="metadata") == 1
    # Records are written again: what two caches now is a hit on one.
    response, body = await get(f"{two.url}/files/beta/{BETA}")
    assert header(response, "x-cache") == "MISS" and body == beta
    await idle(two)
    response, body = await get(f"{one.url}/files/beta/{BETA}")
    assert header(response, "x-cache") == "HIT" and body == beta
    assert fake.requests["/packages/" + BETA] == 1
    # The download counts of the outage were written once Redis was back.
    assert two.proxy.files._metadata.kept() == (0, 0)
    response, body = await get(f"{two.url}/stats?project=big")
    assert response.code == 200 and json.loads(body)["project"]["downloads"] == 5


@pytest_twisted.ensureDeferred
async def test_s3_outage_serves_from_the_upstream_and_caching_resumes(
    json_upstream: Served,
    s3_gateway: S3Gateway,  # noqa: F811
    proxy_factory: Any,
    tmp_path: Path,
    events: Events,
    dists: list[Dist],
) -> None:
    """
    S3 stops.  A cached file whose object cannot be read is streamed from
    the upstream; a file not cached yet is streamed and not cached; the
    record of the cached one is kept; /health says degraded with a 200;
    one log line for the outage.  S3 starts again on the same port: the
    instance finds out by itself, the next miss is cached, and the file
    cached before the outage is a hit again without a new fetch.
    """
    bucket = s3_gateway.bucket
    running = proxy_factory(
        json_upstream.url,
        tmp_path / "cache",
        store="s3",
        s3_bucket=bucket.bucket,
        s3_prefix=bucket.prefix,
        s3_endpoint_url=bucket.endpoint,
        s3_region="us-east-1",
        s3_timeout=1.0,
    )
    fake = json_upstream.fake
    files = running.proxy.files
    gamma, big = find(dists, GAMMA).content, find(dists, BIG).content
    response, body = await get(f"{running.url}/files/gamma/{GAMMA}")
    assert header(response, "x-cache") == "MISS" and body == gamma
    await idle(running)
    response, body = await get(f"{running.url}/files/gamma/{GAMMA}")
    assert header(response, "x-cache") == "HIT" and body == gamma
    errors_before = sample(await scrape(running.url), "txpypi_store_errors_total", store="files")

    s3_gateway.stop()
    # A hit whose object cannot be opened: from the upstream, whole.
    response, body = await timed_get(f"{running.url}/files/gamma/{GAMMA}", 6)
    assert response.code == 200 and header(response, "x-cache") == "MISS" and body == gamma
    assert fake.requests["/packages/" + GAMMA] == 2
    # A miss: streamed to the client, not cached.
    response, body = await timed_get(f"{running.url}/files/big/{BIG}", 6)
    assert response.code == 200 and body == big
    await idle(running)
    metadata = files._metadata
    assert await metadata.get_file(files.key("big", BIG)) is None
    assert await metadata.get_file(files.key("gamma", GAMMA)) is not None  # kept for later

    code, state = await health(running.url)
    assert code == 200 and state["status"] == "degraded"
    assert state["file_store"]["state"] == "failing" and state["file_store"]["reason"]
    assert state["metadata_store"]["state"] == "ok"
    metrics = await scrape(running.url)
    assert sample(metrics, "txpypi_store_up", store="files") == 0
    assert sample(metrics, "txpypi_store_errors_total", store="files") > errors_before
    assert events.count(outage_line("files", "failing")) == 1

    s3_gateway.start()
    await events.wait(outage_line("files", "back"))
    code, state = await health(running.url)
    assert code == 200 and state["status"] == "ok"
    response, body = await get(f"{running.url}/files/big/{BIG}")
    assert header(response, "x-cache") == "MISS" and body == big
    await idle(running)
    response, body = await get(f"{running.url}/files/big/{BIG}")
    assert header(response, "x-cache") == "HIT" and body == big
    response, body = await get(f"{running.url}/files/gamma/{GAMMA}")
    assert header(response, "x-cache") == "HIT" and body == gamma
    assert fake.requests["/packages/" + BIG] == 2 and fake.requests["/packages/" + GAMMA] == 2
    assert events.count(outage_line("files", "failing")) == 1


@pytest_twisted.ensureDeferred
async def test_redis_down_at_start_up(
    json_upstream: Served,
    redis_process: RedisProcess,  # noqa: F811
    proxy_factory: Any,
    tmp_path: Path,
    events: Events,
    dists: list[Dist],
) -> None:
    """
    An instance started while Redis is down serves pages and files, and
    rejoins when Redis comes: it learns the cache's size it could not read
    at start-up, and records what it caches from then on.
    """
    redis_process.stop()
    running = proxy_factory(json_upstream.url, tmp_path / "cache", redis=redis_process.url, redis_timeout=1.0)
    files = running.proxy.files
    response, body = await timed_get(f"{running.url}/files/gamma/{GAMMA}", 4)
    assert response.code == 200 and body == find(dists, GAMMA).content
    await idle(running)
    assert files.usage.size is None  # unknown: Redis could not tell at start-up
    code, state = await health(running.url)
    assert code == 200 and state["metadata_store"]["state"] == "failing"

    redis_process.start()
    await events.wait(outage_line("metadata", "back"))
    await files._metadata.outage.recovery  # the cache's size, read again
    assert (files.usage.size, files.usage.count) == (0, 0)  # Redis came back empty
    response, body = await get(f"{running.url}/files/beta/{BETA}")
    assert response.code == 200 and body == find(dists, BETA).content
    await idle(running)
    assert (files.usage.size, files.usage.count) == (len(find(dists, BETA).content), 1)
    response, _ = await get(f"{running.url}/files/beta/{BETA}")
    assert header(response, "x-cache") == "HIT"


@pytest_twisted.ensureDeferred
async def test_redis_that_hangs_holds_nobody_up(
    json_upstream: Served,
    redis_process: RedisProcess,  # noqa: F811
    proxy_factory: Any,
    tmp_path: Path,
    events: Events,
    dists: list[Dist],
) -> None:
    """
    A Redis that stops answering but keeps its connections open (frozen
    with SIGSTOP): the first call waits for the timeout, the calls after it
    fail at once, so a request is not held up once per call; when Redis
    answers again, the instance rejoins.
    """
    running = proxy_factory(json_upstream.url, tmp_path / "cache", redis=redis_process.url, redis_timeout=1.0)
    response, _ = await get(f"{running.url}/simple/alpha/")
    assert header(response, "x-cache") == "MISS"

    redis_process.pause()
    # Three metadata calls before the first byte (a page read, a record
    # read, the cluster lock): each waiting its timeout would take 3 s.
    for name, project in ((GAMMA, "gamma"), (BETA, "beta")):
        response, body = await timed_get(f"{running.url}/files/{project}/{name}", 2.5)
        assert response.code == 200 and body == find(dists, name).content
    code, state = await health(running.url)
    assert code == 200 and state["metadata_store"]["state"] == "failing"
    assert events.count(outage_line("metadata", "failing")) == 1

    redis_process.resume()
    await events.wait(outage_line("metadata", "back"))
    code, state = await health(running.url)
    assert code == 200 and state["status"] == "ok"
    await idle(running)
    response, _ = await get(f"{running.url}/files/alpha/alpha-1.0-py3-none-any.whl")
    assert response.code == 200
    await idle(running)
    response, _ = await get(f"{running.url}/files/alpha/alpha-1.0-py3-none-any.whl")
    assert header(response, "x-cache") == "HIT"


# -- the outage logic, on a fake clock


class FakePool:
    """
    Stands in for a txredisapi pool: its commands answer when the test
    says, and its factory says what txredisapi's says about connections.
    """

    def __init__(self) -> None:
        self.sent: list[str] = []
        self.answers: list[Deferred[Any]] = []
        self.disconnected = False
        self._factory = type("Factory", (), {"stopped": False, "size": 8, "disconnectCalled": False})()

    def __getattr__(self, method: str) -> Callable[..., Deferred[Any]]:
        def send(*args: Any, **kwargs: Any) -> Deferred[Any]:
            self.sent.append(method)
            d: Deferred[Any] = Deferred()
            self.answers.append(d)
            return d

        return send

    def disconnect(self) -> Deferred[None]:
        self.disconnected = True
        return succeed(None)


def test_redis_link_bounds_calls_and_fails_at_once_while_down() -> None:
    """
    A call that gets no answer fails after the timeout; then calls fail at
    once without reaching Redis, except the probe and one call per
    timeout; an answer ends it.  A pool txredisapi gave up on is replaced.
    """
    import txredisapi

    from txpypi.storage.redismeta import Link

    clock = task.Clock()
    pools = [FakePool(), FakePool()]
    link = Link(pools[0], timeout=2, clock=clock, reconnect=lambda: pools[1])
    results: list[Any] = []

    def call(method: str = "get") -> None:
        Deferred.fromCoroutine(link.call(method, "k")).addBoth(results.append)

    call()
    assert not results and not link.down
    clock.advance(2)
    assert isinstance(results[-1].value, Unavailable) and "within 2 s" in str(results[-1].value)
    assert link.down
    call()
    assert "Redis is down" in str(results[-1].value) and len(pools[0].sent) == 1  # not sent
    clock.advance(2)  # one call goes through, as a probe: it fails
    call()
    pools[0].answers[-1].errback(txredisapi.ConnectionError("Lost connection"))
    assert "Lost connection" in str(results[-1].value) and len(pools[0].sent) == 2
    probe = Deferred.fromCoroutine(link.probe())  # goes through while down
    assert pools[0].sent[-1] == "ping"
    pools[0].answers[-1].callback("PONG")
    assert probe.called and not link.down
    call()
    pools[0].answers[-1].callback("v")
    assert results[-1] == "v"

    # txredisapi stopped reconnecting and lost its last connection.
    pools[0]._factory.stopped, pools[0]._factory.size = True, 0
    call()
    assert pools[0].disconnected and pools[1].sent == ["get"] and link.redis is pools[1]


class Broken(MemoryMetadata):
    """
    Memory metadata that fails every call while C{broken}.
    """

    broken: bool = False

    def _maybe(self, result: Any) -> Any:
        return fail(ConnectionError("connection refused")) if self.broken else succeed(result)

    def ping(self) -> Deferred[None]:
        return self._maybe(None)  # type: ignore[no-any-return]

    def get_page(self, key: str) -> Any:
        return self._maybe(self.pages.get(key))

    def add_downloads(self, counts: dict[tuple[str, str, str], int]) -> Deferred[None]:
        if self.broken:
            return fail(ConnectionError("connection refused"))
        return super().add_downloads(counts)


def test_one_line_per_outage_probes_and_recovery(events: Events) -> None:
    """
    Failed calls are counted each and logged once; the store is probed
    soon after the first failure, then every C{retry} seconds, and when a
    probe works the outage ends: one line, the gauge back at 1, the
    recovery hooks run, and the download counts kept meanwhile written.
    """
    clock = task.Clock()
    metrics = Metrics.create()
    inner = Broken()
    outage = Outage("metadata", "the metadata store (test)", clock, retry=5, metrics=metrics)
    watched = WatchedMetadata(inner, outage)
    recovered: list[bool] = []
    outage.on_recovery(lambda: recovered.append(True))

    def errors() -> float:
        return metrics.registry.get_sample_value("txpypi_store_errors_total", {"store": "metadata"}) or 0

    def up() -> float | None:
        return metrics.registry.get_sample_value("txpypi_store_up", {"store": "metadata"})

    assert up() == 1
    inner.broken = True
    for _ in range(3):
        failures: list[Any] = []
        watched.get_page("k").addErrback(failures.append)
        assert isinstance(failures[0].value, Unavailable) and "connection refused" in str(failures[0].value)
    watched.add_downloads({("p", "1.0", "p-1.0.whl"): 2})
    watched.add_downloads({("p", "1.0", "p-1.0.whl"): 1})
    assert errors() == 5 and up() == 0 and outage.down
    assert events.count(outage_line("metadata", "failing")) == 1
    assert watched.kept() == (0, 1)

    clock.advance(1)  # the first probe, soon: fails
    clock.advance(4.9)
    assert outage.down and not recovered
    inner.broken = False
    clock.advance(0.1)  # the next, retry seconds later: works
    assert not outage.down and up() == 1 and recovered == [True]
    assert events.count(outage_line("metadata", "back")) == 1
    assert errors() == 5  # probes are not calls
    assert watched.kept() == (0, 0) and inner.downloads == {("p", "1.0", "p-1.0.whl"): 3}
    assert not clock.getDelayedCalls()  # no probing while it works


@implementer(IFileReader)
class Hanging:
    """
    A stored file whose reads answer only when told (a slow store).
    """

    size = 10

    def __init__(self) -> None:
        self.reads: list[Deferred[bytes]] = []

    def read(self, offset: int, length: int) -> Deferred[bytes]:
        d: Deferred[bytes] = Deferred()
        self.reads.append(d)
        return d

    def close(self) -> None:
        pass


def test_a_read_its_caller_cancels_is_not_an_outage(tmp_path: Path) -> None:
    """
    Clients that leave cancel the store reads made for them (wrk's
    connections closing at the end of a run did it to dozens at once):
    that is no failure of the store, and the next miss is still cached.
    A read that fails on its own is one.
    """
    clock = task.Clock()
    metrics = Metrics.create()
    hanging = Hanging()

    class Slow(MemoryStore):
        def open(self, key: str) -> Deferred[IFileReader | None]:
            return succeed(hanging)

    inner = Slow(str(tmp_path))
    outage = Outage("files", "the file store (test)", clock, metrics=metrics)
    store = WatchedStore(inner, outage)
    opened: list[Any] = []
    store.open("k").addCallback(opened.append)
    reader = opened[0]
    for _ in range(10):
        reader.read(0, 10).addErrback(lambda f: f.trap(CancelledError)).cancel()
    assert not outage.down and outage.failures == 0
    assert metrics.registry.get_sample_value("txpypi_store_errors_total", {"store": "files"}) in (None, 0)

    failed: list[Any] = []
    reader.read(0, 10).addErrback(failed.append)
    hanging.reads[-1].errback(OSError("the volume server is gone"))
    assert outage.down and isinstance(failed[0].value, Unavailable)

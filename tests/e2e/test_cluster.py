"""
Issue #6 with real processes: three C{twistd -n txpypi} instances sharing one
redis-server and one SeaweedFS.  Thirty clients spread over them cost the
upstream one fetch of a 50 MB file; an install through one instance makes
the next one through another ask the upstream for no file; and when the
instance fetching a file is killed with SIGKILL, its lock expires, another
instance takes the fetch over, and no client ever gets wrong bytes.

Outages: the Redis, then the S3 server, stopped under the three instances
and started again on the same port.  They keep serving exact bytes, say so
in C{/health}, their metrics and one log line each, and rejoin by
themselves.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import attrs
import pytest
import pytest_twisted
from treq.client import HTTPClient
from twisted.internet.defer import Deferred, DeferredList, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.web._newclient import HTTP11ClientProtocol
from twisted.web._newclient import Request as ClientRequest
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers
from twisted.web.server import Request, Site

from tests.conftest import clean_env, get_reactor, listen
from tests.e2e.test_install import assert_imports, run
from tests.fixtures import redis_process, s3_gateway  # noqa: F401
from tests.integration.test_operations import sample
from tests.integration.test_proxy import find, header
from tests.processes import Twistd, first_to_log, logs
from tests.servers import S3, Redis, RedisProcess, S3Gateway, SeaweedFS
from txpypi.storage.s3 import PROBE_KEY
from txpypi.storage.stores import file_key
from txpypi.testing import Dist, FakeUpstream, build_wheel

T = TypeVar("T")

#: The size issue #6 asks for.
HUGE_PADDING = 50 * 1024 * 1024
#: Short, so that a dead leader's lock expires within the test.
LOCK_TTL = 3


@functools.cache
def digest(dist: Dist) -> str:
    """
    C{dist.sha256}, computed once (it hashes the whole content each time).
    """
    return dist.sha256


def within(d: Deferred[T], seconds: float, what: str) -> Deferred[T]:
    """
    C{d}'s result, or a failure naming C{what} after C{seconds}: every wait
    is bounded.  C{d} itself is left alone (not cancelled).
    """
    out: Deferred[T] = Deferred()

    def expired() -> None:
        out.errback(AssertionError(f"timed out after {seconds} s waiting for {what}"))

    timer = get_reactor().callLater(seconds, expired)

    def settled(result: T | Failure) -> T | None:
        if timer.active():
            timer.cancel()
            if isinstance(result, Failure):
                out.errback(result)
            else:
                out.callback(result)
        return None if isinstance(result, Failure) else result

    d.addBoth(settled)
    return out


@pytest.fixture(scope="module")
def huge() -> Dist:
    """
    A real wheel of a little over 50 MB, with an incompressible payload.
    """
    return build_wheel("huge", "1.0", padding=HUGE_PADDING)


class WatchedUpstream(FakeUpstream):
    """
    The fake upstream, which can also tell when a path has been asked for a
    number of times.
    """

    def __init__(self, dists: Iterable[Dist]) -> None:
        super().__init__(dists, mode="json")
        self._waiting: list[tuple[str, int, Deferred[None]]] = []

    def requested(self, path: str, times: int = 1) -> Deferred[None]:
        """
        Fire once C{path} has been asked for C{times} times (past or future).
        """
        d: Deferred[None] = Deferred()
        self._waiting.append((path, times, d))
        self._notify()
        return d

    def render(self, request: Request) -> bytes | int:  # type: ignore[override]
        try:
            return super().render(request)
        finally:
            self._notify()

    def _notify(self) -> None:
        for entry in list(self._waiting):
            path, times, d = entry
            if self.requests[path] >= times:
                self._waiting.remove(entry)
                # Out of render: the test goes on once the request is handled.
                get_reactor().callLater(0, d.callback, None)

    def file_counts(self) -> dict[str, int]:
        """
        How many times each file (not page) was asked for.
        """
        prefix = "/packages/"
        return {p.removeprefix(prefix): n for p, n in self.requests.items() if p.startswith(prefix)}


@attrs.frozen
class Upstream:
    fake: WatchedUpstream
    port: Any

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port.getHost().port}/simple/"


def serve(dists: Iterable[Dist]) -> Iterator[Upstream]:
    fake = WatchedUpstream(dists)
    port = listen(Site(fake))
    yield Upstream(fake, port)
    for gate in fake.holds.values():  # a test that failed half-way
        if not gate.called:
            gate.callback(None)
    pytest_twisted.blockon(port.stopListening())


@pytest.fixture
def upstream(dists: list[Dist], huge: Dist) -> Iterator[Upstream]:
    """
    conftest's small alpha -> beta -> gamma tree and the 50 MB wheel.
    """
    yield from serve([*dists, huge])


@pytest.fixture
def small_upstream(dists: list[Dist]) -> Iterator[Upstream]:
    """
    conftest's small alpha -> beta -> gamma tree only (no 50 MB wheel to
    build).
    """
    yield from serve(dists)


@attrs.frozen
class Cluster:
    processes: list[Twistd]
    urls: list[str]


def instance_args(upstream: Upstream, redis_url: str, s3: S3) -> list[str]:
    """
    The options of an instance of a cluster (but its cache directory).
    """
    return [
        *("--upstream", upstream.url, "--listen", "tcp:0:interface=127.0.0.1"),
        *("--store", "s3", "--s3-bucket", s3.bucket, "--s3-prefix", s3.prefix),
        *("--s3-endpoint-url", s3.endpoint, "--s3-region", "us-east-1"),
        *("--redis", redis_url, "--lock-ttl", str(LOCK_TTL)),
    ]


@contextmanager
def run_cluster(args: list[str], tmp_path: Path) -> Iterator[Cluster]:
    """
    Three real instances with C{args}, each with its own cache directory
    (spool files), started at once.  The S3 credentials reach them through
    the environment (clean_env, set by the seaweedfs fixture).  They are
    killed at the end; their logs are printed, which pytest shows when the
    test failed.
    """
    processes = [Twistd.start([*args, "--cache-dir", str(tmp_path / f"i{n}")], tmp_path) for n in (1, 2, 3)]
    try:
        listening = gatherResults([p.listening for p in processes])
        ports = pytest_twisted.blockon(within(listening, 60, "the instances to listen"))
        yield Cluster(processes, [f"http://127.0.0.1:{port}" for port in ports])
    finally:
        for process in processes:
            pytest_twisted.blockon(process.kill())
        print(logs(processes, 20000))


@pytest.fixture
def cluster(upstream: Upstream, redis_server: Redis, s3_bucket: S3, tmp_path: Path) -> Iterator[Cluster]:
    """
    Three real instances sharing the Redis and the S3 prefix.
    """
    with run_cluster(instance_args(upstream, redis_server.url, s3_bucket), tmp_path) as running:
        yield running


class Checked(Protocol):
    """
    A response body, compared with the bytes it should be as they arrive
    (without keeping them), and hashed.
    """

    def __init__(self, expected: bytes) -> None:
        self._expected = memoryview(expected)
        self._hash = hashlib.sha256()
        self.received = 0
        #: Where the first byte that differs from the expected ones came.
        self.wrong_at: int | None = None
        self.first: Deferred[None] = Deferred()
        self.done: Deferred[None] = Deferred()
        self.reason: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        end = self.received + len(data)
        if self.wrong_at is None and self._expected[self.received : end] != data:
            expected = self._expected[self.received : end]
            self.wrong_at = self.received + next(
                (i for i, (a, b) in enumerate(zip(expected, data, strict=False)) if a != b),
                min(len(expected), len(data)),
            )
        self._hash.update(data)
        self.received = end
        if not self.first.called:
            self.first.callback(None)

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.reason = reason
        if not self.first.called:
            self.first.callback(None)
        self.done.callback(None)

    def sha256(self) -> str:
        return self._hash.hexdigest()


@attrs.define
class Download:
    """
    One client's GET of a file: its response (or the failure to get one)
    and its body.
    """

    dist: Dist
    body: Checked
    response: Any = None
    failure: Failure | None = None
    #: Fires once the request is written to its connection (or failed).
    sent: Deferred[None] = attrs.field(factory=Deferred)
    #: Fires when the headers came, or the request failed.
    answered: Deferred[None] = attrs.field(factory=Deferred)

    @property
    def done(self) -> Deferred[None]:
        return self.body.done

    def verdict(self) -> str:
        """
        C{"whole"}: the whole file, correct and cleanly ended.  C{"aborted"}:
        the connection was cut, after at most a correct but short prefix.
        Anything else says what was wrong.
        """
        size = len(self.dist.content)
        if self.body.wrong_at is not None:
            return f"wrong bytes from offset {self.body.wrong_at}"
        if self.failure is not None:
            return "aborted"  # no response at all
        if self.response.code != 200:
            return f"status {self.response.code}"
        if self.response.length != size:
            return f"Content-Length {self.response.length}, not {size}"
        if self.body.reason is None or not self.body.reason.check(ResponseDone):
            return "aborted" if self.body.received < size else "a cut connection after every byte"
        if self.body.received != size or self.body.sha256() != digest(self.dist):
            return f"a clean end after {self.body.received} bytes, sha256 {self.body.sha256()}"
        return "whole"

    @property
    def x_cache(self) -> str | None:
        return None if self.response is None else header(self.response, "x-cache")


def download(base: str, dist: Dist) -> Download:
    """
    Start a GET of C{dist} through the instance at C{base}, on a connection
    of its own (closed after the response), so that the test knows when the
    request was written.
    """
    dl = Download(dist, Checked(dist.content))
    host = base.removeprefix("http://")
    port = int(host.rsplit(":", 1)[1])
    path = f"/files/{dist.project}/{dist.filename}".encode()

    def connected(protocol: HTTP11ClientProtocol) -> Deferred[Any]:
        answer: Deferred[Any] = protocol.request(
            ClientRequest(b"GET", path, Headers({b"host": [host.encode()]}), None, persistent=False)
        )
        dl.sent.callback(None)
        return answer

    def answered(response: Any) -> None:
        dl.response = response
        response.deliverBody(dl.body)
        dl.answered.callback(None)

    def failed(failure: Failure) -> None:
        dl.failure = failure
        if not dl.sent.called:
            dl.sent.callback(None)
        dl.answered.callback(None)
        dl.body.connectionLost(failure)

    d = connectProtocol(TCP4ClientEndpoint(get_reactor(), "127.0.0.1", port), HTTP11ClientProtocol())
    d.addCallback(connected).addCallbacks(answered, failed)
    return dl


async def arrived(http: HTTPClient, downloads: list[Download], urls: list[str]) -> None:
    """
    Return once the requests of C{downloads} are inside the instances at
    C{urls}: each was written, and then each instance answered a C{/health},
    which waits on a Redis round trip, while the instance reads (and starts
    handling) what reached it before.  There is no other event to wait on:
    a client waiting for another instance's fetch gets no byte yet.
    """
    await gatherResults([dl.sent for dl in downloads])
    for url in urls:
        response = await http.get(f"{url}/health")
        await response.content()


def when_answered(downloads: list[Download], n: int) -> Deferred[None]:
    """
    Fire once C{n} of C{downloads} have their headers (or failed).
    """
    d: Deferred[None] = Deferred()
    count = [0]

    def one(_: object) -> None:
        count[0] += 1
        if count[0] == n:
            d.callback(None)

    for dl in downloads:
        dl.answered.addCallback(one)
    return d


def cached(filename: str) -> bytes:
    """
    The log line of a file landing in the shared store.
    """
    return rb"cached " + re.escape(filename.encode()) + rb" \("


@pytest_twisted.ensureDeferred
async def test_thirty_clients_one_upstream_fetch(
    cluster: Cluster, upstream: Upstream, http: HTTPClient, huge: Dist
) -> None:
    """
    30 clients, 10 on each instance, ask at once for one uncached 50 MB
    file.  The upstream holds its second half back until all 30 requests
    are inside the instances and 10 clients have their headers (the
    leader's, joined to its fetch), so every client arrives while the fetch
    is in progress.  The upstream serves the file exactly once; all 30
    clients get every byte, correct; afterwards it is a hit on every
    instance.
    """
    path = "/packages/" + huge.filename
    gate: Deferred[None] = Deferred()
    upstream.fake.holds[huge.filename] = gate
    downloads = [download(url, huge) for url in cluster.urls for _ in range(10)]
    await within(Deferred.fromCoroutine(arrived(http, downloads, cluster.urls)), 30, "the 30 requests")
    await within(upstream.fake.requested(path), 30, "the upstream GET")
    await within(when_answered(downloads, 10), 30, "the leader's clients' headers")
    gate.callback(None)
    await within(gatherResults([dl.done for dl in downloads]), 120, "the 30 downloads")

    verdicts = [dl.verdict() for dl in downloads]
    assert verdicts == ["whole"] * 30
    assert upstream.fake.requests[path] == 1
    states = [dl.x_cache for dl in downloads]
    assert set(states) <= {"MISS", "HIT"} and states.count("MISS") >= 10, states

    # It landed (the line comes after the record is written to Redis): a hit
    # on every instance, and the upstream is not asked again.
    await within(first_to_log(cluster.processes, cached(huge.filename)), 60, "the file to land")
    for url in cluster.urls:
        response = await http.head(f"{url}/files/huge/{huge.filename}")
        assert response.code == 200
        assert header(response, "x-cache") == "HIT"
        assert header(response, "content-length") == str(len(huge.content))
    assert upstream.fake.file_counts() == {huge.filename: 1}


async def pip_install(index: str, target: Path, *packages: str) -> str:
    """
    Real pip over plain HTTP on loopback (a secure origin for pip), with the
    machine's configuration shut out.
    """
    argv = [sys.executable, "-m", "pip", "install", "--no-cache-dir", "--disable-pip-version-check"]
    argv += ["--isolated", "--index-url", index, "--target", str(target), *packages]
    return await run(argv, clean_env())


@pytest_twisted.ensureDeferred
async def test_install_through_another_instance_fetches_no_file(
    cluster: Cluster, upstream: Upstream, tmp_path: Path
) -> None:
    """
    C{pip install alpha} (alpha -> beta -> gamma) through instance 1, then
    through instance 2: the second install asks the upstream for no file.
    """
    first, second = cluster.urls[0], cluster.urls[1]
    await pip_install(f"{first}/simple/", tmp_path / "one", "alpha")
    await assert_imports(tmp_path / "one")
    cold = upstream.fake.file_counts()
    wanted = {"alpha-1.0-py3-none-any.whl", "beta-1.1-py3-none-any.whl", "gamma-0.5-py3-none-any.whl"}
    assert {name for name in cold if not name.endswith(".metadata")} == wanted
    assert set(cold.values()) == {1}
    # Everything instance 1 fetched has landed in S3 and Redis.
    landed = [cluster.processes[0].wait_for(cached(name)) for name in cold]
    await within(gatherResults(landed), 60, f"{sorted(cold)} to land")

    await pip_install(f"{second}/simple/", tmp_path / "two", "alpha")
    await assert_imports(tmp_path / "two")
    assert upstream.fake.file_counts() == cold
    assert b"fetching " not in cluster.processes[1].output


def list_prefix(s3: S3) -> tuple[list[tuple[str, int]], list[str]]:
    """
    The objects under the test's prefix (key, size), and the multipart
    uploads still open there (blocking: run it in a thread).
    """
    client: Any = s3.client()
    listed = client.list_objects_v2(Bucket=s3.bucket, Prefix=s3.prefix)
    objects = [(o["Key"], o["Size"]) for o in listed.get("Contents", []) if not o["Key"].endswith(PROBE_KEY)]
    uploads = client.list_multipart_uploads(Bucket=s3.bucket, Prefix=s3.prefix)
    return objects, [u["Key"] for u in uploads.get("Uploads", [])]


@pytest_twisted.ensureDeferred
async def test_kill_9_the_leader_mid_download(
    cluster: Cluster, upstream: Upstream, http: HTTPClient, huge: Dist, s3_bucket: S3
) -> None:
    """
    Instance 1 leads the fetch of the 50 MB file (the upstream holds its
    second half), instances 2 and 3 have clients waiting for it, and
    instance 1 is killed with SIGKILL.  Its client is cut short.  Its lock
    expires and another instance fetches the file again.  Each client of 2
    and 3 gets either the whole, correct file or an aborted connection
    (with at most a correct prefix), never anything else; the file then is
    a hit; the upstream served it twice in all; S3 holds one object for it,
    whole, and no unfinished upload.
    """
    path = "/packages/" + huge.filename
    one, *others = cluster.processes
    gate: Deferred[None] = Deferred()
    upstream.fake.holds[huge.filename] = gate
    leader = download(cluster.urls[0], huge)
    await within(upstream.fake.requested(path), 30, "the upstream GET")
    await within(leader.body.first, 30, "the first bytes through instance 1")
    # Instance 1 holds the cluster lock and streams: the others follow.
    followers = [download(url, huge) for url in cluster.urls[1:] for _ in range(3)]
    await within(Deferred.fromCoroutine(arrived(http, followers, cluster.urls[1:])), 30, "the followers")
    await within(one.kill(), 10, "instance 1 to die")
    await within(leader.done, 10, "instance 1's client to be cut off")
    assert leader.verdict() == "aborted" and leader.body.received < len(huge.content)

    # A waiting instance takes over once the lock expires.  (Should every
    # follower have been aborted with the leader and none take over, a
    # fresh request must.)
    taken_over = upstream.fake.requested(path, 2)
    all_ended: Deferred[None] = gatherResults([dl.done for dl in followers]).addCallback(lambda _: None)
    either = DeferredList([taken_over, all_ended], fireOnOneCallback=True)
    await within(either, 4 * LOCK_TTL + 20, "a takeover, or every follower to end")
    late: list[Download] = []
    if not taken_over.called:
        late.append(download(cluster.urls[1], huge))
    await within(taken_over, 4 * LOCK_TTL + 20, "a second upstream GET (a takeover)")
    gate.callback(None)
    await within(gatherResults([dl.done for dl in followers + late]), 120, "the followers' downloads")

    verdicts = [dl.verdict() for dl in followers]
    assert set(verdicts) <= {"whole", "aborted"}, verdicts
    assert [dl.verdict() for dl in late] in ([], ["whole"])

    # The new leader landed it: a fresh request is a hit, whole and correct.
    await within(first_to_log(others, cached(huge.filename)), 60, "the new leader to land the file")
    fresh = download(cluster.urls[1], huge)
    await within(fresh.done, 60, "a download of the cached file")
    assert fresh.verdict() == "whole" and fresh.x_cache == "HIT"
    assert upstream.fake.file_counts() == {huge.filename: 2}
    assert b"cached huge" not in one.output

    objects, uploads = await deferToThread(list_prefix, s3_bucket)
    key = s3_bucket.prefix.strip("/") + "/" + file_key(digest(huge), huge.filename)
    assert objects == [(key, len(huge.content))]
    # The dead leader's multipart upload of the file may remain, never
    # completed (a bucket lifecycle rule removes such uploads); no other.
    assert uploads in ([], [key]), uploads


# -- outages: the Redis and the S3 server every instance shares, stopped under them

#: C{--redis-timeout} and C{--s3-timeout}: how long a call waits, and how
#: often a store that is down is tried again.
OUTAGE_TIMEOUT = 1

WARM_UP_KEY = "txpypi-warm-up"

BETA = "beta-1.1-py3-none-any.whl"
GAMMA = "gamma-0.5-py3-none-any.whl"

#: The log lines that start and end an outage (L{txpypi.storage.outages.Outage}).
REDIS_FAILING = rb"the metadata store \(Redis\) is failing: "
REDIS_BACK = rb"the metadata store \(Redis\) is back after "
S3_FAILING = rb"the file store \(S3\) is failing: "
S3_BACK = rb"the file store \(S3\) is back after "


@attrs.frozen
class OutageCluster:
    """
    Three instances whose Redis and S3 server the test may stop and start.
    """

    cluster: Cluster
    redis: RedisProcess
    gateway: S3Gateway
    #: The instances' bucket and prefix, through the session's own S3
    #: server: readable while the gateway is stopped.
    direct: S3

    @property
    def urls(self) -> list[str]:
        return self.cluster.urls

    @property
    def processes(self) -> list[Twistd]:
        return self.cluster.processes


@pytest.fixture
def outage_cluster(
    small_upstream: Upstream,
    redis_process: RedisProcess,  # noqa: F811
    s3_gateway: S3Gateway,  # noqa: F811
    seaweedfs: SeaweedFS,
    tmp_path: Path,
) -> Iterator[OutageCluster]:
    """
    Three real instances sharing a Redis and an S3 gateway (in front of the
    session's SeaweedFS filer) that can each be stopped and started again
    on the same port, with short store timeouts.
    """
    bucket = s3_gateway.bucket
    # A first write may wait for SeaweedFS to grow volumes for the bucket,
    # which can take longer than the instances' short S3 timeout: make it
    # here, with boto3's default timeout, outside the test's prefix.
    client: Any = bucket.client()
    client.put_object(Bucket=bucket.bucket, Key=WARM_UP_KEY, Body=b"warm-up")
    client.delete_object(Bucket=bucket.bucket, Key=WARM_UP_KEY)
    args = instance_args(small_upstream, redis_process.url, bucket)
    args += ["--redis-timeout", str(OUTAGE_TIMEOUT), "--s3-timeout", str(OUTAGE_TIMEOUT)]
    direct = attrs.evolve(bucket, endpoint=seaweedfs.endpoint)
    with run_cluster(args, tmp_path) as cluster:
        yield OutageCluster(cluster, redis_process, s3_gateway, direct)


async def fetch(base: str, dist: Dist) -> Download:
    """
    A whole GET of C{dist} through the instance at C{base} (bounded).
    """
    dl = download(base, dist)
    await within(dl.done, 30, f"{dist.filename} from {base}")
    return dl


async def metrics(http: HTTPClient, base: str) -> str:
    response = await within(http.get(f"{base}/metrics"), 10, f"{base}/metrics")
    assert response.code == 200
    body: bytes = await response.content()
    return body.decode()


async def health(http: HTTPClient, base: str) -> tuple[int, dict[str, Any]]:
    response = await within(http.get(f"{base}/health"), 10, f"{base}/health")
    body = await response.content()
    return response.code, json.loads(body)


async def all_logged(outage: OutageCluster, line: bytes, what: str) -> None:
    logged = gatherResults([p.wait_for(line) for p in outage.processes])
    await within(logged, 30, f"{what} in every log")


async def noticed(http: HTTPClient, outage: OutageCluster, line: bytes) -> None:
    """
    Return once every instance logged C{line}: each is asked for its
    C{/health}, which asks the stores, so that an instance that had no
    reason to call the stopped store finds out too.
    """
    for url in outage.urls:
        await health(http, url)
    await all_logged(outage, line, repr(line))


def not_cached(filename: str) -> bytes:
    """
    The log line of a verified download that could not be cached (a store
    is down).
    """
    return rb"(?:could not cache|not caching) " + re.escape(filename.encode()) + rb"\b"


def count(process: Twistd, line: bytes) -> int:
    return len(re.findall(line, process.output))


async def lands_and_hits(outage: Any, beta: Dist) -> None:
    """
    Caching works across the cluster: beta is a whole miss through
    instance 2, lands, and is a whole hit on instances 3 and 1.
    """
    dl = await fetch(outage.urls[1], beta)
    assert (dl.verdict(), dl.x_cache) == ("whole", "MISS")
    await within(outage.processes[1].wait_for(cached(BETA)), 30, "beta to land")
    for url in (outage.urls[2], outage.urls[0]):
        dl = await fetch(url, beta)
        assert (dl.verdict(), dl.x_cache) == ("whole", "HIT"), url


@pytest_twisted.ensureDeferred
async def test_redis_outage_under_three_instances(
    outage_cluster: OutageCluster, small_upstream: Upstream, http: HTTPClient, dists: list[Dist]
) -> None:
    """
    Redis stops under three instances.  Each still serves a file it had
    served before from S3 (a hit, exact bytes) and fetches an uncached one
    from the upstream once for all of its three clients (exact bytes);
    /health answers 200 "degraded" naming the metadata store, and each log
    has one outage line.  Redis starts again on the same port (empty): each
    instance finds out by itself and is "ok" again, and a new miss through
    one instance lands and is a hit on the others.
    """
    outage, fake = outage_cluster, small_upstream.fake
    beta, gamma = find(dists, BETA), find(dists, GAMMA)
    first = await fetch(outage.urls[0], gamma)
    assert (first.verdict(), first.x_cache) == ("whole", "MISS")
    await within(outage.processes[0].wait_for(cached(GAMMA)), 30, "gamma to land")
    for url in outage.urls:  # each instance learns the file's record
        dl = await fetch(url, gamma)
        assert (dl.verdict(), dl.x_cache) == ("whole", "HIT"), url

    await deferToThread(outage.redis.stop)
    await noticed(http, outage, REDIS_FAILING)
    for url in outage.urls:
        dl = await fetch(url, gamma)
        assert (dl.verdict(), dl.x_cache) == ("whole", "HIT"), url
    assert fake.file_counts() == {GAMMA: 1}

    # An uncached file, three clients on each instance at once: the upstream
    # holds its second half until all nine have their headers, so each
    # joined its instance's fetch in progress.
    gate: Deferred[None] = Deferred()
    fake.holds[BETA] = gate
    downloads = [download(url, beta) for url in outage.urls for _ in range(3)]
    await within(when_answered(downloads, len(downloads)), 30, "the nine clients' headers")
    gate.callback(None)
    await within(gatherResults([dl.done for dl in downloads]), 30, "the nine downloads")
    assert [dl.verdict() for dl in downloads] == ["whole"] * 9
    assert {dl.x_cache for dl in downloads} == {"MISS"}
    assert fake.file_counts() == {GAMMA: 1, BETA: 3}  # one fetch per instance
    # The clients had their last byte once it was verified; then each
    # instance tried to record it.
    await all_logged(outage, not_cached(BETA), "beta not cached")

    for url, process in zip(outage.urls, outage.processes, strict=True):
        code, state = await health(http, url)
        assert code == 200 and state["status"] == "degraded", (url, state)
        assert state["metadata_store"]["state"] == "failing", (url, state)
        assert "Redis" in state["metadata_store"]["reason"], (url, state)
        assert state["file_store"]["state"] == "ok", (url, state)
        scraped = await metrics(http, url)
        assert sample(scraped, "txpypi_store_up", store="metadata") == 0, url
        assert sample(scraped, "txpypi_store_errors_total", store="metadata") >= 1, url
        assert not re.search(cached(BETA), process.output), url

    await deferToThread(outage.redis.start)
    await all_logged(outage, REDIS_BACK, "Redis back")
    for url, process in zip(outage.urls, outage.processes, strict=True):
        code, state = await health(http, url)
        assert code == 200 and state["status"] == "ok", (url, state)
        assert sample(await metrics(http, url), "txpypi_store_up", store="metadata") == 1, url
        assert (count(process, REDIS_FAILING), count(process, REDIS_BACK)) == (1, 1), url

    # Caching across the cluster works again: the file fetched uncached
    # during the outage lands now, and is a hit on the other instances.
    await lands_and_hits(outage, beta)
    assert fake.file_counts() == {GAMMA: 1, BETA: 4}


@pytest_twisted.ensureDeferred
async def test_s3_outage_under_three_instances(
    outage_cluster: OutageCluster, small_upstream: Upstream, http: HTTPClient, dists: list[Dist]
) -> None:
    """
    The S3 server stops under three instances.  A client on each asks at
    once for a file the index lists and nobody cached: each gets the whole
    file from the upstream, and nothing is cached (no object, no record:
    afterwards it is a miss again).  A cached file whose object cannot be
    read is streamed from the upstream too.  /health answers 200
    "degraded" naming the file store, the error counter moved, and each
    log has one outage line.  The server starts again on the same port:
    each instance finds out by itself, a miss lands again and is a hit on
    the others, and the file cached before the outage is a hit again.
    """
    outage, fake = outage_cluster, small_upstream.fake
    beta, gamma = find(dists, BETA), find(dists, GAMMA)
    first = await fetch(outage.urls[0], gamma)
    assert (first.verdict(), first.x_cache) == ("whole", "MISS")
    await within(outage.processes[0].wait_for(cached(GAMMA)), 30, "gamma to land")
    errors = "txpypi_store_errors_total"
    before = [sample(await metrics(http, url), errors, store="files") for url in outage.urls]

    await deferToThread(outage.gateway.stop)
    downloads = [download(url, beta) for url in outage.urls]
    await within(gatherResults([dl.done for dl in downloads]), 60, "beta through each instance")
    assert [dl.verdict() for dl in downloads] == ["whole"] * 3
    assert {dl.x_cache for dl in downloads} == {"MISS"}
    # The cluster lock held: one instance fetched it at a time, and each
    # had to fetch it itself, since it never landed.
    assert fake.file_counts() == {GAMMA: 1, BETA: 3}
    await all_logged(outage, not_cached(BETA), "beta not cached")
    # Cached, but its object cannot be read: from the upstream, whole.
    dl = await fetch(outage.urls[1], gamma)
    assert (dl.verdict(), dl.x_cache) == ("whole", "MISS")
    assert fake.file_counts() == {GAMMA: 2, BETA: 3}

    await noticed(http, outage, S3_FAILING)
    for url, errors_before in zip(outage.urls, before, strict=True):
        code, state = await health(http, url)
        assert code == 200 and state["status"] == "degraded", (url, state)
        assert state["file_store"]["state"] == "failing" and state["file_store"]["reason"], (url, state)
        assert state["metadata_store"]["state"] == "ok", (url, state)
        scraped = await metrics(http, url)
        assert sample(scraped, "txpypi_store_up", store="files") == 0, url
        assert sample(scraped, errors, store="files") > errors_before, url
    # Nothing of beta went into the bucket (read through the session's own
    # S3 server): gamma's object only, and no upload left open.
    objects, uploads = await deferToThread(list_prefix, outage.direct)
    assert [key.rsplit("/", 1)[1] for key, _ in objects] == [GAMMA] and uploads == []

    await deferToThread(outage.gateway.start)
    await all_logged(outage, S3_BACK, "S3 back")
    for url in outage.urls:
        code, state = await health(http, url)
        assert code == 200 and state["status"] == "ok", (url, state)
        assert sample(await metrics(http, url), "txpypi_store_up", store="files") == 1, url

    # Caching resumes: beta is a miss (it was not cached), lands, and is a
    # hit on the other instances; gamma's record was kept: a hit again.
    await lands_and_hits(outage, beta)
    dl = await fetch(outage.urls[2], gamma)
    assert (dl.verdict(), dl.x_cache) == ("whole", "HIT")
    assert fake.file_counts() == {GAMMA: 2, BETA: 4}
    for url, process in zip(outage.urls, outage.processes, strict=True):
        assert (count(process, S3_FAILING), count(process, S3_BACK)) == (1, 1), url
        # No record ever named an object that was not there.
        assert count(process, rb"not serving cached") == 0, url
        # The outage was told once: no traceback per file that could not be cached.
        assert count(process, rb"could not cache|could not remove|Traceback") == 0, url

"""
Issue #14's worker processes, with a real C{twistd -n txpypi --workers 2}:
a herd of clients spread over both workers costs the upstream one GET of a
page and one of a file, the followers streaming the leader's bytes as they
arrive; a worker killed mid-download is started again while the other's
clients go on; SIGHUP reaches both, SIGTERM drains both; the workers share a
socket systemd hands over, and one with TLS.

A test reaches a chosen worker through the shared socket while the other
is stopped (SIGSTOP: it accepts nothing), so that the herd is spread for
sure; it waits for its requests to be inside that worker (a request after
them is answered) before it lets the other go on (SIGCONT).  A worker's own
socket serves only the internal routes.
"""

from __future__ import annotations

import json
import os
import re
import signal
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from treq.client import HTTPClient
from twisted.internet.defer import Deferred, gatherResults
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.protocol import Protocol
from twisted.internet.utils import getProcessOutput
from twisted.python.failure import Failure
from twisted.web._newclient import HTTP11ClientProtocol
from twisted.web._newclient import Request as ClientRequest
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers

from tests.conftest import TLS, clean_env, get_reactor
from tests.e2e.test_cluster import Download, Upstream, download, serve, when_answered, within
from tests.e2e.test_install import assert_imports, uv_install
from tests.processes import Twistd, socket_activated
from tests.servers import Redis
from txpypi.core.peer import HEADER as PEER_HEADER
from txpypi.core.peer import sign
from txpypi.testing import Dist, build_wheel
from txpypi.workers import ROLE_ENV, Role


@pytest.fixture
def big(dists: list[Dist]) -> Dist:
    """
    conftest's 3 MB wheel.
    """
    return next(d for d in dists if d.project == "big")


@pytest.fixture(scope="module")
def other() -> Dist:
    return build_wheel("other", "1.0", padding=3 * 1024 * 1024)


@pytest.fixture
def upstream(dists: list[Dist], other: Dist) -> Iterator[Upstream]:
    yield from serve([*dists, other])


@attrs.frozen
class Workers:
    process: Twistd
    #: The socket the workers share.
    url: str
    #: Each worker's own socket, by index.
    own: tuple[str, ...]

    def pids(self) -> dict[int, int]:
        """
        The last started process id of each worker, from the log.
        """
        found = re.findall(rb"started worker (\d+) \(pid (\d+)\)", self.process.output)
        return {int(index): int(pid) for index, pid in found}


def own_port(index: int) -> bytes:
    """
    The log of a worker's start: its shared socket, then its own.
    """
    return (
        rb"(?s)\[worker %d\] ProxySite (?:\(TLS\) )?starting on \d+"
        rb".*?\[worker %d\] ProxySite starting on (\d+)"
        % (
            index,
            index,
        )
    )


def ready(process: Twistd) -> tuple[str, tuple[str, ...]]:
    port = pytest_twisted.blockon(within(process.listening, 60, "the workers to listen"))
    own = []
    for index in (0, 1):
        match = pytest_twisted.blockon(within(process.wait_for(own_port(index)), 60, f"worker {index}"))
        own.append(f"http://127.0.0.1:{int(match.group(1))}")
        up = process.wait_for(rb"worker %d ready" % index)  # its SIGHUP handler too
        pytest_twisted.blockon(within(up, 60, f"worker {index} to be ready"))
    return f"http://127.0.0.1:{port}", tuple(own)


@contextmanager
def run_workers(args: list[str], tmp_path: Path) -> Iterator[Workers]:
    process = Twistd.start(["--workers", "2", "--cache-dir", str(tmp_path / "cache"), *args], tmp_path)
    try:
        url, own = ready(process)
        yield Workers(process, url, own)
    finally:
        pytest_twisted.blockon(process.stop())
        print(process.tail(20000))


@pytest.fixture
def workers(upstream: Upstream, tmp_path: Path) -> Iterator[Workers]:
    with run_workers(
        ["--upstream", upstream.url, "--listen", "tcp:0:interface=127.0.0.1"], tmp_path
    ) as running:
        yield running


class Body(Protocol):
    def __init__(self) -> None:
        self.data = b""
        self.done: Deferred[None] = Deferred()
        self.reason: Failure | None = None

    def dataReceived(self, data: bytes) -> None:
        self.data += data

    def connectionLost(self, reason: Failure = None) -> None:  # type: ignore[assignment]
        self.reason = reason
        self.done.callback(None)


@attrs.define
class Get:
    """
    One client's GET on a connection of its own (so that the test knows
    when the request was written).
    """

    body: Body = attrs.Factory(Body)
    response: Any = None
    sent: Deferred[None] = attrs.Factory(Deferred)

    @property
    def whole(self) -> bool:
        return self.body.reason is not None and self.body.reason.check(ResponseDone) is not None


def get(base: str, path: str, accept: str = "application/vnd.pypi.simple.v1+json") -> Get:
    got = Get()
    port = int(base.rsplit(":", 1)[1])
    headers = Headers({b"host": [b"127.0.0.1"], b"accept": [accept.encode()]})

    def connected(protocol: HTTP11ClientProtocol) -> Deferred[Any]:
        answer: Deferred[Any] = protocol.request(
            ClientRequest(b"GET", path.encode(), headers, None, persistent=False)
        )
        got.sent.callback(None)
        return answer

    def answered(response: Any) -> None:
        got.response = response
        response.deliverBody(got.body)

    def failed(failure: Failure) -> None:
        if not got.sent.called:
            got.sent.callback(None)
        got.body.connectionLost(failure)

    d = connectProtocol(TCP4ClientEndpoint(get_reactor(), "127.0.0.1", port), HTTP11ClientProtocol())
    d.addCallback(connected).addCallbacks(answered, failed)
    return got


async def arrived(sent: list[Deferred[None]], url: str) -> None:
    """
    Return once requests are inside the one worker running: each was
    written, then it answered a request on a connection of its own after
    reading what reached it before (a path it does not know: nothing that
    waits on the database, which the stopped worker may hold).
    """
    await gatherResults(sent)
    probe = get(url, "/arrived")
    await probe.body.done
    assert probe.response is not None and probe.response.code == 404


async def on_worker(workers: Workers, http: HTTPClient | None, index: int, start: Any) -> list[Any]:
    """
    Start requests (C{start()} returns them, each with a C{sent}) with all
    workers but C{index} stopped, and return them once they are inside it.
    """
    others = [pid for i, pid in workers.pids().items() if i != index]
    for pid in others:
        os.kill(pid, signal.SIGSTOP)
    try:
        started = start()
        await within(Deferred.fromCoroutine(arrived([s.sent for s in started], workers.url)), 30, "them")
    finally:
        for pid in others:
            os.kill(pid, signal.SIGCONT)
    return started


@pytest_twisted.ensureDeferred
async def test_a_herd_over_two_workers_costs_one_fetch(
    workers: Workers, upstream: Upstream, http: HTTPClient, big: Dist
) -> None:
    """
    Ten clients on each worker ask at once for a page, then for an
    uncached file, while the upstream holds them back: one upstream GET of
    each.  Every client of both workers has the file's headers before the
    upstream sends its second half: the followers stream the leader's
    bytes as they come, not from the landed file.
    """
    gate: Deferred[None] = Deferred()
    upstream.fake.page_holds["alpha"] = gate
    pages = []
    for index in (0, 1):
        pages += await on_worker(
            workers, http, index, lambda: [get(workers.url, "/simple/alpha/") for _ in range(10)]
        )
    await within(upstream.fake.requested("/simple/alpha/"), 30, "the page's GET")
    gate.callback(None)
    await within(gatherResults([g.body.done for g in pages]), 30, "the pages' answers")
    assert [g.response.code for g in pages] == [200] * 20
    for g in pages:
        assert "alpha-1.0-py3-none-any.whl" in [f["filename"] for f in json.loads(g.body.data)["files"]]
    assert upstream.fake.requests["/simple/alpha/"] == 1

    path = "/packages/" + big.filename
    hold: Deferred[None] = Deferred()
    upstream.fake.holds[big.filename] = hold
    downloads: list[Download] = []
    for index in (0, 1):
        downloads += await on_worker(
            workers, http, index, lambda: [download(workers.url, big) for _ in range(10)]
        )
    await within(upstream.fake.requested(path), 30, "the file's GET")
    await within(when_answered(downloads, 20), 30, "every client's headers, the upstream half-way")
    hold.callback(None)
    await within(gatherResults([d.done for d in downloads]), 60, "the downloads")
    assert [d.verdict() for d in downloads] == ["whole"] * 20, [
        (d.verdict(), d.body.received) for d in downloads
    ]
    assert upstream.fake.file_counts() == {big.filename: 1}
    # The other worker's clients read the leader's spool file, not its peer route.
    assert b"following big-1.0-py3-none-any.whl from the spool of the worker" in workers.process.output

    # The metrics are both workers' together: the 40 answers are counted.
    response = await http.get(f"{workers.url}/metrics")
    text = (await response.content()).decode()
    assert "txpypi_workers_answering 2.0" in text
    counted = re.findall(r'txpypi_requests_total\{code="200",route="(project|file)"\} (\d+)', text)
    assert sorted((route, float(n)) for route, n in counted) == [("file", 20.0), ("project", 20.0)]
    health = json.loads(await (await http.get(f"{workers.url}/health")).content())
    assert health["workers"] == {"count": 2, "answering": 2, "others": ["ok"]}


@pytest_twisted.ensureDeferred
async def test_a_killed_worker_is_started_again(
    workers: Workers, upstream: Upstream, http: HTTPClient, big: Dist, other: Dist
) -> None:
    """
    Worker 1 is killed (SIGKILL) in the middle of a download: its client is
    cut off (never a complete-looking body), worker 0's client of another
    download gets every byte, and worker 1 is started again on the same
    sockets and serves the file it was fetching.
    """
    gates = {name: Deferred() for name in (big.filename, other.filename)}
    upstream.fake.holds.update(gates)
    (on_0,) = await on_worker(workers, http, 0, lambda: [download(workers.url, big)])
    (on_1,) = await on_worker(workers, http, 1, lambda: [download(workers.url, other)])
    await within(when_answered([on_0, on_1], 2), 30, "both downloads' headers")
    killed = workers.pids()[1]
    restarted = workers.process.wait_for(rb"started worker 1 \(pid (?!%d\))\d+\)" % killed)
    os.kill(killed, signal.SIGKILL)
    await within(on_1.done, 30, "worker 1's client to be cut off")
    assert on_1.verdict() == "aborted"
    for gate in gates.values():
        gate.callback(None)
    await within(on_0.done, 30, "worker 0's download")
    assert on_0.verdict() == "whole"

    await within(restarted, 30, "worker 1 to start again")
    listening = rb"(?s)(?:\[worker 1\] ProxySite starting on.*?){4}"  # two sockets, twice
    await within(workers.process.wait_for(listening), 30, "the new worker 1 to listen")
    (again,) = await on_worker(workers, http, 1, lambda: [download(workers.url, other)])
    await within(again.done, 30, "the file through the new worker 1")
    assert again.verdict() == "whole"
    assert b"worker 1 ended" in workers.process.output


@pytest_twisted.ensureDeferred
async def test_the_follower_of_a_killed_leader_is_cut_off(
    workers: Workers, upstream: Upstream, http: HTTPClient, big: Dist
) -> None:
    """
    Worker 0 leads a download and worker 1's client follows it from worker
    0's spool file; worker 0 is killed (SIGKILL) half-way: worker 1's client
    is cut off (never a complete-looking body, never left waiting for the
    read timeout), and the file is then fetched again, whole.
    """
    gate: Deferred[None] = Deferred()
    upstream.fake.holds[big.filename] = gate
    (leads,) = await on_worker(workers, http, 0, lambda: [download(workers.url, big)])
    await within(when_answered([leads], 1), 30, "the leader's headers")
    (follows,) = await on_worker(workers, http, 1, lambda: [download(workers.url, big)])
    await within(when_answered([follows], 1), 30, "the follower's headers")
    following = b"following big-1.0-py3-none-any.whl from the spool"
    await within(workers.process.wait_for(following), 30, "worker 1 to follow the spool")
    killed = workers.pids()[0]
    restarted = workers.process.wait_for(rb"worker 0 ready \(pid (?!%d\))\d+\)" % killed)
    os.kill(killed, signal.SIGKILL)
    await within(follows.done, 10, "the follower to be cut off")
    assert follows.verdict() == "aborted" and leads.verdict() == "aborted"
    del upstream.fake.holds[big.filename]
    gate.callback(None)
    await within(restarted, 30, "worker 0 to start again")
    again = download(workers.url, big)
    await within(again.done, 30, "the file")
    assert again.verdict() == "whole"
    assert upstream.fake.file_counts() == {big.filename: 2}


async def worker_counts(http: HTTPClient, own: str, secret: str) -> dict[str, float]:
    """
    One worker's own part of C{/metrics}, asked at its own socket as a
    sibling asks: its C{txpypi_requests_total} by route and code.
    """
    path = "/_worker/metrics"
    headers = {PEER_HEADER: sign(secret, path, get_reactor().seconds())}
    response = await http.get(own + path, headers=headers)
    assert response.code == 200
    text = (await response.content()).decode()
    found = re.findall(r'txpypi_requests_total\{code="(\d+)",route="(\w+)"\} (\S+)', text)
    return {f"{route} {code}": float(n) for code, route, n in found}


def secret_of(workers: Workers) -> str:
    """
    The workers' secret, from where the parent put it: worker 0's
    environment (the test runs as the same user).
    """
    environ = Path(f"/proc/{workers.pids()[0]}/environ").read_bytes().split(b"\0")
    role = next(v for v in environ if v.startswith(ROLE_ENV.encode() + b"="))
    secret: str = Role.load(role.split(b"=", 1)[1].decode()).secret
    return secret


@pytest_twisted.ensureDeferred
async def test_a_worker_started_again_carries_on_counting(workers: Workers, http: HTTPClient) -> None:
    """
    Worker 1 answers pages and reports its counters; it is killed
    (SIGKILL) and started again: the new worker 1 counts on from what the
    old one reported (the totals of C{/metrics} never go down, which
    Prometheus would read as a reset), and from there on its own requests.
    """
    secret = secret_of(workers)
    pages = await on_worker(workers, http, 1, lambda: [get(workers.url, "/simple/alpha/") for _ in range(3)])
    await within(gatherResults([g.body.done for g in pages]), 30, "the pages")
    assert [g.response.code for g in pages] == [200] * 3
    before = await worker_counts(http, workers.own[1], secret)
    assert before["project 200"] == 3.0

    killed = workers.pids()[1]
    restarted = workers.process.wait_for(rb"worker 1 ready \(pid (?!%d\))\d+\)" % killed)
    os.kill(killed, signal.SIGKILL)
    await within(restarted, 30, "worker 1 to start again")
    assert await worker_counts(http, workers.own[1], secret) == before

    (again,) = await on_worker(workers, http, 1, lambda: [get(workers.url, "/simple/alpha/")])
    await within(again.body.done, 30, "a page from the new worker 1")
    after = await worker_counts(http, workers.own[1], secret)
    assert after["project 200"] == 4.0


@pytest.fixture
def configured(upstream: Upstream, tmp_path: Path) -> Iterator[Workers]:
    """
    Two workers reading a config file.
    """
    config = tmp_path / "txpypi.yaml"
    config.write_text(f"upstream: {upstream.url}\nlisten: tcp:0:interface=127.0.0.1\n")
    with run_workers(["--config", str(config)], tmp_path) as running:
        yield running


@pytest_twisted.ensureDeferred
async def test_sighup_reaches_both_workers(
    configured: Workers, upstream: Upstream, http: HTTPClient, tmp_path: Path
) -> None:
    """
    C{offline} turned on in the config file, then SIGHUP to the parent:
    both workers reload, and neither asks the upstream for a page it lacks.
    """
    config = tmp_path / "txpypi.yaml"
    config.write_text(config.read_text() + "offline: true\n")
    process = configured.process
    reloaded = [process.wait_for(rb"\[worker %d\] SIGHUP: configuration reloaded" % i) for i in (0, 1)]
    process.transport_.signalProcess(signal.SIGHUP)
    await within(gatherResults(reloaded), 30, "both workers to reload")
    for index in (0, 1):
        (got,) = await on_worker(configured, http, index, lambda: [get(configured.url, "/simple/beta/")])
        await got.body.done
        assert got.response.code == 404
    assert upstream.fake.requests["/simple/beta/"] == 0


@pytest_twisted.ensureDeferred
async def test_sigterm_drains_both_workers(
    workers: Workers, upstream: Upstream, http: HTTPClient, big: Dist, other: Dist
) -> None:
    """
    SIGTERM to the parent while each worker sends a download: both stop
    listening, finish their download, and exit; then the parent does.
    """
    gates = {name: Deferred() for name in (big.filename, other.filename)}
    upstream.fake.holds.update(gates)
    downloads = [
        *await on_worker(workers, http, 0, lambda: [download(workers.url, big)]),
        *await on_worker(workers, http, 1, lambda: [download(workers.url, other)]),
    ]
    await within(when_answered(downloads, 2), 30, "both downloads' headers")
    closed = [workers.process.wait_for(rb"\[worker %d\] \(TCP Port \d+ Closed\)" % i) for i in (0, 1)]
    workers.process.transport_.signalProcess(signal.SIGTERM)
    await within(gatherResults(closed), 30, "both workers to stop listening")
    assert not workers.process.ended.called
    for gate in gates.values():
        gate.callback(None)
    await within(gatherResults([d.done for d in downloads]), 30, "the downloads")
    assert [d.verdict() for d in downloads] == ["whole", "whole"]
    await within(workers.process.ended, 30, "the parent to exit")
    assert b"Server Shut Down" in workers.process.output


@pytest_twisted.ensureDeferred
async def test_socket_activation_with_two_workers(upstream: Upstream, tmp_path: Path, tls: TLS) -> None:
    """
    The socket systemd hands over (fd 3, LISTEN_FDS=1, LISTEN_PID the
    process's own) is shared by both workers: both accept on it, and an
    install goes through.
    """
    process, port = socket_activated(
        [
            "--upstream",
            upstream.url,
            "--workers",
            "2",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--listen",
            "systemd:domain=INET:index=0",
        ],
        tmp_path,
    )
    try:
        for index in (0, 1):
            starts = rb"\[worker %d\] ProxySite starting on %d" % (index, port)
            await within(process.wait_for(starts), 60, f"worker {index} on the inherited socket")
        await uv_install(f"http://127.0.0.1:{port}/simple/", tls, tmp_path / "t", "alpha")
        await assert_imports(tmp_path / "t")
    finally:
        await process.stop()
        print(process.tail(20000))


@pytest.fixture
def over_tls(upstream: Upstream, tmp_path: Path, tls: TLS) -> Iterator[Workers]:
    with run_workers(["--upstream", upstream.url, "--listen", tls.endpoint(0)], tmp_path) as running:
        yield running


@pytest_twisted.ensureDeferred
async def test_two_workers_over_tls(over_tls: Workers, tmp_path: Path, tls: TLS) -> None:
    """
    An endpoint with TLS: the parent makes the socket, each worker reads the
    endpoint's certificate; real uv installs over real TLS.
    """
    port = int(over_tls.url.rsplit(":", 1)[1])
    for index in (0, 1):
        assert b"[worker %d] ProxySite (TLS) starting on %d" % (index, port) in over_tls.process.output
    await uv_install(f"https://localhost:{port}/simple/", tls, tmp_path / "t", "alpha")
    await assert_imports(tmp_path / "t")


@pytest.fixture
def with_redis(upstream: Upstream, redis_server: Redis, tmp_path: Path) -> Iterator[Workers]:
    args = ["--upstream", upstream.url, "--listen", "tcp:0:interface=127.0.0.1", "--redis", redis_server.url]
    with run_workers(args, tmp_path) as running:
        yield running


@pytest_twisted.ensureDeferred
async def test_with_redis_each_worker_is_an_instance_of_the_cluster(
    with_redis: Workers, upstream: Upstream, http: HTTPClient, big: Dist
) -> None:
    """
    With --redis the cluster's lock decides who fetches: clients on both
    workers cost the upstream one GET, the other worker following.
    """
    hold: Deferred[None] = Deferred()
    upstream.fake.holds[big.filename] = hold
    downloads: list[Download] = []
    for index in (0, 1):
        downloads += await on_worker(
            with_redis, http, index, lambda: [download(with_redis.url, big) for _ in range(3)]
        )
    await within(upstream.fake.requested("/packages/" + big.filename), 30, "the file's GET")
    await within(when_answered(downloads, 6), 30, "every client's headers, the upstream half-way")
    hold.callback(None)
    await within(gatherResults([d.done for d in downloads]), 60, "the downloads")
    assert [d.verdict() for d in downloads] == ["whole"] * 6
    assert upstream.fake.file_counts() == {big.filename: 1}
    assert b"following http://127.0.0.1:" in with_redis.process.output


@pytest.fixture
def on_unix(upstream: Upstream, tmp_path: Path) -> Iterator[tuple[Workers, Path]]:
    path = tmp_path / "txpypi.sock"
    args = [
        "--upstream",
        upstream.url,
        "--listen",
        "tcp:0:interface=127.0.0.1",
        "--listen",
        f"unix:{path}:mode=660",
    ]
    with run_workers(args, tmp_path) as running:
        yield running, path


async def curl_unix(path: Path, url_path: str) -> str:
    """
    curl over the UNIX socket (run without blocking: the fake upstream is
    served by this process's reactor).
    """
    argv = ["-sS", "-o", "/dev/null", "-w", "%{http_code}", "--unix-socket", str(path), f"http://x{url_path}"]
    out = await getProcessOutput("curl", argv, env=clean_env(), reactor=get_reactor(), errortoo=True)
    return out.decode()


@pytest_twisted.ensureDeferred
async def test_a_unix_socket_keeps_its_mode_and_outlives_a_worker(on_unix: tuple[Workers, Path]) -> None:
    """
    The parent makes the socket file with its mode; a worker neither opens
    it to the world nor removes it when it stops, nor shuts a shared socket
    down, so the proxy still answers on both sockets, through both workers,
    after one worker ended and was started again.
    """
    workers, path = on_unix
    assert stat.S_IMODE(path.stat().st_mode) == 0o660
    assert await curl_unix(path, "/simple/alpha/") == "200"
    ended = workers.pids()[1]
    again = workers.process.wait_for(rb"worker 1 ready \(pid (?!%d\))" % ended)
    os.kill(ended, signal.SIGTERM)
    await within(again, 30, "worker 1 to start again")
    assert path.exists() and stat.S_IMODE(path.stat().st_mode) == 0o660
    assert await curl_unix(path, "/simple/alpha/") == "200"
    # The shared TCP socket too: the worker that stopped listening did not
    # shut it down for the others.
    for index in (0, 1):
        (got,) = await on_worker(workers, None, index, lambda: [get(workers.url, "/simple/alpha/")])
        await got.body.done
        assert got.response.code == 200

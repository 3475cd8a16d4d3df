"""
File answers release what they hold on every path: a 304, a 416, a
malformed range, a HEAD, a client gone before or during the body, and the
peer route leave the process's descriptors and the downloads' registered
readers where they were.  Error answers never carry a cache lifetime or a
validator.  The file-answer plan and the range parser are pure, and
property-tested.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from hypothesis import given, settings
from hypothesis import strategies as st
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred, succeed
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import MemoryReactorClock
from twisted.python.failure import Failure
from twisted.web.client import Agent, HTTPConnectionPool, readBody
from twisted.web.http_headers import Headers
from twisted.web.resource import Resource
from twisted.web.server import Request, Site
from twisted.web.test.requesthelper import DummyChannel
from zope.interface import implementer

from tests.conftest import Served, get_reactor
from tests.integration.test_proxy import find, header
from txpypi.cache.files import FileCache
from txpypi.cache.pages import PageCache
from txpypi.core.fileplan import plan_file, range_applies
from txpypi.core.httpheaders import Unsatisfiable, parse_range
from txpypi.core.peer import HEADER as PEER_HEADER
from txpypi.core.peer import peer_path, sign
from txpypi.fetch.upstream import Upstream, UpstreamClient
from txpypi.storage.memory import BytesReader, MemoryStore
from txpypi.storage.metadata import MemoryMetadata
from txpypi.storage.stores import IFileReader, IRedirectable
from txpypi.testing import Dist, FakeUpstream
from txpypi.web.files import FilesResource
from txpypi.web.peer import PeerResource
from txpypi.web.sender import Sender

GAMMA = "gamma-0.5-py3-none-any.whl"
BIG = "big-1.0-py3-none-any.whl"


def cache_descriptors(root: Path) -> int:
    """
    How many of this process's descriptors are open on files under C{root}
    (cached files and spool files): sockets of the test's own clients do
    not count, so the figure is exact.
    """
    n = 0
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(root)):
            n += 1
    return n


async def fetch(url: str, headers: dict[bytes, list[bytes]] | None = None, method: bytes = b"GET") -> Any:
    """
    One request on a connection of its own, closed after it.
    """
    pool = HTTPConnectionPool(get_reactor(), persistent=False)
    response = await Agent(get_reactor(), pool=pool).request(method, url.encode(), Headers(headers or {}))
    body = b"" if method == b"HEAD" else await readBody(response)
    return response, body


async def idle(running: Any) -> None:
    await Deferred.fromCoroutine(running.proxy.files.wait_idle())


@pytest_twisted.ensureDeferred
async def test_every_answer_on_a_hit_releases_its_reader(
    json_upstream: Served, proxy_factory: Any, tmp_path: Path, dists: list[Dist]
) -> None:
    """
    304, 416, a malformed range (a Latin-1 superscript digit), HEAD, a
    satisfiable range and a whole GET of a cached file: 50 of each leave no
    descriptor open on the cache (each 304 used to leak one).
    """
    cache = tmp_path / "cache"
    running = proxy_factory(json_upstream.url, cache)
    url = f"{running.url}/files/gamma/{GAMMA}"
    data = find(dists, GAMMA).content
    await fetch(url)
    await idle(running)
    etag = f'"{find(dists, GAMMA).sha256}"'.encode()
    before = cache_descriptors(cache)
    cases: list[tuple[dict[bytes, list[bytes]], bytes, int, bytes | None]] = [
        ({b"If-None-Match": [etag]}, b"GET", 304, b""),
        ({b"Range": [b"bytes=%d-" % len(data)]}, b"GET", 416, None),
        ({b"Range": ["bytes=²-".encode("latin-1")]}, b"GET", 200, data),
        ({}, b"HEAD", 200, b""),
        ({b"Range": [b"bytes=1-4"]}, b"GET", 206, data[1:5]),
        ({}, b"GET", 200, data),
    ]
    for headers, method, code, body in cases:
        for _ in range(50):
            response, got = await fetch(url, headers, method)
            assert response.code == code, (headers, method)
            if body is not None:
                assert got == body
        assert cache_descriptors(cache) == before, (headers, method)
    assert json_upstream.fake.requests["/packages/" + GAMMA] == 1


@pytest_twisted.ensureDeferred
async def test_error_answers_carry_no_cache_lifetime_or_validator(
    json_upstream: Served, proxy_factory: Any
) -> None:
    """
    A 416 on a cached file (its hit headers were set before the range was
    looked at) says no-store, and has no ETag or long max-age; a 404 too.
    """
    running = proxy_factory(json_upstream.url)
    url = f"{running.url}/files/gamma/{GAMMA}"
    await fetch(url)
    await idle(running)
    response, _ = await fetch(url, {b"Range": [b"bytes=99999999-"]})
    assert response.code == 416 and header(response, "content-range") is not None
    assert header(response, "cache-control") == "no-store"
    assert header(response, "etag") is None and header(response, "accept-ranges") is None
    response, _ = await fetch(f"{running.url}/files/gamma/gamma-9.9.tar.gz")
    assert response.code == 404 and header(response, "cache-control") == "no-store"
    response, _ = await fetch(url)  # and the hit itself is still cacheable
    assert header(response, "cache-control") == "public, max-age=365000000, immutable"


# -- clients that leave, over Twisted's doubles (deterministic: the test
#    says when a client is gone)


@attrs.define
class World:
    """
    The file and peer routes of one proxy over doubles: the fake upstream
    reached through iosim (C{RequestTraversalAgent}), memory stores, a
    hand-driven clock, and requests on L{DummyChannel}s.
    """

    fake: FakeUpstream
    agent: RequestTraversalAgent
    files: FileCache
    site: Site
    spool: Path
    #: The senders of bodies in progress, as the web layer keeps them.
    senders: set[Sender]
    clock: MemoryReactorClock

    def get(self, path: str, headers: dict[bytes, bytes] | None = None) -> tuple[Request, Any]:
        channel = DummyChannel()
        channel.transport = DummyChannel.SSL()  # it can be aborted
        channel.site = self.site
        request = Request(channel, False)
        for name, value in (headers or {}).items():
            request.requestHeaders.setRawHeaders(name, [value])
        request.gotLength(0)
        request.requestReceived(b"GET", path.encode(), b"HTTP/1.1")
        return request, channel


def world(
    tmp_path: Path,
    dists: list[Dist],
    store: Any = None,
    redirect_ttl: float | None = None,
    metadata: MemoryMetadata | None = None,
    coordinator: Any = None,
    spool: Path | None = None,
) -> World:
    """
    @param coordinator: makes the file cache's coordinator of the metadata
        store and the clock (the file cache's own when L{None}).
    @param spool: the spool directory (C{tmp_path/spool} by default).
    """
    fake = FakeUpstream(dists)
    reactor = MemoryReactorClock()
    agent = RequestTraversalAgent(fake)
    client = UpstreamClient(reactor, agent=agent)
    metadata = MemoryMetadata() if metadata is None else metadata
    pages = PageCache(reactor, client, metadata, Upstream("test", "http://upstream.test/simple/"))
    spool = tmp_path / "spool" if spool is None else spool
    spool.mkdir(parents=True)
    store = MemoryStore(str(spool)) if store is None else store(str(spool))
    shared = None if coordinator is None else coordinator(metadata, reactor)
    files = FileCache(
        reactor, client, store, metadata, pages, coordinator=shared, shared_usage=shared is not None
    )
    senders: set[Sender] = set()
    root = Resource()
    root.putChild(b"files", FilesResource(files, lambda: redirect_ttl, senders))
    root.putChild(b"_peer", PeerResource(files, reactor, senders))
    return World(fake, agent, files, Site(root), spool, senders, reactor)


def gone(request: Request) -> None:
    request.connectionLost(Failure(ConnectionDone("the client left")))


def test_clients_gone_before_and_during_the_body_release_their_readers(
    tmp_path: Path, dists: list[Dist]
) -> None:
    """
    A client that leaves while its download has not started (the upstream
    has not even answered), and one that leaves in the middle of the body,
    give their readers back; the download goes on for the one that stays,
    and in the end no descriptor is left open on the spool.
    """
    w = world(tmp_path, dists)
    answer, rest = Deferred[None](), Deferred[None]()
    w.fake.head_holds[BIG] = answer  # no status line yet
    w.fake.holds[BIG] = rest  # then half the body
    stays, stays_channel = w.get(f"/files/big/{BIG}")
    leaves, _ = w.get(f"/files/big/{BIG}")
    flight = w.files.downloads.flights[w.files.key("big", BIG)]
    assert flight.clients == 2 and w.fake.file_requests() == 1
    gone(leaves)
    answer.callback(None)
    w.agent.flush()
    assert flight.clients == 1  # the one that left gave its reader back
    joins, _ = w.get(f"/files/big/{BIG}")
    assert flight.clients == 2 and joins.startedWriting
    gone(joins)  # in the middle of its body
    assert flight.clients == 1
    rest.callback(None)
    w.agent.flush()
    assert stays.finished
    assert stays_channel.transport.written.getvalue().endswith(find(dists, BIG).content)
    assert flight.clients == 0 and not w.files.downloads.flights and cache_descriptors(w.spool) == 0


def test_with_the_workers_file_locks_a_miss_looks_in_the_store_once(
    tmp_path: Path, dists: list[Dist]
) -> None:
    """
    With the worker processes' file locks the claim comes before the
    store's look: a miss looks once (with the lock taken), not once before
    and once after; a file another worker cached (in the store, not in
    this worker's memory) is still served from the store.
    """
    from tests.cache.test_coordinator import CountedMetadata
    from txpypi.cache.coordinator import SharedCoordinator
    from txpypi.storage.filelocks import FileLocks

    metadata = CountedMetadata()

    def coordinator(metadata: Any, clock: Any) -> SharedCoordinator:
        locks = FileLocks(tmp_path / "locks", owner="this-worker")
        return SharedCoordinator(locks, metadata, clock, lock_first=True)

    w = world(tmp_path, dists, metadata=metadata, coordinator=coordinator)
    request, channel = w.get(f"/files/gamma/{GAMMA}")
    assert request.finished and channel.transport.written.getvalue().endswith(find(dists, GAMMA).content)
    assert metadata.looks == 1 and w.fake.requests["/packages/" + GAMMA] == 1
    key = w.files.key("gamma", GAMMA)
    assert not w.files.coordinator.holds(key)  # let go once it landed
    w.files._records.forget(w.files._records[key])  # as if another worker had cached it
    metadata.looks = 0
    request, channel = w.get(f"/files/gamma/{GAMMA}")
    assert request.finished and channel.transport.written.getvalue().endswith(find(dists, GAMMA).content)
    assert metadata.looks == 1 and w.fake.requests["/packages/" + GAMMA] == 1


def test_a_worker_follows_another_workers_download_from_its_spool(tmp_path: Path, dists: list[Dist]) -> None:
    """
    Two workers share file locks and the metadata: while worker 0 fetches
    a file (its upstream holding back half the body), a client of worker 1
    has the headers and the first half read from worker 0's spool file,
    never asking worker 0's peer route (its peer URL leads nowhere) nor its
    own upstream; then the rest, whole.  Worker 1 writes no copy: another
    client of it reads worker 0's spool too.  Both let go of every
    descriptor.
    """
    import socket

    from txpypi.cache.coordinator import SharedCoordinator
    from txpypi.storage.filelocks import FileLocks

    metadata, host = MemoryMetadata(), socket.gethostname()

    def worker(n: int) -> World:
        def coordinator(metadata: Any, clock: Any) -> SharedCoordinator:
            url = f"http://127.0.0.1:{n + 1}/"  # nothing listens there
            locks = FileLocks(tmp_path / "locks", owner=f"{host}:{n}:w{n} {url}")
            return SharedCoordinator(locks, metadata, clock, url, "s" * 32, lock_first=True)

        spool = tmp_path / "tmp" / f"w{n}"
        return world(tmp_path / f"w{n}", dists, metadata=metadata, coordinator=coordinator, spool=spool)

    leader, follower = worker(0), worker(1)
    rest: Deferred[None] = Deferred()
    leader.fake.holds[BIG] = rest
    content = find(dists, BIG).content
    first, first_channel = leader.get(f"/files/big/{BIG}")
    assert first.startedWriting and leader.fake.file_requests() == 1
    second, second_channel = follower.get(f"/files/big/{BIG}")
    for _ in range(20):
        follower.clock.advance(0.01)
    assert second.startedWriting and second.code == 200
    _, half = second_channel.transport.written.getvalue().split(b"\r\n\r\n", 1)
    assert content.startswith(half) and len(half) > len(content) // 4  # of the half the leader has
    # The bytes are on the disk once: worker 1 spools no copy of its own,
    # and a client of it that joins now reads them from worker 0's spool.
    assert [p.stat().st_size for p in (tmp_path / "tmp" / "w1").iterdir()] == []
    third, third_channel = follower.get(f"/files/big/{BIG}")
    assert third.startedWriting and len(follower.files.downloads.flights) == 1
    rest.callback(None)
    leader.agent.flush()
    for _ in range(100):
        follower.clock.advance(0.02)
        if second.finished and third.finished:
            break
    assert first.finished and first_channel.transport.written.getvalue().endswith(content)
    assert second.finished and second_channel.transport.written.getvalue().endswith(content)
    assert third.finished and third_channel.transport.written.getvalue().endswith(content)
    assert follower.fake.file_requests() == 0 and not follower.fake.requests.get(
        peer_path("default", "big", BIG)
    )
    assert leader.fake.file_requests() == 1
    assert not leader.files.downloads.flights and not follower.files.downloads.flights
    assert cache_descriptors(tmp_path / "tmp") == 0


def test_the_peer_route_releases_its_reader_when_the_peer_leaves(tmp_path: Path, dists: list[Dist]) -> None:
    """
    A peer that leaves while the download it follows has not started gives
    its reader back.
    """
    w = world(tmp_path, dists)
    secret = "s" * 32
    w.files.peer_secret = secret
    answer: Deferred[None] = Deferred()
    w.fake.head_holds[BIG] = answer
    leader, leader_channel = w.get(f"/files/big/{BIG}")
    flight = w.files.downloads.flights[w.files.key("big", BIG)]
    path = peer_path("default", "big", BIG)
    peer, _ = w.get(path, {PEER_HEADER: sign(secret, path, 0).encode()})
    assert flight.clients == 2
    gone(peer)
    answer.callback(None)
    w.agent.flush()
    assert flight.clients == 0 and leader.finished  # the leader's client has it all
    assert leader_channel.transport.written.getvalue().endswith(find(dists, BIG).content)
    assert cache_descriptors(w.spool) == 0


def test_a_hit_whose_first_read_fails_comes_from_the_upstream(tmp_path: Path, dists: list[Dist]) -> None:
    """
    Nothing is sent yet when a cached file's first read fails (its store
    failing, or the object gone): the client gets the file from the
    upstream, whole, not a cut connection; the record stays.
    """
    w = world(tmp_path, dists)
    request, channel = w.get(f"/files/gamma/{GAMMA}")
    assert request.finished and w.fake.requests["/packages/" + GAMMA] == 1
    record = w.files._records[w.files.key("gamma", GAMMA)]
    store = w.files._store
    assert isinstance(store, MemoryStore)
    store.failing_reads = True
    rest: Deferred[None] = Deferred()
    w.fake.holds[GAMMA] = rest
    request, channel = w.get(f"/files/gamma/{GAMMA}")
    assert not request.finished  # the first half came from the upstream, the rest is held
    rest.callback(None)
    w.agent.flush()
    assert request.finished and request.code == 200
    assert request.responseHeaders.getRawHeaders(b"x-cache") == [b"MISS"]
    assert channel.transport.written.getvalue().endswith(find(dists, GAMMA).content)
    assert w.fake.requests["/packages/" + GAMMA] == 2
    assert w.files._records[record.key].sha256 == record.sha256


@implementer(IRedirectable)
class RedirectableReader(BytesReader):
    """
    A reader of bytes in memory that an object store would also serve from
    a presigned URL (one that names its lifetime).
    """

    def url(self, ttl: float) -> Deferred[str]:
        return succeed(f"https://store.test/object?expires={ttl:g}")


@attrs.define
class RedirectingStore(MemoryStore):
    """
    A memory store whose readers are redirectable, like S3's.
    """

    def open(self, key: str) -> Deferred[IFileReader | None]:
        data = self.files.get(key)
        return succeed(None if data is None else RedirectableReader(data))


@pytest.mark.parametrize(
    "headers,status,location",
    [
        ({}, 302, True),
        ({b"range": b"bytes=0-9"}, 302, True),  # the store honours Range itself
        ({b"range": b"bytes=99999999-"}, 302, True),  # and answers its own 416
        ({b"if-none-match": b"ETAG"}, 304, False),  # answered here, from the plan
        ({b"if-none-match": b'"other"'}, 302, True),
        ({b"range": b"bytes=0-9", b"if-range": b'"other"'}, 200, False),  # only we know our ETags
        ({b"range": b"bytes=0-9", b"if-range": b"ETAG"}, 302, True),
    ],
)
def test_a_redirected_hit_follows_the_file_plan(
    tmp_path: Path, dists: list[Dist], headers: dict[bytes, bytes], status: int, location: bool
) -> None:
    """
    With redirects on, a cached hit is sent to the store's presigned URL
    exactly where the file plan allows it; a matching If-None-Match gets
    the proxy's own C{304}, and an If-Range naming another version the
    whole file from the proxy.
    """
    w = world(tmp_path, dists, store=RedirectingStore, redirect_ttl=60)
    rest: Deferred[None] = Deferred()
    w.fake.holds[GAMMA] = rest  # the body arrives after the headers were sent
    miss, _ = w.get(f"/files/gamma/{GAMMA}")
    rest.callback(None)
    w.agent.flush()
    assert miss.finished and miss.code == 200  # a miss is always sent through
    assert miss.responseHeaders.getRawHeaders(b"x-cache") == [b"MISS"]
    etag = f'"{find(dists, GAMMA).sha256}"'.encode()
    asked = {name: value.replace(b"ETAG", etag) for name, value in headers.items()}
    request, channel = w.get(f"/files/gamma/{GAMMA}", asked)
    assert request.finished and request.code == status
    got = request.responseHeaders.getRawHeaders(b"location")
    assert got == ([b"https://store.test/object?expires=60"] if location else None)
    if status == 200:
        assert channel.transport.written.getvalue().endswith(find(dists, GAMMA).content)
    assert w.fake.requests["/packages/" + GAMMA] == 1


# -- the pure parts


#: Range headers as clients (and attackers) write them: the grammar's
#: shape, with digits of other scripts, superscripts and junk in its places.
_numbers = st.one_of(
    st.text(alphabet="0123456789²٣𝟗½ -x", max_size=5),
    st.integers(min_value=0, max_value=6000).map(lambda n: "9" * n),  # past int()'s 4,300 digits
    st.integers(min_value=0, max_value=40).map(lambda n: "0" * n + "7"),
)
range_headers = st.one_of(
    st.builds(
        lambda unit, first, last, more: f"{unit}={first}-{last}{more}",
        st.sampled_from(["bytes", "Bytes", " bytes", "items", ""]),
        _numbers,
        _numbers,
        st.sampled_from(["", ",0-1", ", 5-", ";x"]),
    ),
    st.text(max_size=40),
)


@given(range_headers, st.integers(min_value=0, max_value=10_000))
@settings(max_examples=500)
def test_parse_range_on_any_text(header_value: str, size: int) -> None:
    """
    Any header gives the whole file (None), a range inside the file, or
    Unsatisfiable; nothing else is raised.
    """
    try:
        got = parse_range(header_value, size)
    except Unsatisfiable:
        return
    if got is not None:
        start, end = got
        assert 0 <= start < end <= size


@given(st.binary(max_size=40), st.integers(min_value=1, max_value=10_000))
@settings(max_examples=300)
def test_parse_range_on_any_bytes(raw: bytes, size: int) -> None:
    """
    As the proxy reads headers: bytes decoded as Latin-1.
    """
    try:
        got = parse_range(raw.decode("latin-1"), size)
    except Unsatisfiable:
        return
    assert got is None or 0 <= got[0] < got[1] <= size


def test_parse_range_with_endless_numbers() -> None:
    """
    Digit strings past any file (and past what int() reads) are positions
    beyond the end: a start there is unsatisfiable, an end there is the
    file's end, a suffix that long is the whole file.
    """
    many = "9" * 5000
    with pytest.raises(Unsatisfiable):
        parse_range(f"bytes={many}-", 100)
    assert parse_range(f"bytes=10-{many}", 100) == (10, 100)
    assert parse_range(f"bytes=-{many}", 100) == (0, 100)
    assert parse_range("bytes=" + "0" * 30 + "5-" + "0" * 30 + "9", 100) == (5, 10)


@given(st.integers(min_value=0, max_value=1000), st.integers(min_value=0, max_value=1000))
@settings(max_examples=200)
def test_parse_range_reads_what_it_is_given(first: int, size: int) -> None:
    try:
        got = parse_range(f"bytes={first}-", size)
    except Unsatisfiable:
        assert first >= size
        return
    assert got == (first, size)


@given(
    head=st.booleans(),
    size=st.one_of(st.none(), st.integers(min_value=0, max_value=10_000)),
    tag=st.one_of(st.none(), st.text(alphabet="abc", min_size=1, max_size=3)),
    if_none_match=st.one_of(st.none(), st.text(max_size=12)),
    range_header=st.one_of(st.none(), st.text(max_size=20)),
    if_range=st.one_of(st.none(), st.text(max_size=8)),
)
@settings(max_examples=300)
def test_file_plans_are_consistent(
    head: bool,
    size: int | None,
    tag: str | None,
    if_none_match: str | None,
    range_header: str | None,
    if_range: str | None,
) -> None:
    """
    Whatever the request: a known status; a body only for GET 200/206; the
    bytes to send inside the file; Content-Length equal to them.
    """
    etag = None if tag is None else f'"{tag}"'
    plan = plan_file(
        head=head,
        size=size,
        etag=etag,
        if_none_match=if_none_match,
        range_header=range_header,
        if_range=if_range,
    )
    assert plan.status in (200, 206, 304, 416)
    headers = dict(plan.headers)
    if plan.status in (304, 416) or head:
        assert not plan.body
    if plan.status == 416:
        assert size is not None and headers[b"content-range"] == b"bytes */%d" % size
    if plan.status in (200, 206) and size is not None:
        assert plan.end is not None and 0 <= plan.start <= plan.end <= size
        assert headers[b"content-length"] == b"%d" % (plan.end - plan.start)
    if plan.status == 206:
        assert not head and plan.start < plan.end  # type: ignore[operator]
    # A store that honours Range but knows not our ETags may answer in our
    # place only where our answer would not depend on those ETags.
    assert plan.redirect == (not head and plan.status != 304 and range_applies(if_range, etag))


def test_a_file_plan_says_where_a_redirect_may_answer() -> None:
    """
    Not for a HEAD, a C{304}, or an C{If-Range} naming another version;
    else yes, a C{416} included (the store answers its own).
    """
    etag = '"e"'

    def plan(**how: Any) -> Any:
        return plan_file(head=how.pop("head", False), size=100, etag=etag, **how)

    assert plan().redirect and plan(range_header="bytes=0-9").redirect
    assert plan(range_header="bytes=500-").status == 416 and plan(range_header="bytes=500-").redirect
    assert plan(range_header="bytes=0-9", if_range=etag).redirect
    assert not plan(head=True).redirect
    assert not plan(if_none_match=etag).redirect
    assert not plan(range_header="bytes=0-9", if_range='"other"').redirect


@pytest.mark.parametrize("takes_notes", [False, True])
def test_a_downloads_start_is_told_only_to_a_coordinator_that_takes_notes(
    tmp_path: Path, dists: list[Dist], takes_notes: bool
) -> None:
    """
    A miss's start is waited for, to leave its spool note, only when the
    coordinator has followers to tell (the workers' file locks).
    """
    from txpypi.cache.coordinator import LocalCoordinator

    told: list[tuple[str, str]] = []

    @attrs.define
    class Telling(LocalCoordinator):
        def spooling(self, key: str, note: str) -> None:
            told.append((key, note))

    def coordinator(metadata: Any, clock: Any) -> Telling:
        made = Telling()
        made.takes_notes = takes_notes
        return made

    w = world(tmp_path, dists, coordinator=coordinator)
    request, channel = w.get(f"/files/big/{BIG}")
    w.agent.flush()
    assert request.finished and channel.transport.written.getvalue().endswith(find(dists, BIG).content)
    assert [key for key, _ in told] == ([w.files.key("big", BIG)] if takes_notes else [])

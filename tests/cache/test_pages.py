"""
The page cache on a L{Clock}, against the fake upstream through iosim:
one load of a stored page however many ask, pages bounded in bytes, the
memory estimate checked against tracemalloc, unknown projects remembered,
upstream page requests capped, unresolvable links left out and logged, a
compact project list that survives a restart; and, over real loopback, the
proxy refusing a close-delimited page (stale copy or 502).
"""

from __future__ import annotations

import base64
import gc
import json
import tracemalloc
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from treq.client import HTTPClient
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher
from twisted.web.resource import Resource
from twisted.web.server import Request, Site

import txpypi.cache.pages
from tests.conftest import Running, Served, listen
from txpypi.cache.pages import NotFound, PageCache, model_cost
from txpypi.core.simple.listjson import render_project_list_json
from txpypi.core.simple.pagehtml import parse_project_html
from txpypi.core.simple.pagejson import parse_project_json
from txpypi.core.simple.projects import ProjectList
from txpypi.fetch.upstream import Upstream, UpstreamClient, UpstreamError
from txpypi.storage.metadata import MemoryMetadata, PageRecord
from txpypi.testing import FakeUpstream, build_wheel, generated_names

UPSTREAM = "http://upstream.test/simple/"


def page_cache(resource: Resource, clock: Clock, metadata: Any, **more: Any) -> PageCache:
    client = UpstreamClient(clock, agent=RequestTraversalAgent(resource))
    return PageCache(clock, client, metadata, Upstream("test", UPSTREAM), **more)


def result(coroutine: Any) -> Any:
    out: list[Any] = []
    Deferred.fromCoroutine(coroutine).addBoth(out.append)
    assert out, "did not complete synchronously"
    if hasattr(out[0], "raiseException"):
        out[0].raiseException()
    return out[0]


class HeldMetadata(MemoryMetadata):
    """
    Memory metadata whose page reads wait until L{release} and are counted.
    """

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0
        self.held: list[tuple[Deferred[PageRecord | None], str]] = []

    def get_page(self, key: str) -> Deferred[PageRecord | None]:
        self.reads += 1
        d: Deferred[PageRecord | None] = Deferred()
        self.held.append((d, key))
        return d

    def release(self) -> None:
        held, self.held = self.held, []
        for d, key in held:
            d.callback(self.pages.get(key))


def test_one_load_per_stored_page_however_many_ask() -> None:
    """
    After a restart, eight concurrent requests for a stored page that is
    not in memory cost one metadata read and one parse, shared.
    """
    fake = FakeUpstream([build_wheel("alpha", "1.0")])
    clock = Clock()
    metadata = HeldMetadata()
    first = page_cache(fake, clock, metadata)
    got = [Deferred.fromCoroutine(first.get("alpha"))]
    assert metadata.reads == 1
    metadata.release()
    assert got[0].called and fake.requests["/simple/alpha/"] == 1
    metadata.reads = 0

    parses: list[str] = []

    def counting(f: Any, *args: Any) -> Deferred[Any]:
        parses.append(f.__name__)
        return succeed(f(*args))

    restarted = page_cache(fake, clock, metadata, blocking=counting)
    results: list[Any] = []
    for _ in range(8):
        Deferred.fromCoroutine(restarted.get("alpha")).addBoth(results.append)
    assert metadata.reads == 1 and results == []
    metadata.release()
    assert parses == ["_load"] and metadata.reads == 1
    assert len(results) == 8 and all(state == "HIT" for _, state in results)
    assert len({id(page) for page, _ in results}) == 1
    assert fake.requests["/simple/alpha/"] == 1


def _fake_with(projects: int, files: int = 3) -> FakeUpstream:
    return FakeUpstream(
        [build_wheel(f"p{i}", f"1.{n}") for i in range(projects) for n in range(files)], mode="json"
    )


def test_pages_are_bounded_by_bytes_least_recently_used_out() -> None:
    fake = _fake_with(4)
    clock = Clock()
    pages = page_cache(fake, clock, MemoryMetadata())
    p0, _ = result(pages.get("p0"))
    assert p0.cost > len(p0.json.gzip) + len(p0.html.gzip) + len(p0.json.identity or b"")
    pages.max_bytes = int(p0.cost * 2.5)  # room for two
    result(pages.get("p1"))
    assert pages.fresh("p0") is not None  # p0 is now the most recent
    result(pages.get("p2"))
    assert pages.fresh("p1") is None and pages.fresh("p0") is not None
    assert pages.fresh("p2") is not None  # now p0 is the least recent
    assert pages.bytes_used <= pages.max_bytes
    pages.max_bytes = int(p0.cost * 1.5)  # SIGHUP lowered it
    pages.trim()
    assert pages.fresh("p0") is None and pages.fresh("p2") is not None
    assert pages.bytes_used <= pages.max_bytes
    # A page larger than the whole budget is served, not kept.
    pages.max_bytes = p0.cost // 2
    page, state = result(pages.get("p3"))
    assert state == "MISS" and pages.fresh("p3") is None
    assert pages.bytes_used <= pages.max_bytes


def _measured(parse: Any) -> int:
    """
    The bytes tracemalloc counts as held by what C{parse()} returns.
    """
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        value = parse()
        gc.collect()
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert value is not None
    return held


def test_model_cost_is_honest() -> None:
    """
    The estimate of a parsed page's memory (L{model_cost}) is within 10%
    of what tracemalloc measures, for a 2,000-file JSON page (sizes, upload
    times, hashes, metadata hashes, requires-python) and the same as HTML.
    """
    files = [
        {
            "filename": f"demo-{i}.{i % 7}-py3-none-any.whl",
            "url": f"https://files.example/packages/{i:04x}/demo-{i}.{i % 7}-py3-none-any.whl",
            "hashes": {"sha256": f"{i:064x}"},
            "core-metadata": {"sha256": f"{i + 1:064x}"},
            "requires-python": ">=3.8",
            "size": 10**6 + i,
            "upload-time": "2024-01-02T03:04:05.123456Z",
            "yanked": False,
        }
        for i in range(2000)
    ]
    body = json.dumps({"meta": {"api-version": "1.1"}, "name": "demo", "files": files}).encode()
    html = "".join(
        f'<a href="{f["url"]}#sha256={f["hashes"]["sha256"]}" data-requires-python="&gt;=3.8">'
        f"{f['filename']}</a>"
        for f in files
    ).encode()
    for parse in (
        lambda: parse_project_json("demo", body, UPSTREAM),
        lambda: parse_project_html("demo", html, UPSTREAM),
    ):
        holder: list[Any] = []
        held = _measured(lambda: holder.append(parse()) or holder)  # noqa: B023
        estimate = model_cost(holder[0])
        assert abs(estimate - held) / held < 0.10, (estimate, held)


def test_unknown_projects_are_remembered_for_negative_ttl(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeUpstream([build_wheel("alpha", "1.0")])
    clock = Clock()
    pages = page_cache(fake, clock, MemoryMetadata())
    for _ in range(3):
        with pytest.raises(NotFound):
            result(pages.get("nope"))
    assert fake.requests["/simple/nope/"] == 1
    clock.advance(60)
    with pytest.raises(NotFound):
        result(pages.get("nope"))
    assert fake.requests["/simple/nope/"] == 2
    # The admin route's forget forgets that too.
    result(pages.forget("nope"))
    with pytest.raises(NotFound):
        result(pages.get("nope"))
    assert fake.requests["/simple/nope/"] == 3
    # Bounded in count: the oldest go first.
    monkeypatch.setattr(txpypi.cache.pages, "MAX_NEGATIVE", 2)
    for name in ("n1", "n2"):
        with pytest.raises(NotFound):
            result(pages.get(name))
    assert len(pages._unknown) == 2 and "default/simple/nope/" not in pages._unknown
    # 0 turns it off.
    pages.negative_ttl = 0
    for _ in range(2):
        with pytest.raises(NotFound):
            result(pages.get("off"))
    assert fake.requests["/simple/off/"] == 2


class HeldClient:
    """
    An upstream client whose page fetches wait until the test answers them.
    """

    response_timeout = 30.0

    def __init__(self) -> None:
        self.fetches: list[tuple[str, Deferred[Any]]] = []

    def fetch_page(self, url: str, etag: str | None = None, modified: str | None = None) -> Deferred[Any]:
        d: Deferred[Any] = Deferred()
        self.fetches.append((url, d))
        return d


def test_upstream_page_requests_are_capped() -> None:
    """
    With max-upstream-requests 2, a third and a fourth page wait their turn;
    one gets it when a fetch ends, the other gives up after the response
    timeout with a 504 and a one-line reason.
    """
    from txpypi.fetch.upstream import UpstreamNotFound

    clock = Clock()
    client = HeldClient()
    pages = PageCache(clock, client, MemoryMetadata(), Upstream("test", UPSTREAM))  # type: ignore[arg-type]
    pages.limiter.limit = 2
    outcomes: list[Any] = []
    for name in ("a", "b", "c", "d"):
        Deferred.fromCoroutine(pages.get(name)).addBoth(outcomes.append)
    assert [url for url, _ in client.fetches] == [UPSTREAM + "a/", UPSTREAM + "b/"]
    assert pages.limiter.waiting == 2
    client.fetches[0][1].errback(UpstreamNotFound(UPSTREAM + "a/"))
    assert [url for url, _ in client.fetches][2:] == [UPSTREAM + "c/"]
    clock.advance(30)
    assert len(outcomes) == 2
    error = outcomes[1].value
    assert isinstance(error, UpstreamError) and error.status == 504 and "\n" not in error.reason
    assert pages.limiter.running == 2 and pages.limiter.waiting == 0


class _BadLinks(Resource):
    """
    Project pages with one good link and two that urljoin refuses.
    """

    isLeaf = True

    def __init__(self, as_json: bool) -> None:
        super().__init__()
        self.as_json = as_json

    def render_GET(self, request: Request) -> bytes:
        if self.as_json:
            request.setHeader("content-type", "application/vnd.pypi.simple.v1+json")
            files = [
                {"filename": "good-1.0.tar.gz", "url": "/packages/good-1.0.tar.gz", "hashes": {}},
                {"filename": "bad-1.0.tar.gz", "url": "http://[::1/bad-1.0.tar.gz", "hashes": {}},
                {"filename": "bad-2.0.tar.gz", "url": "http://[oops]/bad-2.0.tar.gz", "hashes": {}},
            ]
            return json.dumps({"meta": {"api-version": "1.1"}, "name": "good", "files": files}).encode()
        request.setHeader("content-type", "text/html")
        return (
            b'<a href="/packages/good-1.0.tar.gz">good-1.0.tar.gz</a>'
            b'<a href="http://[::1/bad-1.0.tar.gz">bad-1.0.tar.gz</a>'
            b'<a href="http://[oops]/bad-2.0.tar.gz">bad-2.0.tar.gz</a>'
        )


@pytest.mark.parametrize("as_json", [True, False])
def test_unresolvable_links_are_left_out_and_logged_once(as_json: bool) -> None:
    """
    A link whose URL urljoin refuses ("Invalid IPv6 URL") is left out of
    the page, and one line per page fetch says so (today: a 500).
    """
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    try:
        pages = page_cache(_BadLinks(as_json), Clock(), MemoryMetadata())
        page, _ = result(pages.get("good"))
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert [f.filename for f in page.model.files] == ["good-1.0.tar.gz"]
    skipped = [e for e in events if "left {count} link(s)" in e.get("log_format", "")]
    assert len(skipped) == 1 and skipped[0]["count"] == 2
    assert skipped[0]["href"] == "http://[::1/bad-1.0.tar.gz"


def test_the_project_list_is_compact_and_survives_a_restart() -> None:
    """
    The root page is kept as one blob of names and gzip bodies (the
    identity bodies of a big page are not kept), stored as its gzip JSON
    in base64, and loaded back to the same page; so is one stored as plain
    JSON (before this form).
    """
    fake = FakeUpstream()
    names = generated_names(60_000)
    fake.list_projects(names)
    clock = Clock()
    metadata = MemoryMetadata()
    page, state = result(page_cache(fake, clock, metadata).get(None))
    assert state == "MISS" and isinstance(page.model, ProjectList)
    assert page.model.count == len(names) and list(page.model) == names
    assert page.html.identity is None and page.html.length > txpypi.cache.pages.INFLATE_ABOVE
    stored = metadata.pages["default/simple/"].body
    assert stored == base64.b64encode(page.json.gzip) and len(stored) < len(page.model.names) // 2
    assert page.cost < len(page.model.names) + len(page.html.gzip) + len(page.json.gzip) + 4096
    again, state = result(page_cache(fake, clock, metadata).get(None))
    assert state == "HIT" and again.model == page.model and again.html.tag == page.html.tag
    metadata.pages["default/simple/"] = attrs.evolve(
        metadata.pages["default/simple/"], body=render_project_list_json(names)
    )
    older, state = result(page_cache(fake, clock, metadata).get(None))
    assert state == "HIT" and older.model.names == page.model.names
    assert fake.requests["/simple/"] == 1


# -- the proxy over loopback


async def _get(http: HTTPClient, url: str) -> tuple[int, bytes]:
    response = await http.get(url)
    return response.code, await response.content()


@pytest_twisted.ensureDeferred
async def test_a_close_delimited_page_is_not_cached_and_the_stale_copy_served(
    proxy_factory: Any, dists: Any, http: HTTPClient, tmp_path: Path
) -> None:
    """
    An HTML page cut short by a clean close is never cached (it silently
    lost versions): the client gets the stale copy if there is one, else a
    502 with a one-line reason, and nothing is stored.
    """
    fake = FakeUpstream(dists, mode="html")
    port = listen(Site(fake))
    try:
        served = Served(fake, port)
        running: Running = proxy_factory(served.url, stale_ttl=3600)
        fake.page_faults["beta"] = "close-delimited"
        code, body = await _get(http, running.url + "/simple/beta/")
        assert code == 502 and b"no length" in body and body.count(b"\n") == 1
        assert "default/simple/beta/" not in running.proxy.pages._memory
        del fake.page_faults["beta"]
        code, body = await _get(http, running.url + "/simple/beta/")
        assert code == 200 and body.count(b"</a>") == 3
        running.proxy.pages.ttl = 0
        fake.add(build_wheel("beta", "1.2"))  # a new version: no 304 this time
        fake.page_faults["beta"] = "close-delimited"
        response = await http.get(running.url + "/simple/beta/")
        body = await response.content()
        assert response.code == 200 and response.headers.getRawHeaders("x-cache") == ["STALE"]
        assert body.count(b"</a>") == 3  # the whole stale copy, not the cut one
    finally:
        await port.stopListening()


@pytest_twisted.ensureDeferred
async def test_a_page_request_waits_its_turn_then_gets_a_504(
    json_upstream: Served, proxy_factory: Any, http: HTTPClient
) -> None:
    """
    With --max-upstream-requests 1 and a page stalled upstream, the request
    for another page waits for a turn for --response-timeout, then gets a
    504 with a one-line reason and no cache lifetime or validator.
    """
    running: Running = proxy_factory(
        json_upstream.url, max_upstream_requests=1, response_timeout=0.3, read_timeout=1.5
    )
    fake = json_upstream.fake
    fake.page_faults["beta"] = "stall"
    arrived: Deferred[None] = Deferred()
    render = fake._render_project

    def noticed(request: Request, name: str) -> bytes | int:
        if name == "beta" and not arrived.called:
            arrived.callback(None)
        return render(request, name)

    fake._render_project = noticed  # type: ignore[method-assign]
    stalled = http.get(running.url + "/simple/beta/")
    await arrived  # beta holds the one turn
    response = await http.get(running.url + "/simple/gamma/")
    body = await response.content()
    assert response.code == 504 and body.count(b"\n") == 1 and b"upstream requests in progress" in body
    assert response.headers.getRawHeaders("cache-control") == ["no-store"]  # an error: never kept
    assert response.headers.getRawHeaders("etag") is None
    assert "/simple/gamma/" not in json_upstream.fake.requests
    response = await stalled  # the read timeout ends the stalled one
    assert response.code == 504
    await response.content()
    del json_upstream.fake.page_faults["beta"]
    response = await http.get(running.url + "/simple/gamma/")
    assert response.code == 200
    await response.content()


@pytest.mark.parametrize("store", ["sqlite", "redis"])
@pytest_twisted.ensureDeferred
async def test_the_stored_project_list_loads_back_from_every_store(
    store: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """
    The project list goes into SQLite and a real Redis (which keeps page
    bodies as text) and comes back whole after a restart.
    """
    from twisted.python.threadpool import ThreadPool

    from tests.conftest import get_reactor
    from txpypi.storage.metadata import SqliteMetadata

    metadata: Any
    pool = None
    if store == "redis":
        from txpypi.storage.redismeta import RedisMetadata, connect

        metadata = RedisMetadata(connect(request.getfixturevalue("redis_server").url), clock=get_reactor())
    else:
        pool = ThreadPool(1, 1)
        pool.start()
        metadata = SqliteMetadata(tmp_path / "m.sqlite", pool, get_reactor())
    try:
        fake = FakeUpstream()
        names = generated_names(30_000)
        fake.list_projects(names)
        clock = Clock()
        page, state = await page_cache(fake, clock, metadata).get(None)
        assert state == "MISS"
        again, state = await page_cache(fake, clock, metadata).get(None)
        assert state == "HIT" and list(again.model) == names and again.json.tag == page.json.tag
        assert fake.requests["/simple/"] == 1
    finally:
        await metadata.close()
        if pool is not None:
            pool.stop()

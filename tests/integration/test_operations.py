"""
Operations: /metrics moves when things happen, /health, the admin routes
and their token, and the access log.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.logger import globalLogPublisher

from tests.conftest import Served
from tests.integration.test_http_semantics import get
from tests.integration.test_proxy import find, header
from txpypi.testing import Dist
from txpypi.web.accesslog import Entry, client_address, combined, json_line

TOKEN = "s3cret-token-for-the-tests"


def sample(text: str, name: str, **labels: str) -> float:
    """
    The value of one sample in a Prometheus text page (0 if absent).
    """
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        metric, _, rest = key.partition("{")
        found = ",".join(sorted(rest.rstrip("}").split(","))) if rest else ""
        if metric == name and found == wanted:
            return float(value)
    return 0.0


async def scrape(url: str) -> str:
    response, body = await get(url + "/metrics")
    assert response.code == 200 and header(response, "content-type").startswith("text/plain")
    return str(body.decode())


@pytest_twisted.ensureDeferred
async def test_metrics_move_with_events(json_upstream: Served, proxy_factory: Any, dists: list[Dist]) -> None:
    running = proxy_factory(json_upstream.url)
    await Deferred.fromCoroutine(running.proxy.files.load_usage())
    name = "gamma-0.5-py3-none-any.whl"
    size = len(find(dists, name).content)
    before = await scrape(running.url)

    await get(running.url + "/simple/gamma/")
    await get(running.url + "/simple/gamma/")
    await get(running.url + "/files/gamma/" + name)
    await Deferred.fromCoroutine(running.proxy.files.wait_idle())
    await get(running.url + "/files/gamma/" + name)
    await get(running.url + "/simple/no-such-project/")
    after = await scrape(running.url)

    def delta(metric: str, **labels: str) -> float:
        return sample(after, metric, **labels) - sample(before, metric, **labels)

    assert delta("txpypi_requests_total", route="project", code="200") == 2
    assert delta("txpypi_requests_total", route="project", code="404") == 1
    assert delta("txpypi_requests_total", route="file", code="200") == 2
    assert delta("txpypi_request_duration_seconds_count", route="file") == 2
    assert delta("txpypi_cache_answers_total", kind="page", result="miss") == 1
    assert delta("txpypi_cache_answers_total", kind="page", result="hit") == 1
    assert delta("txpypi_cache_answers_total", kind="file", result="miss") == 1
    assert delta("txpypi_cache_answers_total", kind="file", result="hit") == 1
    assert delta("txpypi_served_bytes_total", source="cache") >= size
    assert delta("txpypi_served_bytes_total", source="upstream") >= size  # the file and a page
    assert delta("txpypi_upstream_requests_total", upstream="upstream", kind="page", outcome="ok") == 1
    assert delta("txpypi_upstream_requests_total", upstream="upstream", kind="page", outcome="not_found") == 1
    assert delta("txpypi_upstream_requests_total", upstream="upstream", kind="file", outcome="ok") == 1
    assert delta("txpypi_upstream_duration_seconds_count", upstream="upstream", kind="file") == 1
    assert sample(after, "txpypi_cache_bytes") == size and sample(after, "txpypi_cache_files") == 1
    assert sample(after, "txpypi_downloads_in_flight") == 0
    # No label names a project or a file.
    assert "gamma" not in after


@pytest_twisted.ensureDeferred
async def test_health(json_upstream: Served, proxy_factory: Any) -> None:
    running = proxy_factory(json_upstream.url)
    response, body = await get(running.url + "/health")
    health = json.loads(body)
    assert response.code == 200 and health["status"] == "ok"
    assert health["upstream"]["state"] == "unknown" and health["metadata_store"]["state"] == "ok"
    await get(running.url + "/simple/alpha/")
    health = json.loads((await get(running.url + "/health"))[1])
    assert health["upstream"]["state"] == "ok" and health["upstream"]["last_success"] > 0

    down = proxy_factory("http://127.0.0.1:1/simple/", cache_dir=Path(running.proxy.files._store.root) / "x")
    await get(down.url + "/simple/alpha/")
    response, body = await get(down.url + "/health")
    health = json.loads(body)
    assert response.code == 200 and health["status"] == "degraded"
    assert (
        health["upstream"]["state"] == "degraded"
        and "unreachable" in health["upstream"]["last_error"]["reason"]
    )


@pytest_twisted.ensureDeferred
async def test_admin_routes_need_the_token(
    json_upstream: Served, proxy_factory: Any, dists: list[Dist]
) -> None:
    running = proxy_factory(json_upstream.url)
    name = "gamma-0.5-py3-none-any.whl"
    await get(running.url + "/files/gamma/" + name)
    await Deferred.fromCoroutine(running.proxy.files.wait_idle())

    # No token configured: the routes do not exist.
    response, _ = await get(running.url + "/cache/gamma", method=b"DELETE")
    assert response.code == 404

    running.proxy.admin_token = TOKEN
    for auth in ([], [b"Bearer wrong-token-wrong-token"], [b"Basic " + TOKEN.encode()]):
        response, _ = await get(
            running.url + "/cache/gamma", {b"Authorization": auth} if auth else {}, b"DELETE"
        )
        assert response.code == 401 and header(response, "www-authenticate") == 'Bearer realm="txpypi"'
    assert header((await get(running.url + "/simple/gamma/"))[0], "x-cache") == "HIT"

    auth = {b"Authorization": [b"Bearer " + TOKEN.encode()]}
    response, _ = await get(running.url + "/cache/gamma", auth, b"DELETE")
    assert response.code == 200
    assert header((await get(running.url + "/simple/gamma/"))[0], "x-cache") == "MISS"
    response, _ = await get(running.url + "/cache/list", auth, b"DELETE")
    assert response.code == 200
    response, _ = await get(running.url + f"/cache/gamma/{name}", auth, b"DELETE")
    assert response.code == 200
    response, _ = await get(running.url + f"/cache/gamma/{name}", auth, b"DELETE")
    assert response.code == 404
    response, body = await get(running.url + "/files/gamma/" + name)
    assert header(response, "x-cache") == "MISS" and body == find(dists, name).content
    assert json_upstream.fake.requests["/packages/" + name] == 2


@pytest.mark.parametrize(
    "peer, forwarded, trusted, expected",
    [
        ("10.0.0.1", "1.2.3.4", set(), "10.0.0.1"),
        ("10.0.0.1", "1.2.3.4", {"10.0.0.1"}, "1.2.3.4"),
        ("10.0.0.1", "6.6.6.6, 1.2.3.4, 10.0.0.2", {"10.0.0.1", "10.0.0.2"}, "1.2.3.4"),
        ("10.0.0.1", None, {"10.0.0.1"}, "10.0.0.1"),
        ("9.9.9.9", "1.2.3.4", {"10.0.0.1"}, "9.9.9.9"),
    ],
)
def test_client_address(peer: str, forwarded: str | None, trusted: set[str], expected: str) -> None:
    assert client_address(peer, forwarded, trusted) == expected


def test_access_log_formats() -> None:
    entry = Entry("1.2.3.4", "GET", '/simple/a"b/', "HTTP/1.1", 200, 123, 0.0015, "HIT", "-", "pip/24", 0.0)
    assert combined(entry) == (
        '1.2.3.4 - - [01/Jan/1970:00:00:00 +0000] "GET /simple/a\\"b/ HTTP/1.1" 200 123 '
        '"-" "pip/24" HIT 0.001500'
    )
    data = json.loads(json_line(entry))
    assert data["status"] == 200 and data["cache"] == "HIT" and data["path"] == '/simple/a"b/'


@pytest_twisted.ensureDeferred
async def test_one_access_log_line_per_request(json_upstream: Served, proxy_factory: Any) -> None:
    running = proxy_factory(json_upstream.url, access_log="log")  # as twisted.logger events
    running.port.factory.log_format = "json"
    lines: list[dict[str, Any]] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "txpypi.access":
            lines.append(json.loads(event["access"]))

    globalLogPublisher.addObserver(observe)
    try:
        await get(running.url + "/simple/alpha/", {b"User-Agent": [b"uv/0.5"]})
    finally:
        globalLogPublisher.removeObserver(observe)
    (line,) = lines
    assert line["path"] == "/simple/alpha/" and line["status"] == 200 and line["cache"] == "MISS"
    assert line["user_agent"] == "uv/0.5" and line["client"] == "127.0.0.1" and line["size"] > 0


@pytest.mark.parametrize("log_format", ["json", "combined"])
@pytest_twisted.ensureDeferred
async def test_the_buffered_access_log_writes_the_same_lines_and_loses_none_at_stop(
    json_upstream: Served, proxy_factory: Any, tmp_path: Path, log_format: str
) -> None:
    """
    Lines written to a file, buffered, are the lines the logger events
    carried (the same formatting), and stopping the proxy writes every one.
    """
    path = tmp_path / "access.log"
    events: list[str] = []

    def observe(event: dict[str, Any]) -> None:
        if event.get("log_namespace") == "txpypi.access" and "access" in event:
            events.append(event["access"])

    paths = ["/simple/alpha/", "/simple/beta/", "/simple/nope/", "/simple/alpha/"]
    by_event = proxy_factory(json_upstream.url, tmp_path / "a", access_log="log", log_format=log_format)
    buffered = proxy_factory(json_upstream.url, tmp_path / "b", access_log=str(path), log_format=log_format)
    globalLogPublisher.addObserver(observe)
    try:
        for url in paths:
            await get(by_event.url + url, {b"User-Agent": [b"pip/26"]})
            await get(buffered.url + url, {b"User-Agent": [b"pip/26"]})
    finally:
        globalLogPublisher.removeObserver(observe)
    assert len(events) == len(paths)
    await buffered.stop()  # what SIGTERM does: the buffer is written
    written = path.read_text().splitlines()

    def same(line: str) -> str:  # the time and duration differ between two requests
        if log_format == "json":
            fields = json.loads(line)
            return json.dumps({k: v for k, v in fields.items() if k not in ("time", "duration")})
        head, _, rest = line.partition(" [")
        return head + " " + rest.split("] ", 1)[1].rsplit(" ", 1)[0]

    assert [same(line) for line in written] == [same(line) for line in events]


@pytest_twisted.ensureDeferred
async def test_download_statistics(json_upstream: Served, proxy_factory: Any, tmp_path: Path) -> None:
    """
    Whole downloads of distribution files are counted per project, version
    and file (not ranges, not metadata files), and survive a restart.
    """
    running = proxy_factory(json_upstream.url, tmp_path / "c")
    for path in (
        "/files/beta/beta-1.0-py3-none-any.whl",
        "/files/beta/beta-1.1-py3-none-any.whl",
        "/files/beta/beta-1.1-py3-none-any.whl",
        "/files/beta/beta-1.1-py3-none-any.whl.metadata",
        "/files/gamma/gamma-0.5-py3-none-any.whl",
    ):
        await get(running.url + path)
    await get(running.url + "/files/beta/beta-1.1.tar.gz", {b"Range": [b"bytes=0-9"]})
    await Deferred.fromCoroutine(running.proxy.files.wait_idle())
    response, body = await get(running.url + "/stats?project=Beta&top=5")
    stats = json.loads(body)
    assert response.code == 200
    assert stats["top"] == [{"project": "beta", "downloads": 3}, {"project": "gamma", "downloads": 1}]
    assert stats["project"] == {
        "name": "beta",
        "downloads": 3,
        "versions": {"1.0": 1, "1.1": 2},
        "files": {"beta-1.0-py3-none-any.whl": 1, "beta-1.1-py3-none-any.whl": 2},
    }
    response, _ = await get(running.url + "/stats?top=lots")
    assert response.code == 400
    await running.stop()
    again = proxy_factory(json_upstream.url, tmp_path / "c")
    assert json.loads((await get(again.url + "/stats"))[1])["top"][0] == {"project": "beta", "downloads": 3}


@pytest_twisted.ensureDeferred
async def test_status_page(json_upstream: Served, proxy_factory: Any) -> None:
    running = proxy_factory(json_upstream.url)
    await Deferred.fromCoroutine(running.proxy.files.load_usage())
    await get(running.url + "/files/gamma/gamma-0.5-py3-none-any.whl")
    await Deferred.fromCoroutine(running.proxy.files.wait_idle())
    await get(running.url + "/files/gamma/gamma-0.5-py3-none-any.whl")
    response, body = await get(running.url + "/", {b"Host": [b"cache.example:8443"]})
    html = body.decode()
    assert response.code == 200 and "<script" not in html
    assert "http://cache.example:8443/simple/" in html
    assert '<span id="upstream-state" class="ok">ok</span>' in html
    assert '<td class=n id="cache-files">1</td>' in html
    assert '<td class=n id="hit-ratio">50.0 %</td>' in html  # a file miss, then a hit
    assert "<tr><td>gamma</td><td class=n>2</td></tr>" in html


@pytest_twisted.ensureDeferred
async def test_metrics_for_stale_evictions_errors_and_downloads_in_flight(
    json_upstream: Served, proxy_factory: Any, http: Any, dists: list[Dist]
) -> None:
    from tests.integration.test_proxy import _Collector

    running = proxy_factory(json_upstream.url)
    files = running.proxy.files
    await Deferred.fromCoroutine(files.load_usage())
    before = await scrape(running.url)

    # A download in flight, with two clients reading it.
    big = "big-1.0-py3-none-any.whl"
    gate: Deferred[None] = Deferred()
    json_upstream.fake.holds[big] = gate
    readers = [await http.get(f"{running.url}/files/big/{big}", unbuffered=True) for _ in range(2)]
    collectors = []
    for r in readers:
        c = _Collector()
        r.deliverBody(c)
        collectors.append(c)
    during = await scrape(running.url)
    assert sample(during, "txpypi_downloads_in_flight") == 1
    assert sample(during, "txpypi_download_clients") == 2
    gate.callback(None)
    for c in collectors:
        await c.done
    await Deferred.fromCoroutine(files.wait_idle())

    # A stale page.
    await get(running.url + "/simple/beta/")
    json_upstream.fake.page_faults["beta"] = "500"
    running.proxy.pages.ttl = 0
    await get(running.url + "/simple/beta/")

    # An eviction: the limit drops below what is cached.
    files.usage.max_size = 1
    files.maybe_evict()
    await Deferred.fromCoroutine(files.wait_idle())

    # A store error: the spool cannot be written.
    def full(fd: int, data: memoryview) -> int:
        raise OSError(28, "No space left on device")

    files.downloads.spool_write = full
    try:
        response, body = await get(f"{running.url}/files/gamma/gamma-0.5-py3-none-any.whl")
    finally:
        files.downloads.spool_health.clear()
    assert response.code == 200 and body == find(dists, "gamma-0.5-py3-none-any.whl").content
    after = await scrape(running.url)

    def delta(metric: str, **labels: str) -> float:
        return sample(after, metric, **labels) - sample(before, metric, **labels)

    assert delta("txpypi_cache_answers_total", kind="page", result="stale") == 1
    assert delta("txpypi_evictions_total") >= 1
    assert delta("txpypi_store_errors_total", store="files") == 1
    assert sample(after, "txpypi_downloads_in_flight") == 0 and sample(after, "txpypi_download_clients") == 0

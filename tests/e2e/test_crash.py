"""
Crash safety with a real process: kill -9 txpypi in the middle of a
download, start it again on the same cache, and check that nothing partial
is served, the spool is cleaned, and what was committed before survives.
"""

from __future__ import annotations

from pathlib import Path

import pytest_twisted
from treq.client import HTTPClient
from twisted.internet.defer import Deferred

from tests.conftest import Served
from tests.integration.test_proxy import _Collector, find, header
from tests.processes import Twistd
from txpypi.testing import Dist

SMALL = "gamma-0.5-py3-none-any.whl"
BIG = "big-1.0-py3-none-any.whl"


async def held_download(http: HTTPClient, url: str, upstream: Served, gate: Deferred[None]) -> _Collector:
    """
    Start downloading BIG through the proxy at C{url} while the upstream
    holds its second half back until C{gate} fires; return once the client
    has its first bytes.
    """
    upstream.fake.holds[BIG] = gate
    response = await http.get(url + "/files/big/" + BIG, unbuffered=True)  # type: ignore[call-arg]
    body = _Collector()
    response.deliverBody(body)
    await body.first
    return body


def proxy_args(upstream: Served, cache: Path) -> list[str]:
    return ["--upstream", upstream.url, "--cache-dir", str(cache), "--listen", "tcp:0:interface=127.0.0.1"]


@pytest_twisted.ensureDeferred
async def test_kill_9_mid_download(
    json_upstream: Served, tmp_path: Path, http: HTTPClient, dists: list[Dist]
) -> None:
    cache = tmp_path / "cache"
    args = proxy_args(json_upstream, cache)
    first = Twistd.start(args, tmp_path)
    try:
        url = f"http://127.0.0.1:{await first.listening}"
        # A file committed before the crash...
        assert await (await http.get(url + "/files/gamma/" + SMALL)).content() == find(dists, SMALL).content
        await first.wait_for(b"cached " + SMALL.encode())
        # ...and one half downloaded when it happens.
        gate: Deferred[None] = Deferred()
        body = await held_download(http, url, json_upstream, gate)
        assert [p.suffix for p in (cache / "tmp").iterdir()] == [".part"]
        await first.kill()
        await body.done
        assert len(b"".join(body.chunks)) < len(find(dists, BIG).content)
    finally:
        await first.kill()
    del json_upstream.fake.holds[BIG]
    gate.callback(None)

    second = Twistd.start(args, tmp_path)
    try:
        url = f"http://127.0.0.1:{await second.listening}"
        assert list((cache / "tmp").iterdir()) == []  # leftovers cleaned at start-up
        response = await http.get(url + "/files/gamma/" + SMALL)
        assert header(response, "x-cache") == "HIT"
        assert await response.content() == find(dists, SMALL).content
        response = await http.get(url + "/files/big/" + BIG)
        assert header(response, "x-cache") == "MISS"
        assert await response.content() == find(dists, BIG).content
        assert json_upstream.fake.requests["/packages/" + BIG] == 2
        assert json_upstream.fake.requests["/packages/" + SMALL] == 1
    finally:
        await second.stop()


@pytest_twisted.ensureDeferred
async def test_sigterm_lets_downloads_finish(
    json_upstream: Served, tmp_path: Path, http: HTTPClient, dists: list[Dist]
) -> None:
    """
    SIGTERM: the listener closes, a download in progress goes on to the end
    (and lands in the cache), then the process exits.
    """
    cache = tmp_path / "cache"
    args = proxy_args(json_upstream, cache)
    process = Twistd.start([*args, "--shutdown-grace", "30"], tmp_path)
    try:
        url = f"http://127.0.0.1:{await process.listening}"
        gate: Deferred[None] = Deferred()
        body = await held_download(http, url, json_upstream, gate)
        process.transport_.signalProcess("TERM")
        await process.wait_for(rb"shutting down: waiting up to 30")
        gate.callback(None)
        await body.done
        assert b"".join(body.chunks) == find(dists, BIG).content
        await process.ended
        assert b"cached " + BIG.encode() in process.output, process.output.decode()
    finally:
        await process.kill()


@pytest_twisted.ensureDeferred
async def test_sigterm_cuts_off_downloads_past_the_grace(
    json_upstream: Served, tmp_path: Path, http: HTTPClient, dists: list[Dist]
) -> None:
    """
    Past --shutdown-grace the clients still reading are aborted (never sent
    a complete-looking body), and nothing partial becomes a cache entry.
    """
    cache = tmp_path / "cache"
    args = proxy_args(json_upstream, cache)
    process = Twistd.start([*args, "--shutdown-grace", "0.5"], tmp_path)
    gate: Deferred[None] = Deferred()
    try:
        url = f"http://127.0.0.1:{await process.listening}"
        body = await held_download(http, url, json_upstream, gate)
        process.transport_.signalProcess("TERM")
        await body.done
        await process.ended
        assert len(b"".join(body.chunks)) < len(find(dists, BIG).content)
        assert b"aborted 1 download(s) past the grace period" in process.output, process.output.decode()
        assert not list((cache / "files").rglob("*.whl"))
    finally:
        await process.kill()
        gate.callback(None)


@pytest_twisted.ensureDeferred
async def test_sighup_reloads_the_config(json_upstream: Served, tmp_path: Path, http: HTTPClient) -> None:
    """
    SIGHUP re-reads the config file: a new index-ttl shows in Cache-Control
    without a restart; a bad file is refused and the running settings kept.
    """
    config = tmp_path / "txpypi.yaml"
    base = (
        f"upstream: {json_upstream.url}\ncache-dir: {tmp_path / 'cache'}\nlisten: tcp:0:interface=127.0.0.1\n"
    )
    config.write_text(base + "index-ttl: 600\n")
    process = Twistd.start(["--config", str(config)], tmp_path)

    async def cache_control() -> str | None:
        response = await http.get(url)
        await response.content()
        assert response.code == 200
        return header(response, "cache-control")

    try:
        url = f"http://127.0.0.1:{await process.listening}/simple/alpha/"
        assert await cache_control() in ("max-age=600", "max-age=599")
        config.write_text(base + "index-ttl: 30\n")
        process.transport_.signalProcess("HUP")
        await process.wait_for(rb"SIGHUP: configuration reloaded")
        assert await cache_control() in ("max-age=30", "max-age=29")
        config.write_text(base + "index-ttl: soon\n")
        process.transport_.signalProcess("HUP")
        await process.wait_for(rb"SIGHUP: configuration refused, keeping the running one: index-ttl")
        assert await cache_control() in ("max-age=30", "max-age=29")
    finally:
        await process.stop()

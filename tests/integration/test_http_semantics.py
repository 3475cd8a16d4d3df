"""
HTTP caching semantics over loopback: Range, ETag and 304, gzip, stale
answers, offline mode, and clients that are slow or leave.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from treq.client import HTTPClient
from twisted.internet.defer import Deferred, gatherResults
from twisted.web.client import Agent, readBody
from twisted.web.http_headers import Headers

from tests.conftest import Served, get_reactor
from tests.integration.test_proxy import _Collector, cached_files, find, header
from txpypi.core.httpheaders import Unsatisfiable, accepts_gzip, etag_matches, parse_range
from txpypi.testing import Dist

BIG = "big-1.0-py3-none-any.whl"


# -- the pure header parsers


@pytest.mark.parametrize(
    "value, expected",
    [
        ("bytes=0-9", (0, 10)),
        ("bytes=-10", (90, 100)),
        ("bytes=90-", (90, 100)),
        ("bytes=90-1000", (90, 100)),
        ("bytes=-1000", (0, 100)),
        (None, None),
        ("bytes=5-2", None),
        ("items=0-1", None),
        ("bytes=0-1,5-6", None),
        ("bytes=x-1", None),
        ("bytes=", None),
    ],
)
def test_parse_range(value: str | None, expected: tuple[int, int] | None) -> None:
    assert parse_range(value, 100) == expected


@pytest.mark.parametrize("value", ["bytes=100-", "bytes=200-300", "bytes=-0"])
def test_unsatisfiable_range(value: str) -> None:
    with pytest.raises(Unsatisfiable):
        parse_range(value, 100)


def test_accept_encoding_and_if_none_match() -> None:
    assert accepts_gzip("gzip, deflate, br") and accepts_gzip("*") and accepts_gzip("GZIP;q=0.5")
    assert not accepts_gzip("gzip;q=0") and not accepts_gzip("identity") and not accepts_gzip(None)
    assert etag_matches('"a", W/"b"', '"b"') and etag_matches("*", '"x"')
    assert not etag_matches('"a"', '"b"') and not etag_matches(None, '"b"')


# -- over HTTP


async def get(url: str, headers: dict[bytes, list[bytes]] | None = None, method: bytes = b"GET") -> Any:
    """
    A plain Agent request: no gzip decoding, no redirects, nothing added.
    """
    response = await Agent(get_reactor()).request(method, url.encode(), Headers(headers or {}))
    body = await readBody(response) if method != b"HEAD" else b""
    return response, body


@pytest_twisted.ensureDeferred
async def test_ranges_etag_and_head_on_cached_files(
    json_upstream: Served, proxy_factory: Any, dists: list[Dist]
) -> None:
    running = proxy_factory(json_upstream.url)
    name = "gamma-0.5-py3-none-any.whl"
    data = find(dists, name).content
    url = running.url + "/files/gamma/" + name
    await get(url)
    await Deferred.fromCoroutine(running.proxy.files.wait_idle())
    size = len(data)

    response, body = await get(url, {b"Range": [b"bytes=10-19"]})
    assert response.code == 206 and body == data[10:20]
    assert header(response, "content-range") == f"bytes 10-19/{size}"
    assert header(response, "accept-ranges") == "bytes"
    response, body = await get(url, {b"Range": [b"bytes=-22"]})  # the zip's end record
    assert response.code == 206 and body == data[-22:]
    response, body = await get(url, {b"Range": [b"bytes=100-"]})
    assert response.code == 206 and body == data[100:]
    response, body = await get(url, {b"Range": [b"bytes=%d-" % size]})
    assert response.code == 416 and header(response, "content-range") == f"bytes */{size}"
    response, body = await get(url, {b"Range": [b"bytes=9-1"]})  # malformed: ignored
    assert response.code == 200 and body == data
    etag = header(response, "etag")
    assert etag == f'"{find(dists, name).sha256}"'
    response, body = await get(url, {b"Range": [b"bytes=0-0"], b"If-Range": [b'"other"']})
    assert response.code == 200 and body == data

    response, body = await get(url, {b"If-None-Match": [etag.encode()]})
    assert response.code == 304 and body == b""
    response, _ = await get(url, method=b"HEAD")
    assert response.code == 200 and header(response, "x-cache") == "HIT"
    assert json_upstream.fake.requests["/packages/" + name] == 1


@pytest_twisted.ensureDeferred
async def test_range_of_a_file_still_downloading(
    json_upstream: Served, proxy_factory: Any, http: HTTPClient, dists: list[Dist]
) -> None:
    """
    A range inside the bytes already written is answered from them; its
    last byte waits until the whole file is verified.
    """
    data = find(dists, BIG).content
    gate: Deferred[None] = Deferred()
    json_upstream.fake.holds[BIG] = gate
    running = proxy_factory(json_upstream.url)
    url = running.url + "/files/big/" + BIG
    first = await http.get(url, unbuffered=True)  # type: ignore[call-arg]
    ranged = await http.get(url, headers={b"Range": [b"bytes=1000-1999"]}, unbuffered=True)  # type: ignore[call-arg]
    assert ranged.code == 206 and ranged.length == 1000
    c = _Collector()
    ranged.deliverBody(c)
    await c.first
    assert b"".join(c.chunks) == data[1000:1999]  # all but the last byte
    gate.callback(None)
    await c.done
    assert b"".join(c.chunks) == data[1000:2000]
    assert await first.content() == data
    assert json_upstream.fake.requests["/packages/" + BIG] == 1


@pytest_twisted.ensureDeferred
async def test_page_etag_gzip_and_head(json_upstream: Served, proxy_factory: Any) -> None:
    running = proxy_factory(json_upstream.url)
    url = running.url + "/simple/beta/"
    plain, body = await get(url)
    zipped, compressed = await get(url, {b"Accept-Encoding": [b"gzip"]})
    assert header(zipped, "content-encoding") == "gzip" and header(plain, "content-encoding") is None
    assert gzip.decompress(compressed) == body
    assert header(plain, "vary") == "Accept, Accept-Encoding"
    etag = header(plain, "etag")
    assert etag is not None and etag != header(zipped, "etag")
    response, body = await get(url, {b"If-None-Match": [etag.encode()]})
    assert response.code == 304 and body == b"" and header(response, "etag") == etag
    response, _ = await get(url, method=b"HEAD")
    assert response.code == 200 and header(response, "x-cache") == "HIT"


@pytest_twisted.ensureDeferred
async def test_stale_page_while_upstream_fails(json_upstream: Served, proxy_factory: Any) -> None:
    running = proxy_factory(json_upstream.url)
    url = running.url + "/simple/beta/"
    _, fresh = await get(url)
    json_upstream.fake.page_faults["beta"] = "500"
    running.proxy.pages.ttl = 0  # expired
    response, body = await get(url)
    assert response.code == 200 and body == fresh
    assert header(response, "x-cache") == "STALE"
    assert header(response, "cache-control") == "max-age=0"
    assert int(header(response, "age") or "-1") >= 0
    running.proxy.pages.stale_ttl = 0
    response, body = await get(url)
    assert response.code == 502


@pytest_twisted.ensureDeferred
async def test_offline_mode(
    json_upstream: Served, proxy_factory: Any, tmp_path: Path, dists: list[Dist]
) -> None:
    online = proxy_factory(json_upstream.url, tmp_path / "c")
    name = "gamma-0.5-py3-none-any.whl"
    await get(online.url + "/files/gamma/" + name)
    await Deferred.fromCoroutine(online.proxy.files.wait_idle())
    await online.stop()
    before = sum(json_upstream.fake.requests.values())

    offline = proxy_factory(json_upstream.url, tmp_path / "c")
    offline.proxy.pages.offline = True
    offline.proxy.pages.ttl = 0
    response, body = await get(offline.url + "/files/gamma/" + name)
    assert response.code == 200 and body == find(dists, name).content
    response, _ = await get(offline.url + "/simple/gamma/")
    assert response.code == 200 and header(response, "x-cache") == "STALE"
    response, _ = await get(offline.url + "/simple/beta/")
    assert response.code == 404
    response, _ = await get(offline.url + "/files/gamma/gamma-0.4-py3-none-any.whl")
    assert response.code == 404
    assert sum(json_upstream.fake.requests.values()) == before


def cache_fds(root: Path) -> list[str]:
    """
    The files under C{root} that this process holds open.
    """
    held = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith((str(root / "files"), str(root / "tmp"))):
            held.append(target)
    return held


@pytest_twisted.ensureDeferred
async def test_slow_client_does_not_hold_back_the_others(
    json_upstream: Served, proxy_factory: Any, http: HTTPClient, dists: list[Dist]
) -> None:
    """
    One client stops reading altogether; nine others still get the whole
    file and the download completes and is cached, because the upstream is
    never throttled for a slow client. Then the slow one resumes and gets
    every byte. Afterwards no descriptor of a cache or spool file is open.
    """
    data = find(dists, BIG).content
    running = proxy_factory(json_upstream.url)
    root = running.proxy.files._store.root
    url = running.url + "/files/big/" + BIG
    gate: Deferred[None] = Deferred()
    json_upstream.fake.holds[BIG] = gate
    slow = await http.get(url, unbuffered=True)  # type: ignore[call-arg]
    slow_body = _Collector()
    slow.deliverBody(slow_body)
    await slow_body.first
    slow_body.transport.pauseProducing()  # type: ignore[union-attr]
    fast = await gatherResults([http.get(url, unbuffered=True) for _ in range(9)])  # type: ignore[call-arg]
    gate.callback(None)
    bodies = await gatherResults([r.content() for r in fast])
    assert all(body == data for body in bodies)
    await Deferred.fromCoroutine(running.proxy.files.wait_idle())
    assert [p.name for p in cached_files(running)] == [BIG]
    assert not slow_body.done.called
    # The spool, still open for the slow reader (unless the kernel's socket
    # buffers took every byte already: sent by sendfile, nothing waits here).
    assert len(cache_fds(root)) <= 1
    slow_body.transport.resumeProducing()  # type: ignore[union-attr]
    await slow_body.done
    assert b"".join(slow_body.chunks) == data
    assert json_upstream.fake.requests["/packages/" + BIG] == 1
    assert cache_fds(root) == []


@pytest_twisted.ensureDeferred
async def test_least_recently_used_files_are_evicted(
    json_upstream: Served, proxy_factory: Any, tmp_path: Path, dists: list[Dist]
) -> None:
    """
    Past --max-cache-size the least recently served file goes: not the one
    cached first, if it was served since. The size is known after a restart.
    """
    names = {
        "alpha": "alpha-1.0-py3-none-any.whl",
        "beta": "beta-1.0-py3-none-any.whl",
        "gamma": "gamma-0.5-py3-none-any.whl",
    }
    sizes = {p: len(find(dists, n).content) for p, n in names.items()}
    running = proxy_factory(json_upstream.url, tmp_path / "c")
    files = running.proxy.files
    await Deferred.fromCoroutine(files.load_usage())
    files.usage.max_size = sum(sizes.values()) - 1

    async def fetch(project: str) -> str | None:
        response, body = await get(f"{running.url}/files/{project}/{names[project]}")
        assert body == find(dists, names[project]).content
        await Deferred.fromCoroutine(files.wait_idle())
        return header(response, "x-cache")

    assert await fetch("alpha") == "MISS"
    assert await fetch("beta") == "MISS"
    assert await fetch("alpha") == "HIT"  # alpha is now more recent than beta
    assert files.usage.size == sizes["alpha"] + sizes["beta"]
    assert await fetch("gamma") == "MISS"  # over the limit: beta goes
    assert files.usage.evictions == 1 and files.usage.size == sizes["alpha"] + sizes["gamma"]
    assert sorted(p.name for p in cached_files(running)) == [names["alpha"], names["gamma"]]
    await running.stop()

    again = proxy_factory(json_upstream.url, tmp_path / "c")
    await Deferred.fromCoroutine(again.proxy.files.load_usage())
    assert (again.proxy.files.usage.size, again.proxy.files.usage.count) == (
        sizes["alpha"] + sizes["gamma"],
        2,
    )
    response, _ = await get(f"{again.url}/files/beta/{names['beta']}")
    assert header(response, "x-cache") == "MISS"
    assert json_upstream.fake.requests["/packages/" + names["beta"]] == 2
    assert json_upstream.fake.requests["/packages/" + names["alpha"]] == 1

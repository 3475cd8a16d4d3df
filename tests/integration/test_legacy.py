"""
The legacy JSON API through a real proxy over loopback (#13): the shape
field by field against the fake upstream's own, file URLs on the proxy,
a client reading it as renovate and dependabot do, the group's policy
applied (info of the newest visible version, a hidden version a 403),
caching (one upstream request, ETag/304, gzip, stale while the upstream
is down), and the paths: /pypi/, /<group>/pypi/, a project named simple.
"""

from __future__ import annotations

import gzip
import json
import sys
from collections.abc import Callable
from typing import Any

import pytest_twisted
from twisted.internet.utils import getProcessOutputAndValue

from tests.conftest import Served, clean_env, get_reactor
from tests.integration import test_policy as policy
from tests.integration.test_http_semantics import get
from tests.integration.test_policy import OLD, YOUNG, YOUNG_SDIST, Proxy, config
from tests.integration.test_proxy import header

upstream = policy.upstream
start = policy.start


def upstream_host(upstream: Served) -> str:
    return upstream.url.split("/")[2]


def rewritten(expected: dict[str, Any], upstream: Served, proxy: Proxy) -> dict[str, Any]:
    """
    The upstream's answer with each file URL where the proxy serves it.
    """
    files = [*(f for fs in expected.get("releases", {}).values() for f in fs), *expected["urls"]]
    for f in files:
        f["url"] = f"{proxy.url}/default/files/acc-timed/{f['filename']}"
    return expected


@pytest_twisted.ensureDeferred
async def test_the_shape_is_the_upstreams_with_urls_on_the_proxy(
    upstream: Served, start: Callable[..., Proxy]
) -> None:
    proxy = start(config(upstream, "{}"))
    response, body = await get(f"{proxy.url}/pypi/acc-timed/json")
    assert response.code == 200 and header(response, "content-type") == "application/json"
    expected = upstream.fake.json_api(upstream_host(upstream), "acc-timed")
    assert expected is not None
    assert json.loads(body) == rewritten(expected, upstream, proxy)
    response, body = await get(f"{proxy.url}/pypi/acc-timed/1.0/json")
    version = upstream.fake.json_api(upstream_host(upstream), "acc-timed", "1.0")
    assert version is not None and json.loads(body) == rewritten(version, upstream, proxy)
    # The same under the group's own path; once from the upstream.
    response, again = await get(f"{proxy.url}/default/pypi/acc-timed/json")
    assert response.code == 200
    assert upstream.fake.requests["/pypi/acc-timed/json"] == 1


#: How renovate and dependabot read the JSON API, with a plain HTTP client:
#: info.version, releases, urls, then a download of a listed file.
RENOVATE_LIKE = """
import hashlib, json, sys, urllib.request
data = json.load(urllib.request.urlopen(sys.argv[1]))
wheel = next(f for f in data["urls"] if f["packagetype"] == "bdist_wheel")
content = urllib.request.urlopen(wheel["url"]).read()
assert hashlib.sha256(content).hexdigest() == wheel["digests"]["sha256"], "wrong bytes"
print(data["info"]["version"], ",".join(sorted(data["releases"])), wheel["filename"])
"""


@pytest_twisted.ensureDeferred
async def test_a_client_reads_it_as_renovate_and_dependabot_do(
    upstream: Served, start: Callable[..., Proxy]
) -> None:
    proxy = start(config(upstream, "{}"))
    out, err, code = await getProcessOutputAndValue(
        sys.executable,
        ["-I", "-c", RENOVATE_LIKE, f"{proxy.url}/pypi/acc-timed/json"],
        env=clean_env(),
        reactor=get_reactor(),
    )
    assert code == 0, err.decode()
    assert out.decode().split() == ["2.0", "1.0,2.0", YOUNG.filename]


@pytest_twisted.ensureDeferred
async def test_the_groups_policy_applies(upstream: Served, start: Callable[..., Proxy]) -> None:
    proxy = start(config(upstream, "{min-release-age: 7d}"))
    _, body = await get(f"{proxy.url}/pypi/acc-timed/json")
    data = json.loads(body)
    assert sorted(data["releases"]) == ["1.0"]
    # The newest upstream version is hidden: info is 1.0's, from its own URL.
    assert data["info"]["version"] == "1.0" and [f["filename"] for f in data["urls"]] == [OLD.filename]
    assert upstream.fake.requests["/pypi/acc-timed/1.0/json"] == 1
    response, text = await get(f"{proxy.url}/pypi/acc-timed/2.0/json")
    assert response.code == 403 and text.startswith(b"younger than min-release-age 7d")
    # The mirror group has no policy.
    _, body = await get(f"{proxy.url}/mirror/pypi/acc-timed/json")
    assert sorted(json.loads(body)["releases"]) == ["1.0", "2.0"]
    assert {YOUNG.filename, YOUNG_SDIST.filename} <= {f["filename"] for f in json.loads(body)["urls"]}


@pytest_twisted.ensureDeferred
async def test_validators_gzip_and_stale(upstream: Served, start: Callable[..., Proxy]) -> None:
    proxy = start(config(upstream, "{}").replace("groups:", "index-ttl: 0\nstale-ttl: 3600\ngroups:"))
    url = f"{proxy.url}/pypi/acc-timed/json"
    response, body = await get(url)
    etag = header(response, "etag")
    assert etag is not None
    response, _ = await get(url, {b"if-none-match": [etag.encode()]})
    assert response.code == 304
    response, zipped = await get(url, {b"accept-encoding": [b"gzip"]})
    assert header(response, "content-encoding") == "gzip" and gzip.decompress(zipped) == body
    upstream.fake.page_faults["acc-timed"] = "500"
    response, stale = await get(url)
    assert response.code == 200 and header(response, "x-cache") == "STALE" and stale == body


@pytest_twisted.ensureDeferred
async def test_paths_and_an_upstream_without_it(upstream: Served, start: Callable[..., Proxy]) -> None:
    proxy = start(config(upstream, "{}", "    json-api: false"))
    response, _ = await get(f"{proxy.url}/pypi/acc-timed/json")
    assert response.code == 404 and upstream.fake.requests["/pypi/acc-timed/json"] == 0
    # /pypi/simple/json is the JSON API of a project named simple; with a
    # slash it is a Simple API page.
    response, text = await get(f"{proxy.url}/pypi/simple/json")
    assert response.code == 404 and text == b"no such project: simple\n"  # not the page of "json"
    response, _ = await get(f"{proxy.url}/pypi/Acc_Timed/json")
    assert (
        response.code == 301
        and header(
            response,
            "location",
        )
        == "/pypi/acc-timed/json"
    )


@pytest_twisted.ensureDeferred
async def test_urls_through_a_trusted_reverse_proxy(upstream: Served, start: Callable[..., Proxy]) -> None:
    proxy = start(config(upstream, "{}").replace("groups:", "trusted-proxy: [127.0.0.1]\ngroups:"))
    forwarded = {b"x-forwarded-proto": [b"https"], b"x-forwarded-host": [b"cache.example"]}
    _, body = await get(f"{proxy.url}/pypi/acc-timed/json", forwarded)
    urls = {f["url"] for f in json.loads(body)["urls"]}
    assert urls and all(u.startswith("https://cache.example/default/files/acc-timed/") for u in urls)
    plain = start(config(upstream, "{}"))
    _, body = await get(f"{plain.url}/pypi/acc-timed/json", forwarded)
    assert all(f["url"].startswith(plain.url + "/") for f in json.loads(body)["urls"])


@pytest_twisted.ensureDeferred
async def test_a_blocked_project_is_a_404_as_its_page(upstream: Served, start: Callable[..., Proxy]) -> None:
    proxy = start(config(upstream, '{block: ["evil-*"]}'))
    response, text = await get(f"{proxy.url}/pypi/evil-lib/json")
    assert response.code == 404 and text == b"evil-lib is blocked by 'evil-*'\n"
    response, _ = await get(f"{proxy.url}/pypi/acc-timed/../json")
    assert response.code in (400, 404)


def test_info_is_the_newest_final_release() -> None:
    from txpypi.cache.legacy import _newest

    assert _newest(["1.0", "3.0b1", "2.0.dev1"]) == "1.0"
    assert _newest(["3.0b1", "2.0a1"]) == "3.0b1"


@pytest_twisted.ensureDeferred
async def test_made_up_versions_cost_one_upstream_request_each_per_negative_ttl(
    upstream: Served, start: Callable[..., Proxy]
) -> None:
    proxy = start(config(upstream, "{}"))
    for _ in range(3):
        response, _ = await get(f"{proxy.url}/pypi/acc-timed/9.9.9/json")
        assert response.code == 404
    assert upstream.fake.requests["/pypi/acc-timed/9.9.9/json"] == 1

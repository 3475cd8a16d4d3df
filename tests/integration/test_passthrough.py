"""
Nothing added that the upstream did not say, and nothing it said dropped:
a file without core metadata has no core-metadata key in JSON; the last
serial (C{meta._last-serial}, C{X-PyPI-Last-Serial}), PEP 708's tracks and
PEP 740's provenance (served by the proxy, cached) pass through, from a
JSON or an HTML upstream.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any
from urllib.parse import urljoin

import attrs
import pytest
import pytest_twisted
from twisted.web.server import Site

from tests.conftest import Served, listen
from tests.integration.test_groups import json_accept
from tests.integration.test_http_semantics import get
from tests.integration.test_proxy import header
from txpypi.testing import FakeUpstream, build_wheel

PLAIN = attrs.evolve(build_wheel("plain", "1.0"), metadata=None)
WITH_METADATA = build_wheel("plain", "1.1")


@pytest.fixture(params=["json", "html"])
def upstream(request: pytest.FixtureRequest) -> Iterator[Served]:
    fake = FakeUpstream([PLAIN, WITH_METADATA], mode=request.param)
    port = listen(Site(fake))
    yield Served(fake, port)
    pytest_twisted.blockon(port.stopListening())


@pytest_twisted.ensureDeferred
async def test_core_metadata_and_the_last_serial_pass_through(
    upstream: Served, proxy_factory: object
) -> None:
    running = proxy_factory(upstream.url)  # type: ignore[operator]
    response, body = await get(f"{running.url}/simple/plain/", json_accept())
    page = json.loads(body)
    entries = {f["filename"]: f for f in page["files"]}
    assert (
        "core-metadata" not in entries[PLAIN.filename] and "dist-info-metadata" not in entries[PLAIN.filename]
    )
    assert set(entries[WITH_METADATA.filename]["core-metadata"]) == {"sha256"}
    assert page["meta"]["_last-serial"] == 42
    assert header(response, "x-pypi-last-serial") == "42"


PROVENANCE = json.dumps({"version": 1, "attestation_bundles": [{"publisher": {"kind": "GitHub"}}]}).encode()


@pytest_twisted.ensureDeferred
async def test_provenance_is_served_from_the_cache_and_pep_708_passes(
    upstream: Served, proxy_factory: Any
) -> None:
    """
    A file's provenance link points at the proxy, which fetches the object
    once, checks it is JSON, and serves it again without asking; the
    page's PEP 708 tracks pass through in both formats.
    """
    upstream.fake.provenances[WITH_METADATA.filename] = PROVENANCE
    upstream.fake.tracks["plain"] = ["https://pypi.org/simple/plain/"]
    running = proxy_factory(upstream.url)
    page_url = f"{running.url}/simple/plain/"
    _, body = await get(page_url, json_accept())
    page = json.loads(body)
    assert page["tracks"] == ["https://pypi.org/simple/plain/"]
    entry = {f["filename"]: f for f in page["files"]}[WITH_METADATA.filename]
    assert entry["provenance"] == f"../../files/plain/{WITH_METADATA.filename}.provenance"
    _, html = await get(page_url)
    assert b'<meta name="pypi:tracks" content="https://pypi.org/simple/plain/">' in html
    assert f'data-provenance="../../files/plain/{WITH_METADATA.filename}.provenance"'.encode() in html
    url = urljoin(page_url, entry["provenance"])
    for _ in range(2):
        response, content = await get(url)
        assert response.code == 200 and content == PROVENANCE
        assert header(response, "content-type") == "application/vnd.pypi.integrity.v1+json"
    asked = upstream.fake.requests[f"/integrity/{WITH_METADATA.filename}/provenance"]
    assert asked == 1
    response, _ = await get(urljoin(page_url, f"../../files/plain/{PLAIN.filename}.provenance"))
    assert response.code == 404


@pytest_twisted.ensureDeferred
async def test_a_provenance_that_is_not_json_is_not_cached(upstream: Served, proxy_factory: Any) -> None:
    upstream.fake.provenances[WITH_METADATA.filename] = b"<html>oops</html>"
    running = proxy_factory(upstream.url)
    url = f"{running.url}/files/plain/{WITH_METADATA.filename}.provenance"
    for _ in range(2):
        response, text = await get(url)
        assert response.code == 502 and b"is not a JSON object" in text
    assert upstream.fake.requests[f"/integrity/{WITH_METADATA.filename}/provenance"] == 2

"""
Nothing added that the upstream did not say, and nothing it said dropped:
a file without core metadata has no core-metadata key in JSON, and the
last serial (C{meta._last-serial}, C{X-PyPI-Last-Serial}) passes through
from a JSON or an HTML upstream.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

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

"""
The status page in a real headless Chromium (Debian's chromium, installed by
.ci/run): the figures are in the rendered DOM, and a screenshot is taken.
"""

from __future__ import annotations

import shutil
import struct
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.utils import getProcessOutputAndValue

from tests.conftest import Served, clean_env, get_reactor
from tests.integration.test_http_semantics import get

FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1000,1000",
]


async def chromium(*args: str, profile: Path) -> bytes:
    binary = shutil.which("chromium")
    assert binary is not None, "chromium is needed (Debian package chromium, installed by .ci/run)"
    out, err, code = await getProcessOutputAndValue(
        binary, [*FLAGS, f"--user-data-dir={profile}", *args], env=clean_env(), reactor=get_reactor()
    )
    assert code == 0, err.decode("utf-8", "replace")
    return bytes(out)


@pytest_twisted.ensureDeferred
async def test_status_page_in_chromium(json_upstream: Served, proxy_factory: Any, tmp_path: Path) -> None:
    running = proxy_factory(json_upstream.url)
    await Deferred.fromCoroutine(running.proxy.files.load_usage())
    await get(running.url + "/files/gamma/gamma-0.5-py3-none-any.whl")
    await Deferred.fromCoroutine(running.proxy.files.wait_idle())
    url = running.url + "/"

    dom = (await chromium("--dump-dom", url, profile=tmp_path / "p1")).decode()
    assert "txpypi" in dom and f"{running.url}/simple/" in dom
    assert 'id="cache-files">1<' in dom and 'id="upstream-state" class="ok">ok<' in dom
    assert '<td>gamma</td><td class="n">1</td>' in dom

    shot = tmp_path / "status.png"
    await chromium(f"--screenshot={shot}", url, profile=tmp_path / "p2")
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1000, 1000)
    assert len(data) > 10_000  # text and tables, not a blank page

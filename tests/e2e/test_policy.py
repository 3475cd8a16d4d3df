"""
End to end, policy (#13): real pip and real uv, with no cut-off flags of
their own and their configuration shut out (as in
L{tests.e2e.test_install}), install through a group with a minimum
release age and get the old version; an exemption changes the outcome.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import pytest
import pytest_twisted

from tests.conftest import TLS, Served, clean_env
from tests.e2e.test_install import pip_install, run, uv_install
from tests.integration import test_policy as policy
from tests.integration.test_policy import DAY, YOUNG, Proxy, config

upstream = policy.upstream
start = policy.start

INSTALLERS = {"pip": pip_install, "uv": uv_install}


async def version(target: Path) -> str:
    script = f"import sys; sys.path.insert(0, {str(target)!r}); import acc_timed; print(acc_timed.VERSION)"
    return (await run([sys.executable, "-I", "-c", script], clean_env())).strip()


@pytest.mark.parametrize("client", ["pip", "uv"])
@pytest_twisted.ensureDeferred
async def test_a_release_age_installs_the_old_version(
    client: str, upstream: Served, start: Callable[..., Proxy], tls: TLS, tmp_path: Path
) -> None:
    proxy = start(config(upstream, "{min-release-age: 7d}"), endpoint=tls.endpoint())
    index = f"https://localhost:{proxy.running.port.getHost().port}/simple/"
    await INSTALLERS[client](index, tls, tmp_path / "t", "acc-timed")
    assert await version(tmp_path / "t") == "1.0"
    assert upstream.fake.requests["/packages/" + YOUNG.filename] == 0


@pytest_twisted.ensureDeferred
async def test_an_exemption_installs_the_young_version(
    upstream: Served, start: Callable[..., Proxy], tls: TLS, tmp_path: Path
) -> None:
    until = datetime.fromtimestamp(time.time() + 3 * DAY, UTC).strftime("%Y-%m-%d")
    exemption = f'{{project: acc-timed, versions: "==2.0", until: {until}, reason: "reviewed"}}'
    proxy = start(
        config(upstream, f"{{min-release-age: 7d, exempt: [{exemption}]}}"), endpoint=tls.endpoint()
    )
    index = f"https://localhost:{proxy.running.port.getHost().port}/simple/"
    await uv_install(index, tls, tmp_path / "t", "acc-timed")
    assert await version(tmp_path / "t") == "2.0"


@pytest_twisted.ensureDeferred
async def test_a_block_list_changes_what_is_installed(
    upstream: Served, start: Callable[..., Proxy], tls: TLS, tmp_path: Path
) -> None:
    proxy = start(config(upstream, '{block: ["acc-timed>=2"]}'), endpoint=tls.endpoint())
    index = f"https://localhost:{proxy.running.port.getHost().port}/simple/"
    await pip_install(index, tls, tmp_path / "t", "acc-timed")
    assert await version(tmp_path / "t") == "1.0"

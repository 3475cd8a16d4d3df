"""
End to end: real pip and real uv install a small dependency tree through
txpypi listening on TLS (a trustme CA), cold and then warm.  The clients'
own configuration is shut out so that nothing can come from elsewhere.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.utils import getProcessOutputAndValue

from tests.conftest import TLS, Served, clean_env, get_reactor
from tests.processes import Twistd

WANTED = {"alpha-1.0-py3-none-any.whl", "beta-1.1-py3-none-any.whl", "gamma-0.5-py3-none-any.whl"}


def uv_bin() -> str:
    from uv import find_uv_bin

    return str(find_uv_bin())


async def run(argv: list[str], env: dict[str, str]) -> str:
    out, err, code = await getProcessOutputAndValue(argv[0], argv[1:], env=env, reactor=get_reactor())
    text = (out + err).decode("utf-8", "replace")
    assert code == 0, f"{argv} failed:\n{text}"
    return text


async def pip_install(index: str, tls: TLS, target: Path, *packages: str) -> str:
    argv = [sys.executable, "-m", "pip", "install", "--no-cache-dir", "--disable-pip-version-check"]
    argv += ["--isolated", "--index-url", index, "--cert", str(tls.ca), "--target", str(target), *packages]
    return await run(argv, clean_env())


async def uv_install(index: str, tls: TLS, target: Path, *packages: str) -> str:
    argv = [uv_bin(), "pip", "install", "--no-config", "--no-cache", "--no-python-downloads"]
    argv += ["--python", sys.executable, "--index-url", index, "--target", str(target), *packages]
    return await run(argv, clean_env(SSL_CERT_FILE=str(tls.ca)))


async def assert_imports(target: Path) -> None:
    code = "import alpha, beta, gamma; print(alpha.VERSION, beta.VERSION, gamma.VERSION)"
    script = f"import sys; sys.path.insert(0, {str(target)!r}); {code}"
    out = await run([sys.executable, "-I", "-c", script], clean_env())
    assert out.split() == ["1.0", "1.1", "0.5"]


def file_counts(upstream: Served) -> dict[str, int]:
    return {
        path.removeprefix("/packages/"): n
        for path, n in upstream.fake.requests.items()
        if path.startswith("/packages/")
    }


INSTALLERS = {"pip": pip_install, "uv": uv_install}


@pytest.mark.parametrize("cold_client, warm_client", [("pip", "uv"), ("uv", "pip")])
@pytest_twisted.ensureDeferred
async def test_cold_then_warm_install(
    cold_client: str, warm_client: str, upstream: Served, proxy_factory: Any, tls: TLS, tmp_path: Path
) -> None:
    """
    A cold install fetches each page and file it needs from the upstream
    exactly once, with GETs only (no HEAD, no redirect hop); a warm install
    with the other client asks the upstream for no file at all.
    """
    running = proxy_factory(upstream.url, endpoint=tls.endpoint())
    index = f"https://localhost:{running.port.getHost().port}/simple/"
    await INSTALLERS[cold_client](index, tls, tmp_path / "cold", "alpha")
    await assert_imports(tmp_path / "cold")
    cold = file_counts(upstream)
    assert {name for name in cold if not name.endswith(".metadata")} == WANTED
    assert set(cold.values()) == {1}
    assert {method for method, _ in upstream.fake.methods} == {"GET"}
    pages = [p for _, p in upstream.fake.methods if p.startswith("/simple/")]
    assert sorted(pages) == ["/simple/alpha/", "/simple/beta/", "/simple/gamma/"]

    await Deferred.fromCoroutine(running.proxy.files.wait_idle())
    await INSTALLERS[warm_client](index, tls, tmp_path / "warm", "alpha")
    await assert_imports(tmp_path / "warm")
    warm = file_counts(upstream)
    # The clients may differ only in which metadata files they read.
    assert {k: v for k, v in warm.items() if not k.endswith(".metadata")} == {k: 1 for k in WANTED}
    assert set(warm.values()) == {1}


# -- a real twistd process


@pytest.fixture
def twistd_process(tls: TLS, tmp_path: Path, json_upstream: Served) -> Iterator[Twistd]:
    config = tmp_path / "txpypi.yaml"
    config.write_text(f"upstream: {json_upstream.url}\nindex-ttl: 30\ncache-dir: {tmp_path / 'cache'}\n")
    process = Twistd.start(["--config", str(config), "--listen", tls.endpoint()], tmp_path)
    yield process
    pytest_twisted.blockon(process.stop())


@pytest_twisted.ensureDeferred
async def test_twistd_plugin_over_tls(
    twistd_process: Any, json_upstream: Served, tls: TLS, tmp_path: Path
) -> None:
    """
    C{twistd -n txpypi --config FILE --listen ssl:...} serves uv.
    """
    port = await twistd_process.listening
    index = f"https://localhost:{port}/simple/"
    await uv_install(index, tls, tmp_path / "t", "alpha")
    await assert_imports(tmp_path / "t")
    assert {k for k in file_counts(json_upstream) if not k.endswith(".metadata")} == WANTED
    assert os.path.exists(tmp_path / "cache" / "metadata.sqlite")
    # Choosing the plugin chose txpypi's reactor (see txpypi.reactor).
    assert b"reactor class: txpypi.reactor.QuickEPollReactor" in twistd_process.output

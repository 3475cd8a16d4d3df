"""
Fixtures: a fake upstream on loopback serving wheels and sdists built here,
and the proxy under test, built from the same code twistd runs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
import treq
import trustme
from treq.client import HTTPClient
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import serverFromString
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.server import Site

from tests.fixtures import redis_server, s3_bucket, seaweedfs  # noqa: F401  (fixtures)
from txpypi.config import Settings
from txpypi.tap import build
from txpypi.testing import Dist, FakeUpstream, build_sdist, build_wheel
from txpypi.web.app import Proxy

ROOT = Path(__file__).resolve().parent.parent


def get_reactor() -> Any:
    from twisted.internet import reactor

    return reactor


def make_dists() -> list[Dist]:
    """
    A small dependency tree: alpha -> beta -> gamma, with an extra version
    of beta, an sdist, a yanked file and a file with requires-python.
    """
    return [
        build_wheel("alpha", "1.0", ["beta>=1.0"]),
        build_wheel("beta", "1.0", ["gamma"]),
        build_wheel("beta", "1.1", ["gamma"]),
        build_sdist("beta", "1.1", ["gamma"]),
        build_wheel("gamma", "0.5", requires_python=">=3.8"),
        attrs.evolve(build_wheel("gamma", "0.4"), yanked="broken build"),
        build_wheel("big", "1.0", padding=3 * 1024 * 1024),
    ]


@pytest.fixture(scope="session")
def dists() -> list[Dist]:
    return make_dists()


@attrs.define
class Served:
    """
    A fake upstream listening on loopback.
    """

    fake: FakeUpstream
    port: Any

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port.getHost().port}/simple/"


def listen(site: Site, description: str = "tcp:0:interface=127.0.0.1") -> Any:
    """
    Listen on a server endpoint.  TCP and TLS listens complete at once, so
    this works inside a test as well as in a fixture.
    """
    d = serverFromString(get_reactor(), description).listen(site)
    result: list[Any] = []
    d.addBoth(result.append)
    assert result, "listen did not complete synchronously"
    if isinstance(result[0], Exception) or hasattr(result[0], "raiseException"):
        result[0].raiseException()
    return result[0]


@pytest.fixture(params=["json", "html"])
def upstream(request: pytest.FixtureRequest, dists: list[Dist]) -> Iterator[Served]:
    """
    The fake upstream, in JSON mode and in HTML-only mode.
    """
    fake = FakeUpstream(dists, mode=request.param)
    port = listen(Site(fake))
    yield Served(fake, port)
    pytest_twisted.blockon(port.stopListening())


@pytest.fixture
def json_upstream(dists: list[Dist]) -> Iterator[Served]:
    fake = FakeUpstream(dists, mode="json")
    port = listen(Site(fake))
    yield Served(fake, port)
    pytest_twisted.blockon(port.stopListening())


@attrs.define
class Running:
    """
    A proxy under test, listening on loopback.
    """

    proxy: Proxy
    service: Any
    port: Any
    scheme: str = "http"
    host: str = "127.0.0.1"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port.getHost().port}"

    stopped: bool = False

    async def stop(self) -> None:
        if not self.stopped:
            self.stopped = True
            await self.port.stopListening()
            await self.service.stopService()


def start_proxy(
    upstream_url: str, cache_dir: Path, endpoint: str = "tcp:0:interface=127.0.0.1", **more: Any
) -> Running:
    settings = Settings(listen=(), upstream=upstream_url, cache_dir=str(cache_dir), **more)
    service, proxy = build(settings, get_reactor())
    service.startService()
    port = listen(proxy.site(), endpoint)
    return Running(proxy, service, port)


@pytest.fixture
def proxy_factory(tmp_path: Path) -> Iterator[Any]:
    """
    Start proxies (stopped at the end of the test).
    """
    running: list[Running] = []

    def factory(
        upstream_url: str, cache_dir: Path | None = None, endpoint: str | None = None, **more: Any
    ) -> Running:
        p = start_proxy(
            upstream_url, cache_dir or tmp_path / "cache", endpoint or "tcp:0:interface=127.0.0.1", **more
        )
        running.append(p)
        return p

    yield factory
    for p in reversed(running):
        pytest_twisted.blockon(Deferred.fromCoroutine(p.stop()))


@pytest.fixture
def proxy(upstream: Served, proxy_factory: Any) -> Running:
    running: Running = proxy_factory(upstream.url)
    return running


@pytest.fixture
def http() -> Iterator[HTTPClient]:
    """
    A treq client with its own pool, closed at the end of the test.
    """
    pool = HTTPConnectionPool(get_reactor(), persistent=True)
    pool.maxPersistentPerHost = 64
    yield HTTPClient(Agent(get_reactor(), pool=pool))
    pytest_twisted.blockon(pool.closeCachedConnections())


#: Certificate bundles set machine-wide; they would override pip's --cert.
_CA_VARIABLES = {"REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE", "SSL_CERT_DIR"}


def clean_env(**extra: str) -> dict[str, str]:
    """
    The environment for pip or uv run through the proxy, and for the
    proxy's own processes: the machine's pip configuration and every PIP_*,
    UV_* and TXPYPI_* variable shut out.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PIP_", "UV_", "TXPYPI_")) and k not in _CA_VARIABLES
    }
    env["PIP_CONFIG_FILE"] = os.devnull
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    env["PIP_NO_INPUT"] = "1"
    env.update(extra)
    return env


@attrs.frozen
class TLS:
    ca: Path
    key: Path
    cert: Path

    def endpoint(self, port: int = 0) -> str:
        return f"ssl:{port}:privateKey={self.key}:certKey={self.cert}:interface=127.0.0.1"


@pytest.fixture(scope="session")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TLS:
    directory = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    server = ca.issue_cert("localhost", "127.0.0.1")
    paths = TLS(directory / "ca.pem", directory / "key.pem", directory / "cert.pem")
    ca.cert_pem.write_to_path(str(paths.ca))
    server.private_key_pem.write_to_path(str(paths.key))
    server.cert_chain_pems[0].write_to_path(str(paths.cert))
    return paths


__all__ = ["ROOT", "TLS", "get_reactor", "Running", "Served", "clean_env", "start_proxy", "treq"]

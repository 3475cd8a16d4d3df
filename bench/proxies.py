"""
The proxies under measure (L{Proxy}: txpypi or proxpi, and where its index
is) and what the bench asks of them: a file's URL from the proxy's own
page, a warm answer, a purge, and whether a txpypi has a file in its store.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urljoin

from clients import Fetched, Streamed, delete, expect_200, head
from harness import Service, Services, free_ports, start_txpypi
from upstream import JSON_ACCEPT, UpstreamFile


@dataclass
class Proxy:
    name: str
    service: Service
    index: str  # the simple index base URL, ending in "/"
    admin_token: str | None = None

    @property
    def is_txpypi(self) -> bool:
        return self.name.startswith("txpypi")

    def page_url(self, project: str) -> str:
        return f"{self.index}{project}/"


def as_proxy(service: Service, work: Path) -> Proxy:
    """
    C{service}, a txpypi, as a L{Proxy} with its admin token.
    """
    return Proxy(service.name, service, f"{service.base}/simple/", (work / "admin-token").read_text().strip())


def start_instances(
    services: Services,
    work: Path,
    upstream: Service,
    instances: dict[str, list[str]],
    env: dict[str, str] | None = None,
) -> list[Proxy]:
    """
    Start txpypi instances (name -> arguments, each with a port of its own
    as C{{port}}), wait for them, and return them as proxies.
    """
    ports = free_ports(len(instances))
    started = [
        start_txpypi(services, work, name, port, upstream, *(a.format(port=port) for a in args), env=env)
        for (name, args), port in zip(instances.items(), ports, strict=True)
    ]
    for service in started:
        took = services.wait_ready(service)
        print(f"{service.name} ready on {service.base} after {took:.2f}s", flush=True)
    return [as_proxy(service, work) for service in started]


def file_url(proxy: Proxy, project: str, filename: str) -> str:
    """
    The proxy's own URL for C{filename}, read from its project page.
    """
    page = expect_200(proxy.page_url(project), JSON_ACCEPT)
    for entry in json.loads(page.body)["files"]:
        if entry["filename"] == filename:
            return urljoin(proxy.page_url(project), str(entry["url"]))
    raise RuntimeError(f"{proxy.name} does not list {filename} on {project}")


def warm_up(proxy: Proxy, url: str, accept: str | None = None, timeout: float = 10.0) -> Fetched:
    """
    GET C{url} until it is warm: a 200 without redirect, twice with the same
    body, and for txpypi an C{X-Cache: HIT} (a request that joins a fetch
    still landing in the cache says MISS).
    """
    deadline = time.monotonic() + timeout
    previous = expect_200(url, accept)
    while True:
        got = expect_200(url, accept)
        same = len(got.body) == len(previous.body)
        if same and (not proxy.is_txpypi or got.headers.get("x-cache") == "HIT"):
            return got
        if time.monotonic() > deadline:
            raise RuntimeError(f"{proxy.name} did not warm {url} in {timeout:.0f}s: {got.headers}")
        previous = got
        time.sleep(0.05)


def wait_cached(url: str, timeout: float = 10.0) -> bool:
    """
    Wait until txpypi answers C{X-Cache: HIT} for C{url} (a finished download
    may still be landing in the cache); whether it did.
    """
    deadline = time.monotonic() + timeout
    while head(url).get("x-cache") != "HIT":
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def landed(service: Service, filename: str) -> int:
    """
    How many times txpypi C{service} has logged that it cached C{filename}.
    """
    return service.log.read_text(errors="replace").count(f"cached {filename} (")


def wait_landed(service: Service, filename: str, before: int = 0, timeout: float = 60.0) -> float | None:
    """
    Wait until txpypi C{service} logs that C{filename} is in its store for
    the C{before + 1}th time; the seconds that took, or L{None} after
    C{timeout}.  (From the moment a download is verified, until it has
    landed, txpypi answers C{X-Cache: HIT} and serves it from the spool
    file: only then is a hit read from the store.)
    """
    start = time.monotonic()
    while landed(service, filename) <= before:
        if time.monotonic() - start > timeout:
            return None
        time.sleep(0.05)
    return time.monotonic() - start


def purge(proxy: Proxy, file: UpstreamFile, timeout: float = 10.0) -> bool:
    """
    Remove C{file} from txpypi's cache, waiting for it to have landed there first.
    """
    assert proxy.admin_token is not None
    url = f"{proxy.service.base}/cache/{file.project}/{file.filename}"
    deadline = time.monotonic() + timeout
    while (status := delete(url, proxy.admin_token)) == 404 and time.monotonic() < deadline:
        time.sleep(0.05)
    return status == 200


def check_stream(what: str, got: Streamed, file: UpstreamFile, x_cache: str | None = None) -> list[str]:
    """
    What is wrong with C{got}, a download of C{file}.
    """
    problems = []
    if got.status != 200:
        problems.append(f"{what}: status {got.status}")
    if got.size != file.size:
        problems.append(f"{what}: {got.size} bytes, not {file.size}")
    if got.sha256 is not None and got.sha256 != file.sha256:
        problems.append(f"{what}: wrong bytes (sha256 {got.sha256[:16]}..., not {file.sha256[:16]}...)")
    if x_cache is not None and got.headers.get("x-cache") != x_cache:
        problems.append(f"{what}: X-Cache {got.headers.get('x-cache')}, not {x_cache}")
    return problems

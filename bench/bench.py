"""
Benchmark txpypi against proxpi, both in front of the same fake upstream index.

Run from a checkout::

    python bench/bench.py [--duration 5] [--connections 32] [--big-mb 50]

It starts three processes on free loopback ports -- the fake upstream from
L{txpypi.testing} (this script again, with C{--serve-upstream}), txpypi under
twistd, and proxpi under gunicorn -- and measures, in one run:

 1. wrk throughput and p50/p99 latency of a warm index page;
 2. the same for a warm cached ~1 MB wheel;
 3. cold and warm C{uv pip install} of a small dependency tree;
 4. the upstream requests made by those installs (pages, files, HEADs);
 5. time to first byte of a cold 50 MB wheel, direct and through each proxy.

Nothing leaves 127.0.0.1.  Every process it started is stopped at the end.
"""

from __future__ import annotations

import argparse
import hashlib
import http.client
import importlib.util
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

REPO = Path(__file__).resolve().parent.parent
JSON_ACCEPT = "application/vnd.pypi.simple.v1+json"
HTML_ACCEPT = "text/html"

# --- What the fake upstream serves -------------------------------------------------------------

PAGE_PROJECT = "bench-page"  # a page with many releases, for the page benchmark
PAGE_RELEASES = 40
FILE_PROJECT = "bench-file"  # one ~1 MB wheel, for the file benchmark
# The dependency tree for uv, one copy per round (tree<round>-<node>) so that every
# round's cold install is cold: node -> requirements; each project has 1.0 and 1.1.
TREE_SHAPE: dict[str, list[str]] = {
    "top": ["a", "b"],
    "a": ["c", "d"],
    "b": ["d", "e"],
    "c": [],
    "d": ["f"],
    "e": ["f"],
    "f": [],
}
TREE_VERSIONS = ("1.0", "1.1")
BIG_PROJECT = "big-{}"


def wheel_name(project: str, version: str) -> str:
    """
    The file name L{txpypi.testing.build_wheel} gives a wheel.
    """
    return f"{project.replace('-', '_')}-{version}-py3-none-any.whl"


def tree(round_: int) -> dict[str, list[str]]:
    """
    Round C{round_}'s dependency tree: project -> requirements.
    """
    return {
        f"tree{round_}-{node}": [f"tree{round_}-{dep}>=1.0" for dep in deps]
        for node, deps in TREE_SHAPE.items()
    }


def tree_top(round_: int) -> str:
    return f"tree{round_}-top"


def build_dists(file_kb: int, big_mb: int, big_count: int, uv_rounds: int) -> list[Any]:
    from txpypi.testing import build_sdist, build_wheel

    dists = []
    for i in range(PAGE_RELEASES):
        version = f"1.{i}"
        dists.append(build_wheel(PAGE_PROJECT, version, requires=["tree-c"]))
        dists.append(build_sdist(PAGE_PROJECT, version, requires=["tree-c"]))
    dists.append(build_wheel(FILE_PROJECT, "1.0", padding=file_kb * 1024))
    for round_ in range(uv_rounds):
        for project, requires in tree(round_).items():
            for version in TREE_VERSIONS:
                dists.append(build_wheel(project, version, requires=requires))
    for i in range(big_count):
        dists.append(build_wheel(BIG_PROJECT.format(i), "1.0", padding=big_mb * 1024 * 1024))
    return dists


def serve_upstream(port: int, file_kb: int, big_mb: int, big_count: int, uv_rounds: int) -> None:
    """
    The C{--serve-upstream} mode: serve the fake index on 127.0.0.1:C{port},
    plus C{GET /_counts} (its request counters as JSON) and C{GET /_reset}.
    """
    sys.path.insert(0, str(REPO))
    from twisted.internet import reactor
    from twisted.web.resource import Resource
    from twisted.web.server import Request, Site

    from txpypi.testing import FakeUpstream

    fake = FakeUpstream(build_dists(file_kb, big_mb, big_count, uv_rounds), mode="json")

    class Counted(Resource):
        isLeaf = True

        def render(self, request: Request) -> bytes | int:  # type: ignore[override]
            if request.path == b"/_counts":
                request.setHeader(b"content-type", b"application/json")
                body = {
                    "requests": dict(fake.requests),
                    "methods": dict(Counter(method for method, _ in fake.methods)),
                    "non_get": [f"{m} {p}" for m, p in fake.methods if m != "GET"],
                }
                return json.dumps(body).encode()
            if request.path == b"/_reset":
                fake.requests.clear()
                fake.methods.clear()
                request.setHeader(b"content-type", b"application/json")
                return b"{}"
            return fake.render(request)

    site = Site(Counted())
    site.displayTracebacks = False
    reactor.listenTCP(port, site, interface="127.0.0.1")  # type: ignore[attr-defined,arg-type]
    print(f"fake upstream on 127.0.0.1:{port}", flush=True)
    reactor.run()  # type: ignore[attr-defined]


# --- Processes ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def clean_env(**extra: str) -> dict[str, str]:
    """
    The environment without pip/uv settings or HTTP proxies, plus C{extra}.
    """
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("PIP_", "UV_")) and k.lower() not in ("http_proxy", "https_proxy", "all_proxy")
    }
    env["NO_PROXY"] = env["no_proxy"] = "127.0.0.1,localhost"
    env.update(extra)
    return env


@dataclass
class Service:
    name: str
    port: int
    process: subprocess.Popen[bytes]
    log: Path

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


@dataclass
class Services:
    started: list[Service] = field(default_factory=list)

    def start(self, name: str, argv: Sequence[str], env: dict[str, str], port: int, workdir: Path) -> Service:
        log = workdir / f"{name}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                list(argv),
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                cwd=workdir,
            )
        service = Service(name, port, process, log)
        self.started.append(service)
        return service

    def wait_ready(self, service: Service, timeout: float = 60.0) -> float:
        """
        Poll until C{service}'s port accepts connections; return the seconds it took.
        """
        start = time.monotonic()
        while True:
            if service.process.poll() is not None:
                raise RuntimeError(
                    f"{service.name} exited with {service.process.returncode}:\n{service.tail()}"
                )
            try:
                with socket.create_connection(("127.0.0.1", service.port), timeout=0.5):
                    return time.monotonic() - start
            except OSError:
                pass
            if time.monotonic() - start > timeout:
                raise RuntimeError(f"{service.name} not listening after {timeout:.0f}s:\n{service.tail()}")
            time.sleep(0.05)

    def stop_all(self) -> None:
        for service in reversed(self.started):
            if service.process.poll() is None:
                service.process.terminate()
        for service in reversed(self.started):
            try:
                service.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                service.process.kill()
                service.process.wait(timeout=10)
        self.started.clear()


# --- HTTP helpers ------------------------------------------------------------------------------


@dataclass
class Fetched:
    status: int
    headers: dict[str, str]
    body: bytes
    ttfb: float  # seconds to the first body byte
    total: float
    redirects: int


def fetch(url: str, accept: str | None = None, max_redirects: int = 5, timeout: float = 120.0) -> Fetched:
    """
    GET C{url} on a fresh connection, following redirects, timing the first
    body byte of the final response from the moment we started connecting.
    """
    start = time.perf_counter()
    redirects = 0
    while True:
        parts = urlsplit(url)
        conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=timeout)
        try:
            headers = {"Accept-Encoding": "identity", "User-Agent": "txpypi-bench"}
            if accept:
                headers["Accept"] = accept
            conn.request("GET", parts.path + (f"?{parts.query}" if parts.query else ""), headers=headers)
            response = conn.getresponse()
            if response.status in (301, 302, 303, 307, 308) and redirects < max_redirects:
                response.read()
                redirects += 1
                url = urljoin(url, response.getheader("location") or "")
                continue
            first = response.read(1)
            ttfb = time.perf_counter() - start
            body = first + response.read()
            total = time.perf_counter() - start
            return Fetched(
                response.status,
                {k.lower(): v for k, v in response.getheaders()},
                body,
                ttfb,
                total,
                redirects,
            )
        finally:
            conn.close()


def get_json(url: str) -> Any:
    return json.loads(fetch(url).body)


def expect_200(url: str, accept: str | None = None) -> Fetched:
    """
    GET C{url} without following redirects; it must answer 200 directly.
    """
    got = fetch(url, accept, max_redirects=0)
    if got.status != 200:
        raise RuntimeError(f"{url} answered {got.status}, not 200: {got.body[:200]!r}")
    return got


# --- wrk ---------------------------------------------------------------------------------------

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if match is None:
        raise ValueError(f"cannot parse wrk duration {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


@dataclass
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: str  # non-2xx/3xx and socket errors, "" when none


def parse_wrk(output: str) -> WrkResult:
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.M)
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.M)
    total = re.search(r"^\s+(\d+) requests in", output, re.M)
    if not (rps and p50 and p99 and total):
        raise RuntimeError(f"cannot parse wrk output:\n{output}")
    errors = []
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    if non2xx:
        errors.append(f"{non2xx.group(1)} non-2xx/3xx")
    sock = re.search(r"Socket errors:\s+(.*)", output)
    if sock:
        errors.append(f"socket errors: {sock.group(1).strip()}")
    return WrkResult(
        float(rps.group(1)), _ms(p50.group(1)), _ms(p99.group(1)), int(total.group(1)), "; ".join(errors)
    )


def run_wrk(wrk: str, url: str, args: argparse.Namespace, accept: str | None = None) -> WrkResult:
    argv = [wrk, f"-t{args.threads}", f"-c{args.connections}", f"-d{args.duration}s", "--latency"]
    if accept:
        argv += ["-H", f"Accept: {accept}"]
    argv.append(url)
    done = subprocess.run(argv, capture_output=True, text=True, env=clean_env(), timeout=args.duration + 60)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return parse_wrk(done.stdout)


# --- uv ----------------------------------------------------------------------------------------


def find_uv() -> list[str]:
    beside = Path(sys.executable).parent / "uv"
    if beside.exists():
        return [str(beside)]
    try:
        from uv import find_uv_bin  # type: ignore[import-not-found]

        return [find_uv_bin()]
    except ImportError:
        pass
    found = shutil.which("uv")
    if found:
        return [found]
    raise SystemExit("error: uv not found (pip install uv)")


@dataclass
class UvRun:
    seconds: float
    counts: dict[str, Any]


def uv_install(uv: list[str], index_url: str, target: Path, upstream: str, round_: int) -> UvRun:
    get_json(f"{upstream}/_reset")
    argv = [
        *uv,
        "pip",
        "install",
        "--no-config",
        "--no-cache",
        "--python",
        sys.executable,
        "--target",
        str(target),
        "--index-url",
        index_url,
        tree_top(round_),
    ]
    env = clean_env(PIP_CONFIG_FILE="/dev/null")
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(
            f"uv failed ({done.returncode}) against {index_url}:\n{done.stdout}\n{done.stderr}"
        )
    installed = (target / tree_top(round_).replace("-", "_") / "__init__.py").read_text()
    if TREE_VERSIONS[-1] not in installed:
        raise RuntimeError(f"uv installed the wrong {tree_top(round_)}: {installed!r}")
    for project in tree(round_):
        if not (target / project.replace("-", "_") / "__init__.py").exists():
            raise RuntimeError(f"uv did not install {project} into {target}")
    return UvRun(seconds, get_json(f"{upstream}/_counts"))


@dataclass
class UpstreamTally:
    total: int
    distinct: int
    pages: int
    files: int
    non_get: list[str]
    unexpected: list[str]

    def line(self) -> str:
        text = (
            f"{self.total:3d} requests ({self.distinct} distinct paths): "
            f"{self.pages} pages, {self.files} files; non-GET: {len(self.non_get)}"
        )
        if self.non_get:
            text += f" {self.non_get[:3]}{' ...' if len(self.non_get) > 3 else ''}"
        if self.unexpected:
            text += f"; unexpected paths: {self.unexpected}"
        return text


def tally(counts: dict[str, Any], round_: int) -> UpstreamTally:
    requests: dict[str, int] = counts["requests"]
    latest = TREE_VERSIONS[-1]
    projects = tree(round_)
    # proxpi asks for /simple/<project> without the slash; the fake upstream serves both.
    needed = {f"/simple/{p}" for p in projects}
    needed |= {f"/packages/{wheel_name(p, latest)}" for p in projects}
    needed |= {f"/packages/{wheel_name(p, latest)}.metadata" for p in projects}
    asked = {p.rstrip("/") for p in requests}
    return UpstreamTally(
        total=sum(requests.values()),
        distinct=len(requests),
        pages=sum(n for p, n in requests.items() if p.startswith("/simple/")),
        files=sum(n for p, n in requests.items() if p.startswith("/packages/")),
        non_get=sorted(counts["non_get"]),
        unexpected=sorted(asked - needed),
    )


# --- The benchmark -----------------------------------------------------------------------------


@dataclass
class Proxy:
    name: str
    service: Service
    index: str  # the simple index base URL, ending in "/"

    def page_url(self, project: str) -> str:
        return f"{self.index}{project}/"


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
        if same and (proxy.name != "txpypi" or got.headers.get("x-cache") == "HIT"):
            return got
        if time.monotonic() > deadline:
            raise RuntimeError(f"{proxy.name} did not warm {url} in {timeout:.0f}s: {got.headers}")
        previous = got
        time.sleep(0.05)


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def fmt_wrk(r: WrkResult) -> str:
    text = f"{r.rps:10.0f} req/s   p50 {r.p50_ms:8.2f} ms   p99 {r.p99_ms:8.2f} ms   ({r.requests} requests)"
    return text + (f"   !! {r.errors}" if r.errors else "")


def section(title: str) -> None:
    print(f"\n== {title}", flush=True)


@contextmanager
def workspace(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="txpypi-bench-"))
    try:
        yield path
    finally:
        if keep:
            print(f"\n(kept {path})")
        else:
            shutil.rmtree(path, ignore_errors=True)


def start_all(services: Services, work: Path, args: argparse.Namespace) -> tuple[Service, Proxy, Proxy]:
    up_port, tx_port, px_port = free_port(), free_port(), free_port()
    while len({up_port, tx_port, px_port}) < 3:
        tx_port, px_port = free_port(), free_port()
    env = clean_env(PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    upstream = services.start(
        "upstream",
        [
            sys.executable,
            str(Path(__file__).resolve()),
            "--serve-upstream",
            str(up_port),
            "--file-kb",
            str(args.file_kb),
            "--big-mb",
            str(args.big_mb),
            "--ttfb-samples",
            str(args.ttfb_samples),
            "--uv-rounds",
            str(args.uv_rounds),
        ],
        env,
        up_port,
        work,
    )
    upstream_simple = f"{upstream.base}/simple/"
    tx_cache = work / "txpypi-cache"
    txpypi = services.start(
        "txpypi",
        [
            sys.executable,
            "-c",
            "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()",
            "-n",
            "--pidfile=",
            "txpypi",
            "--upstream",
            upstream_simple,
            "--cache-dir",
            str(tx_cache),
            "--listen",
            f"tcp:{tx_port}:interface=127.0.0.1",
        ],
        env,
        tx_port,
        work,
    )
    px_cache = work / "proxpi-cache"
    px_cache.mkdir()
    px_env = clean_env(
        PROXPI_INDEX_URL=upstream_simple,
        PROXPI_CACHE_DIR=str(px_cache),
        PYTHONUNBUFFERED="1",
    )
    proxpi = services.start(
        "proxpi",
        [
            sys.executable,
            "-m",
            "gunicorn",
            "--preload",
            "--workers",
            "1",
            "--threads",
            str(args.proxpi_threads),
            "--bind",
            f"127.0.0.1:{px_port}",
            "--logger-class",
            "proxpi.server._GunicornLogger",
            "proxpi.server:app",
        ],
        px_env,
        px_port,
        work,
    )
    for service in (upstream, txpypi, proxpi):
        took = services.wait_ready(service)
        print(f"{service.name:9s} ready on {service.base} after {took:.2f}s", flush=True)
    return (
        upstream,
        Proxy("txpypi", txpypi, f"{txpypi.base}/simple/"),
        Proxy("proxpi", proxpi, f"{proxpi.base}/index/"),
    )


def bench(args: argparse.Namespace) -> int:
    wrk = shutil.which("wrk")
    if wrk is None:
        print("error: wrk is not installed (Debian/Ubuntu: apt-get install wrk)", file=sys.stderr)
        return 2
    missing = [name for name in ("proxpi", "gunicorn") if importlib.util.find_spec(name) is None]
    if missing:
        print(f"error: {' and '.join(missing)} not installed (pip install proxpi gunicorn)", file=sys.stderr)
        return 2
    uv = find_uv()
    accept = JSON_ACCEPT if args.page_format == "json" else HTML_ACCEPT
    summary: list[tuple[str, str, str, str]] = []

    services = Services()
    with workspace(args.keep) as work:
        try:
            upstream, txpypi, proxpi = start_all(services, work, args)
            proxies = (txpypi, proxpi)

            # 3 & 4: uv installs, first, while both caches are empty.
            n = len(TREE_SHAPE)
            section(
                f"uv pip install tree<round>-top ({n} wheels, {args.uv_rounds} rounds, each a new tree): "
                "cold (empty proxy cache), then warm (new target)"
            )
            runs: dict[str, dict[str, list[UvRun]]] = {p.name: {"cold": [], "warm": []} for p in proxies}
            for round_ in range(args.uv_rounds):
                for proxy in proxies:
                    for phase in ("cold", "warm"):
                        target = work / f"target-{proxy.name}-{round_}-{phase}"
                        runs[proxy.name][phase].append(
                            uv_install(uv, proxy.index, target, upstream.base, round_)
                        )
            uv_ms: dict[tuple[str, str], float] = {}
            for proxy in proxies:
                for phase in ("cold", "warm"):
                    times = [r.seconds * 1000 for r in runs[proxy.name][phase]]
                    uv_ms[proxy.name, phase] = statistics.median(times)
                    each = ", ".join(f"{t:.0f}" for t in times)
                    print(
                        f"{proxy.name:7s} {phase}: median {uv_ms[proxy.name, phase]:6.0f} ms   (runs: {each})"
                    )
            for phase in ("cold", "warm"):
                tx_ms, px_ms = uv_ms["txpypi", phase], uv_ms["proxpi", phase]
                print(f"ratio txpypi/proxpi {phase}: {ratio(tx_ms, px_ms)} (lower is better)")
                summary.append(
                    (f"uv install, {phase}", f"{tx_ms:.0f} ms", f"{px_ms:.0f} ms", ratio(tx_ms, px_ms))
                )

            section("upstream requests made by those installs")
            needed = 3 * n
            print(f"needed per install: {needed} distinct ({n} pages + {n} .metadata + {n} wheels)")
            tallies: dict[tuple[str, str], list[UpstreamTally]] = {}
            for proxy in proxies:
                for phase in ("cold", "warm"):
                    found = [tally(r.counts, i) for i, r in enumerate(runs[proxy.name][phase])]
                    tallies[proxy.name, phase] = found
                    lines = {t.line().replace(f"tree{i}-", "tree*-") for i, t in enumerate(found)}
                    lines = {re.sub(r"tree\d+_", "tree*_", line) for line in lines}
                    for line in sorted(lines):
                        print(f"{proxy.name:7s} {phase}: {line}")
                    if len(lines) > 1:
                        print(f"        (the {len(found)} rounds differed)")
            tx_cold, tx_warm = tallies["txpypi", "cold"], tallies["txpypi", "warm"]
            px_cold, px_warm = tallies["proxpi", "cold"], tallies["proxpi", "warm"]

            def worst(found: list[UpstreamTally], attr: str) -> int:
                return max(getattr(t, attr) if attr != "non_get" else len(t.non_get) for t in found)

            summary.append(
                (
                    "upstream reqs, cold install",
                    f"{worst(tx_cold, 'total')} ({worst(tx_cold, 'non_get')} HEAD)",
                    f"{worst(px_cold, 'total')} ({worst(px_cold, 'non_get')} HEAD)",
                    ratio(worst(tx_cold, "total"), worst(px_cold, "total")),
                )
            )
            summary.append(
                (
                    "upstream file reqs, warm install",
                    str(worst(tx_warm, "files")),
                    str(worst(px_warm, "files")),
                    "-",
                )
            )
            for t in tx_cold:
                if t.total != needed or t.distinct != needed or t.non_get or t.unexpected:
                    print(
                        f"!! a txpypi cold install did not make exactly the {needed} needed upstream requests"
                    )
            if worst(tx_warm, "total"):
                print("!! a txpypi warm install made upstream requests")

            # 5: time to first byte of a cold big wheel.
            section(
                f"time to first byte, cold {args.big_mb} MB wheel ({args.ttfb_samples} sample(s), median)"
            )
            direct: list[float] = []
            through: dict[str, list[Fetched]] = {p.name: [] for p in proxies}
            for i in range(args.ttfb_samples):
                project = BIG_PROJECT.format(i)
                filename = wheel_name(project, "1.0")
                for _ in range(3):
                    got = fetch(f"{upstream.base}/packages/{filename}")
                    if got.status != 200:
                        raise RuntimeError(f"upstream answered {got.status} for {filename}")
                    direct.append(got.ttfb)
                digest = hashlib.sha256(got.body).hexdigest()
                for proxy in proxies:
                    url = file_url(proxy, project, filename)  # warms the page, so only the file is cold
                    got = fetch(url)
                    if got.status != 200 or hashlib.sha256(got.body).hexdigest() != digest:
                        raise RuntimeError(
                            f"{proxy.name} answered {got.status} or wrong bytes for {filename}"
                        )
                    if proxy.name == "txpypi" and got.headers.get("x-cache") != "MISS":
                        raise RuntimeError(f"txpypi's first fetch of {filename} was not a MISS")
                    through[proxy.name].append(got)
            d_ms = statistics.median(direct) * 1000
            print(f"direct from upstream: TTFB {d_ms:8.2f} ms")
            ttfb_ms: dict[str, float] = {}
            for proxy in proxies:
                fetched = through[proxy.name]
                ttfb_ms[proxy.name] = statistics.median(r.ttfb for r in fetched) * 1000
                total_ms = statistics.median(r.total for r in fetched) * 1000
                redirects = sum(r.redirects for r in fetched)
                print(
                    f"through {proxy.name:7s}:  TTFB {ttfb_ms[proxy.name]:8.2f} ms "
                    f"(+{ttfb_ms[proxy.name] - d_ms:.2f} ms over direct); whole file {total_ms:.0f} ms"
                    + (f"; {redirects} redirect(s) to the upstream followed" if redirects else "")
                )
            print(f"ratio txpypi/proxpi TTFB: {ratio(ttfb_ms['txpypi'], ttfb_ms['proxpi'])}")
            summary.append(("TTFB direct from upstream", f"{d_ms:.2f} ms", f"{d_ms:.2f} ms", "-"))
            summary.append(
                (
                    "TTFB cold big wheel",
                    f"{ttfb_ms['txpypi']:.2f} ms",
                    f"{ttfb_ms['proxpi']:.2f} ms",
                    ratio(ttfb_ms["txpypi"], ttfb_ms["proxpi"]),
                )
            )
            summary.append(
                (
                    "TTFB added over direct",
                    f"{ttfb_ms['txpypi'] - d_ms:.2f} ms",
                    f"{ttfb_ms['proxpi'] - d_ms:.2f} ms",
                    "-",
                )
            )

            # 1: warm page.
            wrk_desc = f"wrk -t{args.threads} -c{args.connections} -d{args.duration}s"
            section(f"warm index page /{PAGE_PROJECT}/ ({args.page_format}), {wrk_desc}")
            page_results: dict[str, WrkResult] = {}
            for proxy in proxies:
                url = proxy.page_url(PAGE_PROJECT)
                warm = warm_up(proxy, url, accept)
                page_results[proxy.name] = run_wrk(wrk, url, args, accept)
                print(f"{proxy.name:7s} {fmt_wrk(page_results[proxy.name])}   [{len(warm.body)} B body]")
            _summarize_wrk(summary, "warm page", page_results)

            # 2: warm file.
            filename = wheel_name(FILE_PROJECT, "1.0")
            section(f"warm cached file {filename} (~{args.file_kb} KB), {wrk_desc}")
            file_results: dict[str, WrkResult] = {}
            for proxy in proxies:
                url = file_url(proxy, FILE_PROJECT, filename)
                warm_up(proxy, url)
                file_results[proxy.name] = run_wrk(wrk, url, args)
                print(f"{proxy.name:7s} {fmt_wrk(file_results[proxy.name])}   [{url}]")
            _summarize_wrk(summary, "warm file", file_results)
        except Exception:
            # Show how each process fared, which usually explains the failure.
            died = {s.name: s.process.poll() for s in services.started}
            started = list(services.started)
            services.stop_all()
            for service in started:
                how = "running" if died[service.name] is None else f"had exited with {died[service.name]}"
                print(f"\n--- {service.name} ({how}); log tail:\n{service.tail(15)}", file=sys.stderr)
            raise
        finally:
            services.stop_all()

    print_summary(summary, args)
    return 0


def _summarize_wrk(
    summary: list[tuple[str, str, str, str]], what: str, results: dict[str, WrkResult]
) -> None:
    tx, px = results["txpypi"], results["proxpi"]
    print(
        f"ratio txpypi/proxpi: req/s {ratio(tx.rps, px.rps)} (higher is better), "
        f"p50 {ratio(tx.p50_ms, px.p50_ms)}, p99 {ratio(tx.p99_ms, px.p99_ms)} (lower is better)"
    )
    summary.append((f"{what} req/s", f"{tx.rps:.0f}", f"{px.rps:.0f}", ratio(tx.rps, px.rps)))
    summary.append((f"{what} p50", f"{tx.p50_ms:.2f} ms", f"{px.p50_ms:.2f} ms", ratio(tx.p50_ms, px.p50_ms)))
    summary.append((f"{what} p99", f"{tx.p99_ms:.2f} ms", f"{px.p99_ms:.2f} ms", ratio(tx.p99_ms, px.p99_ms)))


def print_summary(summary: list[tuple[str, str, str, str]], args: argparse.Namespace) -> None:
    header = ("measure", "txpypi", "proxpi", "txpypi/proxpi")
    widths = [max(len(row[i]) for row in [header, *summary]) for i in range(4)]
    rule = "-+-".join("-" * w for w in widths)
    worker = "gthread" if args.proxpi_threads > 1 else "sync"
    print("\n== summary")
    print(" | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)))
    print(rule)
    for row in summary:
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True)]
        print(" | ".join(cells))
    print(
        f"(proxpi: gunicorn {worker}, 1 worker, {args.proxpi_threads} thread(s); txpypi: twistd, one reactor "
        f"thread; {os.cpu_count()} CPUs shared with wrk and the upstream)"
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--duration", type=int, default=5, help="seconds per wrk run (default: 5)")
    parser.add_argument("--threads", type=int, default=2, help="wrk threads (default: 2)")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections (default: 32)")
    parser.add_argument(
        "--page-format",
        choices=["json", "html"],
        default="json",
        help="which index page format to load-test (default: json, what uv and pip ask for)",
    )
    parser.add_argument(
        "--file-kb", type=int, default=1024, help="size of the warm-file wheel (default: 1024)"
    )
    parser.add_argument("--big-mb", type=int, default=50, help="size of the TTFB wheel in MB (default: 50)")
    parser.add_argument(
        "--ttfb-samples", type=int, default=3, help="distinct big wheels to time cold (default: 3)"
    )
    parser.add_argument(
        "--proxpi-threads",
        type=int,
        default=2,
        help="gunicorn threads for proxpi (default: 2, as proxpi's Docker image runs it)",
    )
    parser.add_argument(
        "--uv-rounds",
        type=int,
        default=5,
        help="cold+warm uv installs per proxy, each a new tree (default: 5)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, caches)")
    parser.add_argument("--serve-upstream", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if (
        min(
            args.duration,
            args.threads,
            args.connections,
            args.ttfb_samples,
            args.proxpi_threads,
            args.uv_rounds,
        )
        < 1
    ):
        parser.error("counts and durations must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_upstream is not None:
        serve_upstream(args.serve_upstream, args.file_kb, args.big_mb, args.ttfb_samples, args.uv_rounds)
        return 0
    return bench(args)


if __name__ == "__main__":
    sys.exit(main())

"""
The memory and time txpypi takes to serve the root page (C{/simple/}) of an
index as big as PyPI's, against proxpi in the same run when it is installed.

Run from a checkout::

    python bench/root_page.py [--projects 700000] [--stalled 10] [--keep]

It starts, on free loopback ports and each in its own process (so that
only the proxy's own memory is counted):

  - the fake upstream of L{txpypi.testing}, its root page listing
    C{--projects} generated names (JSON, with C{_last-serial} as PyPI sends
    it, or HTML, gzip-compressed when asked for), rendered once at start;
  - txpypi under C{twistd -n txpypi}, with C{PYTHONPATH} set to the checkout;
  - proxpi under gunicorn (as its Docker image runs it), if it is installed
    (C{pip install proxpi gunicorn}, the bench extra).

For each proxy it GETs the root page as JSON with gzip (the first answer:
the upstream fetch, parse and render), then as JSON without gzip, as HTML
with and without gzip (warm answers), checks each body lists every project,
and prints the proxy's RSS before, at its peak and after (VmRSS and VmHWM
from C{/proc/<pid>/status}, the peak also sampled every 20 ms), and the
time of each answer.  txpypi's RSS after serving is held against the
150 MiB target (MET or MISSED).  Then, for txpypi only: C{--refreshes}
times the list forgotten (C{DELETE /cache/}) and fetched again (the
RSS after each, which must not creep up), C{--stalled} clients that ask
for the page and read nothing (the RSS they add), and a restart on the
same cache directory followed by C{--parallel} parallel GETs (the stored
copy loaded once, and the RSS that costs).  It exits 1 when the target
is missed.
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import importlib.util
import json
import secrets
import socket
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from harness import REPO, Service, Services, free_ports, session, start_proxpi
from harness import start_txpypi as start_instance
from sampling import RssSampler, process_tree, reset_hwm, rss_mib, status_kb
from upstream import HTML_ACCEPT, JSON_ACCEPT, start_upstream

MIB = 1024 * 1024
#: txpypi's RSS after serving the root page must stay under this.
RSS_TARGET_MIB = 150.0


# --- The upstream, in its own process ----------------------------------------------------------


def serve_upstream(port: int, projects: int) -> None:
    """
    Serve the fake upstream, its root page listing C{projects} names.
    """
    sys.path.insert(0, str(REPO))
    from twisted.internet import reactor
    from twisted.web.resource import Resource
    from twisted.web.server import Request, Site

    from txpypi.testing import FakeUpstream, generated_names

    fake = FakeUpstream()
    fake.list_projects(generated_names(projects))

    class Counted(Resource):
        isLeaf = True

        def render(self, request: Request) -> bytes | int:  # type: ignore[override]
            if request.path == b"/_counts":
                return json.dumps(fake.requests).encode()
            return fake.render(request)

    reactor.listenTCP(port, Site(Counted()), interface="127.0.0.1")  # type: ignore[attr-defined,arg-type]
    reactor.run()  # type: ignore[attr-defined]


# --- Memory (the processes are bench.py's) ---------------------------------------------------


def reset_peak(pids: list[int]) -> bool:
    """
    Reset each process's VmHWM to its current RSS; whether that worked for all.
    """
    return all([reset_hwm(pid) for pid in pids])


# --- HTTP --------------------------------------------------------------------------------------


@dataclass
class Answer:
    what: str
    status: int
    size: int  # bytes on the wire
    seconds: float
    projects: int
    x_cache: str
    rss_after: float = 0.0  # the proxy's RSS once this answer was in, MiB


def get_root(url: str, accept: str, gzipped: bool, what: str, timeout: float = 300.0) -> Answer:
    parts = url.split("/", 3)
    host, port = parts[2].split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    start = time.perf_counter()
    try:
        conn.request(
            "GET",
            "/" + parts[3],
            headers={"Accept": accept, "Accept-Encoding": "gzip" if gzipped else "identity"},
        )
        response = conn.getresponse()
        body = response.read()
        seconds = time.perf_counter() - start
        status = response.status
        encoding = response.getheader("content-encoding") or ""
        x_cache = response.getheader("x-cache") or "-"
    finally:
        conn.close()
    size = len(body)
    if status != 200:
        raise RuntimeError(f"{url} ({what}) answered {status}: {body[:200]!r}")
    if encoding == "gzip":
        body = gzip.decompress(body)
    elif gzipped:
        what += " (sent uncompressed)"
    if b'"projects"' in body[:200]:
        projects = len(json.loads(body)["projects"])
    else:
        projects = body.count(b"</a>")
    return Answer(what, status, size, seconds, projects, x_cache)


class StalledClient:
    """
    Asks for the root page as identity HTML, then reads nothing.
    """

    def __init__(self, port: int, path: str) -> None:
        self.socket = socket.socket()
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.socket.connect(("127.0.0.1", port))
        request = f"GET {path} HTTP/1.1\r\nHost: x\r\nAccept: text/html\r\nAccept-Encoding: identity\r\n\r\n"
        self.socket.sendall(request.encode())

    def close(self) -> None:
        self.socket.close()


# --- Measuring ---------------------------------------------------------------------------------


@dataclass
class Run:
    name: str
    before: float
    peak: float
    hwm: float | None
    after: float
    settled: float
    answers: list[Answer]


def measure(name: str, pids: list[int], root_url: str, expected: int) -> Run:
    before = rss_mib(pids)
    hwm_ok = reset_peak(pids)
    answers = []
    with RssSampler(pids, interval=0.02) as sampler:
        for what, accept, gzipped in (
            ("JSON, gzip (first)", JSON_ACCEPT, True),
            ("JSON, identity", JSON_ACCEPT, False),
            ("HTML, gzip", HTML_ACCEPT, True),
            ("HTML, identity", HTML_ACCEPT, False),
            ("JSON, gzip (again)", JSON_ACCEPT, True),
        ):
            answer = get_root(root_url, accept, gzipped, what)
            answer.rss_after = rss_mib(pids)
            if answer.projects != expected:
                raise RuntimeError(f"{name}: {what} listed {answer.projects} projects, not {expected}")
            answers.append(answer)
        after = rss_mib(pids)
    hwm = sum(status_kb(pid, "VmHWM") or 0 for pid in pids) / 1024 if hwm_ok else None
    time.sleep(3)
    settled = rss_mib(pids)
    return Run(name, before, max(sampler.peak_kb / 1024, hwm or 0.0), hwm, after, settled, answers)


def report(run: Run) -> None:
    print(f"\n{run.name}")
    for a in run.answers:
        print(
            f"  {a.what:20s} {a.seconds * 1000:7.0f} ms {a.size / MIB:6.1f} MiB on the wire,"
            f" X-Cache {a.x_cache:4s} RSS then {a.rss_after:4.0f} MiB"
        )
    hwm = "" if run.hwm is None else f" (VmHWM {run.hwm:.0f})"
    print(
        f"  RSS: before {run.before:.0f} MiB, peak {run.peak:.0f} MiB{hwm}, "
        f"after {run.after:.0f} MiB, 3 s later {run.settled:.0f} MiB"
    )


def start_txpypi(services: Services, work: Path, port: int, upstream: Service, name: str) -> Service:
    token = work / "admin-token"
    if not token.exists():
        token.write_text(secrets.token_urlsafe(24) + "\n")
    cache = work / "txpypi-cache"
    return start_instance(
        services, work, name, port, upstream, "--cache-dir", str(cache), "--log-format", "none"
    )


def refreshes(service: Service, n: int, expected: int) -> tuple[float, list[float]]:
    """
    Forget the project list (the admin route) and fetch it again, C{n}
    times: the slowest fetch's seconds, and the RSS after each.
    """
    token = (service.log.parent / "admin-token").read_text().strip()
    slowest = 0.0
    after = []
    for _ in range(n):
        conn = http.client.HTTPConnection("127.0.0.1", service.port, timeout=60)
        try:
            conn.request("DELETE", "/cache/", headers={"Authorization": f"Bearer {token}"})
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"DELETE /cache/ answered {response.status}")
        finally:
            conn.close()
        answer = get_root(f"{service.base}/simple/", JSON_ACCEPT, True, "refresh")
        if answer.projects != expected or answer.x_cache != "MISS":
            raise RuntimeError(f"refresh: {answer}")
        slowest = max(slowest, answer.seconds)
        after.append(rss_mib([service.process.pid]))
    return slowest, after


def stalled_clients(service: Service, n: int) -> tuple[float, float, float]:
    """
    The RSS before, with C{n} clients that read nothing of the root page
    (once the proxy has had a second to fill their buffers), and after
    they left.
    """
    pids = [service.process.pid]
    before = rss_mib(pids)
    clients = [StalledClient(service.port, "/simple/") for _ in range(n)]
    try:
        time.sleep(1.0)
        held = rss_mib(pids)
    finally:
        for client in clients:
            client.close()
    time.sleep(1.0)
    return before, held, rss_mib(pids)


def parallel_after_restart(service: Service, url: str, n: int, expected: int) -> tuple[float, float, float]:
    """
    C{n} parallel GETs of the root page right after a restart: the seconds
    the slowest took, the peak RSS and the RSS after.
    """
    pids = [service.process.pid]
    errors: list[BaseException] = []
    seconds: list[float] = []

    def one(i: int) -> None:
        try:
            answer = get_root(url, JSON_ACCEPT if i % 2 else HTML_ACCEPT, i % 4 < 2, f"parallel {i}")
            if answer.projects != expected:
                raise RuntimeError(f"listed {answer.projects}")
            seconds.append(answer.seconds)
        except BaseException as e:  # reported below
            errors.append(e)

    with RssSampler(pids, interval=0.02) as sampler:
        threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    if errors:
        raise RuntimeError(f"parallel GETs failed: {errors[0]!r}")
    return max(seconds), sampler.peak_kb / 1024, rss_mib(pids)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--projects", type=int, default=700_000)
    parser.add_argument("--stalled", type=int, default=10, help="clients that read nothing")
    parser.add_argument("--refreshes", type=int, default=3, help="fetches of the list again")
    parser.add_argument("--parallel", type=int, default=8, help="parallel GETs after the restart")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    parser.add_argument("--serve-upstream", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_upstream:
        serve_upstream(args.serve_upstream, args.projects)
        return 0

    with session(args.keep) as (work, services):
        up_port, tx_port, px_port = free_ports(3)
        upstream = start_upstream(
            services, work, up_port, "--projects", str(args.projects), script=Path(__file__).resolve()
        )
        took = services.wait_ready(upstream, timeout=180.0)
        print(f"upstream: {args.projects} projects, ready after {took:.1f} s")

        txpypi = start_txpypi(services, work, tx_port, upstream, "txpypi")
        services.wait_ready(txpypi)
        tx = measure("txpypi", [txpypi.process.pid], f"{txpypi.base}/simple/", args.projects)
        report(tx)
        verdict = "MET" if tx.after < RSS_TARGET_MIB else "MISSED"
        print(f"  target: RSS after serving under {RSS_TARGET_MIB:.0f} MiB: {tx.after:.0f} MiB, {verdict}")

        if args.refreshes:
            slowest, after_each = refreshes(txpypi, args.refreshes, args.projects)
            print(
                f"  {args.refreshes} refreshes (DELETE /cache/, then GET): slowest {slowest:.2f} s, "
                f"RSS after each {', '.join(f'{r:.0f}' for r in after_each)} MiB"
            )

        if args.stalled:
            before, held, left = stalled_clients(txpypi, args.stalled)
            print(
                f"  {args.stalled} clients that read nothing: RSS {held:.0f} MiB "
                f"({held - before:+.0f} MiB), {left:.0f} MiB once they left"
            )

        services.stop(txpypi)
        restarted = start_txpypi(services, work, tx_port, upstream, "txpypi-restarted")
        services.wait_ready(restarted)
        before = rss_mib([restarted.process.pid])
        gets_before = upstream_root_gets(upstream)
        slowest, peak, after = parallel_after_restart(
            restarted, f"{restarted.base}/simple/", args.parallel, args.projects
        )
        loaded_from_store = upstream_root_gets(upstream) == gets_before
        how = "loaded from the store" if loaded_from_store else "fetched again"
        print(
            f"\ntxpypi restarted: {args.parallel} parallel GETs of the stored page ({how}): "
            f"slowest {slowest:.2f} s, RSS before {before:.0f} MiB, peak {peak:.0f} MiB,"
            f" after {after:.0f} MiB"
        )
        services.stop(restarted)

        if importlib.util.find_spec("proxpi") is None or importlib.util.find_spec("gunicorn") is None:
            print("\nproxpi: not installed (pip install proxpi gunicorn), not measured")
            return 0 if verdict == "MET" else 1
        proxpi = start_proxpi(services, work, px_port, upstream)
        services.wait_ready(proxpi)
        time.sleep(1.0)  # gunicorn forks its worker after it listens
        px = measure("proxpi", process_tree(proxpi.process.pid), f"{proxpi.base}/index/", args.projects)
        report(px)
        print(
            f"\nratio txpypi/proxpi: RSS after {tx.after / px.after:.2f}, peak {tx.peak / px.peak:.2f}, "
            f"first answer {tx.answers[0].seconds / px.answers[0].seconds:.2f}, "
            f"warm JSON gzip {tx.answers[-1].seconds / px.answers[-1].seconds:.2g}"
        )
        return 0 if verdict == "MET" else 1


def upstream_root_gets(upstream: Service) -> int:
    """
    How many times the upstream was asked for its root page.
    """
    with urllib.request.urlopen(f"{upstream.base}/_counts", timeout=30) as response:
        return int(json.loads(response.read()).get("/simple/", 0))


if __name__ == "__main__":
    sys.exit(main())

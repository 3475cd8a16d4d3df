"""
The C{nginx} section: issue #14's targets, txpypi against nginx's
C{proxy_cache} (the speed baseline) in front of the same upstream, in the
same run, with the same number of worker processes, each row printed with
its target and MET or MISSED:

 - a warm index page under wrk: one process (txpypi's defaults, access log
   on; nginx with its access log on too), and two workers each;
 - the p99 of that warm page, one process;
 - a warm cached wheel (C{--file-kb}; the target is for 100 KB) under wrk;
 - a cached big wheel (C{--big-mb}; the target is for 50 MiB) read by one
   client, in MiB/s;
 - a cold big wheel through txpypi against the direct download, the same
   file's cold miss through nginx (which writes it and does no more), and
   the kernel time to write a new file of that size here (the spool's
   floor);
 - 20 clients at once on an uncached big wheel over two txpypi workers:
   upstream GETs (exactly one) and the slowest client's TTFB against the
   upstream's own;
 - the RSS of an idle worker, and of a Python that imports only what a
   worker imports first (Twisted's reactor, which brings pyOpenSSL and
   cryptography; then twisted.web and Klein).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from clients import Streamed, fetch, stream
from harness import free_ports
from proxies import Proxy, file_url, start_instances, wait_landed, warm_up
from report import Table, section
from upstream import BIG_PROJECT, FILE_PROJECT, JSON_ACCEPT, PAGE_PROJECT, reset, upstream_gets, wheel_name
from wrk import WrkResult, fmt_wrk, run_wrk, wrk_description

from sections import Run

#: The clients of the herd row.
HERD = 20

NGINX_CONF = """daemon off; worker_processes {workers}; pid {work}/nginx.pid; error_log {work}/error.log;
events {{ worker_connections 1024; }}
http {{
  access_log {work}/access.log;
  proxy_cache_path {work}/cache levels=1:2 keys_zone=c:10m max_size=8g inactive=1d use_temp_path=off;
  server {{
    listen 127.0.0.1:{port} reuseport;
    location / {{
      proxy_pass http://127.0.0.1:{upstream};
      proxy_cache c;
      proxy_cache_key $request_uri$http_accept;
      proxy_cache_valid 200 1d;
      proxy_cache_lock on;
      proxy_cache_lock_timeout 120s;
    }}
  }}
}}
"""


def start_nginx(ctx: Run, workers: int) -> Proxy:
    work = ctx.work / f"nginx-{workers}"
    work.mkdir()
    (port,) = free_ports(1)
    upstream_port = ctx.upstream.port
    conf = NGINX_CONF.format(workers=workers, work=work, port=port, upstream=upstream_port)
    (work / "nginx.conf").write_text(conf)
    argv = ["nginx", "-c", str(work / "nginx.conf"), "-p", str(work), "-e", str(work / "error.log")]
    if os.getuid() == 0:
        (work / "nginx.conf").write_text("user root;\n" + conf)
    service = ctx.services.start(f"nginx-{workers}", argv, dict(os.environ), port, work)
    ctx.services.wait_ready(service)
    return Proxy(f"nginx-{workers}", service, f"{service.base}/simple/")


def _target(what: str, ok: bool) -> str:
    return f"{what}: {'MET' if ok else 'MISSED'}"


def _wrk_pair(
    ctx: Run, tx: Proxy, ng: Proxy, url_tx: str, url_ng: str, accept: str | None
) -> tuple[WrkResult, WrkResult]:
    """
    wrk on txpypi and on nginx in turn, C{--nginx-rounds} times each (the
    machine's noise from one run to the next is larger than some of the
    targets' margins): each side's run of median throughput.
    """
    warm_up(tx, url_tx, accept)
    warm_up(ng, url_ng, accept)
    # One untimed second of the same load first, on both sides: the first
    # run of a fresh txpypi was always its slowest (by up to a third).
    warming = argparse.Namespace(**{**vars(ctx.args), "duration": 1})
    for url in (url_tx, url_ng):
        run_wrk(ctx.wrk_binary, url, warming, accept)
    runs: dict[str, list[WrkResult]] = {tx.name: [], ng.name: []}
    for _ in range(ctx.args.nginx_rounds):
        for proxy, url in ((tx, url_tx), (ng, url_ng)):
            got = run_wrk(ctx.wrk_binary, url, ctx.args, accept)
            runs[proxy.name].append(got)
            print(f"  {proxy.name:14s} {fmt_wrk(got)}")
    got_tx, got_ng = (sorted(runs[p.name], key=lambda r: r.rps)[len(runs[p.name]) // 2] for p in (tx, ng))
    if ctx.args.nginx_rounds > 1:
        print(f"  median: {tx.name} {got_tx.rps:.0f} req/s, {ng.name} {got_ng.rps:.0f} req/s")
    return got_tx, got_ng


def _mib_s(got: Streamed) -> float:
    return got.size / got.total / (1024 * 1024)


def _children(pid: int) -> list[int]:
    """
    The child processes of C{pid}.
    """
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
    return [int(child) for child in out]


def _children_rss_mib(pid: int) -> list[float]:
    """
    The RSS of each child process of C{pid} (the workers of a parent), in MiB.
    """
    found = []
    for child in _children(pid):
        try:
            status = Path(f"/proc/{child}/status").read_text()
        except OSError:
            continue
        kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
        found.append(kb / 1024)
    return found


def _herd(url: str, expected_size: int, processes: bool = False) -> tuple[list[float], list[str]]:
    """
    C{HERD} clients GET C{url} at once, each on a connection of its own:
    each one's time to first byte, and what went wrong (a status, a size).
    One curl process makes them all, in parallel (C{-Z}); or, with
    C{processes}, one curl process each, whose start-up (tens of ms of CPU
    for 20) competes with the proxy for this machine's cores, which no
    client elsewhere does.
    """
    form = "%{http_code} %{size_download} %{time_starttransfer}\n"
    if processes:
        argv = ["curl", "-s", "-o", "/dev/null", "-w", form, url]
        procs = [subprocess.Popen(argv, stdout=subprocess.PIPE, text=True) for _ in range(HERD)]
        outs = [proc.communicate(timeout=300)[0] for proc in procs]
    else:
        argv = ["curl", "-s", "-Z", "--parallel-immediate", "--parallel-max", str(HERD), "-w", form]
        for _ in range(HERD):
            argv += ["-o", "/dev/null", url]
        outs = subprocess.run(argv, capture_output=True, text=True, timeout=300).stdout.splitlines()
    ttfbs, wrong = [], []
    for out in outs:
        code, size, ttfb = out.split()
        if code != "200" or int(size) != expected_size:
            wrong.append(f"status {code}, {size} bytes")
        ttfbs.append(float(ttfb))
    if len(outs) != HERD:
        wrong.append(f"{len(outs)} answers to {HERD} clients")
    return ttfbs, wrong


def _one_herd(ctx: Run, tx2: Proxy, project: str, processes: bool, alarms: list[str]) -> tuple[float, int]:
    """
    One herd on C{project}'s uncached wheel through the 2 workers (see
    L{_herd}): how much later its slowest client had its first byte than
    the slowest of the same herd on the upstream directly, in ms, and how
    many GETs the upstream had.
    """
    herd_file = wheel_name(project, "1.0")
    path = f"/packages/{herd_file}"
    size = len(fetch(f"{ctx.upstream.base}{path}").body)
    direct_ttfbs, _ = _herd(f"{ctx.upstream.base}{path}", size, processes)
    upstream_ttfb = max(direct_ttfbs)
    url = file_url(tx2, project, herd_file)
    _warm_everywhere(tx2.page_url(project))  # only the file is cold, on both workers
    reset(ctx.upstream)
    ttfbs, wrong = _herd(url, size, processes)
    gets, _ = upstream_gets(ctx.upstream, path)
    if wrong:
        alarms.append(f"herd: {len(wrong)} of {HERD} clients did not get the file whole: {wrong[:3]}")
    if wait_landed(tx2.service, herd_file) is None:
        alarms.append(f"herd: {herd_file} never landed")
    # Spread over both workers: the one that did not fetch followed.
    followed = f"following {herd_file}" in tx2.service.log.read_text(errors="replace")
    if not followed:
        alarms.append(f"herd: {herd_file}'s clients all went to one worker")
    slowest, median = max(ttfbs) * 1000, statistics.median(ttfbs) * 1000
    added = slowest - upstream_ttfb * 1000
    print(
        f"  {herd_file} ({'curl processes' if processes else 'one curl -Z'}): upstream GETs {gets}; "
        f"upstream's TTFB, slowest of {HERD} at once {upstream_ttfb * 1000:.2f} ms "
        f"(median {statistics.median(direct_ttfbs) * 1000:.2f}); through 2 workers: slowest {slowest:.2f} ms "
        f"(median {median:.2f}), {added:+.2f} ms; the other worker followed: {'yes' if followed else 'no'}"
    )
    return added, gets


def _warm_everywhere(url: str, clients: int = 8) -> None:
    """
    GET C{url} on C{clients} connections at once, twice: the workers that
    accept them all have the page in memory then (which worker accepts a
    connection is the kernel's choice).
    """
    with ThreadPoolExecutor(clients) as pool:
        for _ in range(2):
            list(pool.map(lambda _: fetch(url, JSON_ACCEPT), range(clients)))


def _new_file_seconds(size: int, where: Path) -> float:
    """
    The kernel time this process spends writing a new file of C{size}
    bytes in C{where} (1 MiB writes, as the spool's): the floor of a miss's
    spool write on this machine, which a direct download to nowhere does
    not pay.  On a VM whose memory the host backs only when first touched,
    it is most of a cold miss.
    """
    chunk = os.urandom(1024 * 1024)
    path = where / "new-file-cost"
    before = os.times()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for _ in range(size // len(chunk)):
            os.write(fd, chunk)
    finally:
        os.close(fd)
    spent = os.times().system - before.system
    path.unlink()
    return spent


#: What a worker imports before any of txpypi's own: the floors under its RSS.
_RSS_FLOORS = (
    ("the Twisted reactor", "from twisted.internet import reactor"),
    (
        "the reactor, twisted.web and Klein",
        "from twisted.internet import reactor; import twisted.web.server, klein",
    ),
)


def _rss_of(code: str) -> float:
    """
    The RSS of a Python (this one) once it ran C{code}, in MiB.
    """
    show = "import re; print(re.search(r'VmRSS:\\s+(\\d+)', open('/proc/self/status').read()).group(1))"
    out = subprocess.run(
        [sys.executable, "-c", f"{code}\n{show}"], capture_output=True, check=True, text=True
    )
    return int(out.stdout.split()[-1]) / 1024


class _CpuTimes:
    """
    The CPU time (user and system) that a proxy (its processes and their
    waited-for children), the upstream and this process use from now to
    L{used}.
    """

    def __init__(self, proxy: str, pids: list[int], upstream: int) -> None:
        """
        @param pids: the proxy's processes (nginx's master and its worker).
        """
        self._proxy, self._proxy_pids, self._upstream = proxy, pids, upstream
        self._start = self._now()

    def _now(self) -> dict[str, float]:
        tick = os.sysconf("SC_CLK_TCK")
        times = {
            self._proxy: sum(_cpu_seconds(pid, tick) for pid in self._proxy_pids),
            "upstream": _cpu_seconds(self._upstream, tick),
        }
        times["client"] = time.process_time()
        return times

    def used(self) -> dict[str, float]:
        """
        The milliseconds each used.
        """
        now = self._now()
        return {name: (now[name] - self._start[name]) * 1000 for name in now}


def _cpu_seconds(pid: int, tick: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # utime, stime, and the waited-for children's cutime, cstime.
    return sum(int(f) for f in fields[11:15]) / tick


def run(ctx: Run) -> list[str]:
    assert ctx.txpypi is not None
    alarms: list[str] = []
    rows: list[tuple[str, ...]] = []
    tx1 = ctx.txpypi
    ng1 = start_nginx(ctx, 1)
    page_tx = tx1.page_url(PAGE_PROJECT)
    page_ng = f"{ng1.service.base}/simple/{PAGE_PROJECT}/"

    section(f"nginx: warm index page, one process each, {wrk_description(ctx.args)}")
    a, b = _wrk_pair(ctx, tx1, ng1, page_tx, page_ng, ctx.accept)
    rows.append(
        (
            "warm page, 1 process (req/s)",
            f"{a.rps:.0f}",
            f"{b.rps:.0f}",
            f"{a.rps / b.rps:.2f}x",
            _target(">= 0.60x", a.rps / b.rps >= 0.6),
        )
    )
    rows.append(
        (
            "warm page p99, 1 process (ms)",
            f"{a.p99_ms:.2f}",
            f"{b.p99_ms:.2f}",
            f"{a.p99_ms / b.p99_ms:.2f}x",
            _target("<= 3x", a.p99_ms <= 3 * b.p99_ms),
        )
    )

    # The two workers start only now: starting, they would take from the
    # one process's CPU.
    ng2 = start_nginx(ctx, 2)
    (tx2,) = start_instances(
        ctx.services,
        ctx.work,
        ctx.upstream,
        {"txpypi-2-workers": ["--workers", "2", "--cache-dir", str(ctx.work / "txpypi-2-cache")]},
    )
    fetch(f"{tx2.service.base}/health")  # the parent's socket queues until a worker accepts
    section(f"nginx: warm index page, two workers each, {wrk_description(ctx.args)}")
    a, b = _wrk_pair(
        ctx, tx2, ng2, tx2.page_url(PAGE_PROJECT), f"{ng2.service.base}/simple/{PAGE_PROJECT}/", ctx.accept
    )
    rows.append(
        (
            "warm page, 2 workers (req/s)",
            f"{a.rps:.0f}",
            f"{b.rps:.0f}",
            f"{a.rps / b.rps:.2f}x",
            _target(">= 0.80x", a.rps / b.rps >= 0.8),
        )
    )

    filename = wheel_name(FILE_PROJECT, "1.0")
    section(f"nginx: warm cached {filename} (~{ctx.args.file_kb} KB), one process each")
    a, b = _wrk_pair(
        ctx, tx1, ng1, file_url(tx1, FILE_PROJECT, filename), f"{ng1.service.base}/packages/{filename}", None
    )
    rows.append(
        (
            f"cached {ctx.args.file_kb} KB wheel (req/s)",
            f"{a.rps:.0f}",
            f"{b.rps:.0f}",
            f"{a.rps / b.rps:.2f}x",
            _target(">= 0.50x (100 KB)", a.rps / b.rps >= 0.5),
        )
    )

    big = wheel_name(BIG_PROJECT.format(0), "1.0")
    section(f"nginx: cached {ctx.args.big_mb} MB wheel, one client, 3 reads each (median)")
    speeds: dict[str, float] = {}
    for proxy, url in (
        (tx1, file_url(tx1, BIG_PROJECT.format(0), big)),
        (ng1, f"{ng1.service.base}/packages/{big}"),
    ):
        stream(url)  # the miss: cached from now on
        speeds[proxy.name] = statistics.median(_mib_s(stream(url)) for _ in range(3))
        print(f"  {proxy.name:14s} {speeds[proxy.name]:8.0f} MiB/s")
    ratio = speeds[tx1.name] / speeds[ng1.name]
    rows.append(
        (
            f"cached {ctx.args.big_mb} MB wheel, 1 client (MiB/s)",
            f"{speeds[tx1.name]:.0f}",
            f"{speeds[ng1.name]:.0f}",
            f"{ratio:.2f}x",
            _target(">= 0.90x", ratio >= 0.9),
        )
    )

    rounds = ctx.args.nginx_rounds
    section(
        f"nginx: cold {ctx.args.big_mb} MB wheel, txpypi and nginx against the direct download, "
        f"{rounds} files (read the same way, neither hashed by the client)"
    )
    colds: list[tuple[float, float]] = []
    nginx_colds: list[tuple[float, float]] = []
    writes: list[float] = []
    for i in range(rounds):
        project = BIG_PROJECT.format(1 + i)
        cold = wheel_name(project, "1.0")
        size = len(fetch(f"{ctx.upstream.base}/packages/{cold}").body)
        direct = statistics.median(stream(f"{ctx.upstream.base}/packages/{cold}").total for _ in range(3))
        print(f"  {cold}: direct {direct:.3f} s")
        # Each side's miss comes right after the bench wrote a new file of
        # that size and removed it: on a VM whose host backs guest memory
        # only when first touched, both get pages that were just used (the
        # file's pages are freed), not whatever is left; and the sides take
        # turns at going first.
        for side in ("txpypi", "nginx") if i % 2 == 0 else ("nginx", "txpypi"):
            written = _new_file_seconds(size, ctx.work)
            if side == "nginx":
                # The peer's own miss of the same file (nginx never asked
                # for it): what a cache that writes the file and does no
                # more costs here.
                nginx_pids = [ng1.service.process.pid, *_children(ng1.service.process.pid)]
                cpu = _CpuTimes("nginx", nginx_pids, ctx.upstream.process.pid)
                peer = stream(f"{ng1.service.base}/packages/{cold}")
                used = cpu.used()
                if peer.size != size:
                    alarms.append(f"cold miss: {peer.size} bytes through nginx")
                nginx_colds.append((peer.total, direct))
                print(
                    f"    nginx proxy_cache cold {peer.total:.3f} s ({peer.total / direct:.2f}x direct); "
                    "CPU used meanwhile: " + ", ".join(f"{name} {ms:.0f} ms" for name, ms in used.items())
                )
                continue
            writes.append(written)
            cpu = _CpuTimes("txpypi", [tx1.service.process.pid], ctx.upstream.process.pid)
            through = stream(file_url(tx1, project, cold))  # the page warm: only the file is cold
            used = cpu.used()
            if through.size != size:
                alarms.append(f"cold miss: {through.size} bytes through txpypi")
            cpus = os.cpu_count() or 1
            floor = sum(used.values()) / cpus
            print(
                f"    txpypi cold {through.total:.3f} s ({through.total / direct:.2f}x direct); "
                "CPU used meanwhile: "
                + ", ".join(f"{name} {ms:.0f} ms" for name, ms in used.items())
                + f"; on {cpus} CPUs that alone takes {floor:.0f} ms ({floor / 1000 / direct:.2f}x direct); "
                f"writing a new file of that size just before took {written:.3f} s of kernel time"
            )
            colds.append((through.total, direct))
            if wait_landed(tx1.service, cold) is None:  # the next miss must not share the CPU with its fsync
                alarms.append(f"cold miss: {cold} never landed")
    total, direct = sorted(colds, key=lambda c: c[0] / c[1])[len(colds) // 2]
    rows.append(
        (
            f"cold {ctx.args.big_mb} MB miss (s), median of {rounds}",
            f"{total:.3f}",
            f"{direct:.3f} (direct)",
            f"{total / direct:.2f}x",
            _target("<= 1.10x direct", total / direct <= 1.1),
        )
    )
    # Each file's txpypi miss against nginx's miss of the same file.
    paired = statistics.median(tx[0] / ng[0] for tx, ng in zip(colds, nginx_colds, strict=True))
    peer_direct = statistics.median(ng[0] / ng[1] for ng in nginx_colds)
    rows.append(
        (
            f"  nginx proxy_cache's cold miss of the same files (s), medians of {rounds}",
            f"{statistics.median(c[0] for c in colds):.3f}",
            f"{statistics.median(ng[0] for ng in nginx_colds):.3f}",
            f"{paired:.2f}x",
            f"(nginx: {peer_direct:.2f}x the direct)",
        )
    )
    rows.append(
        (
            f"  kernel time to write a new {ctx.args.big_mb} MB file here (s), median of {rounds}",
            f"{statistics.median(writes):.3f}",
            "",
            "",
            "(the spool's floor)",
        )
    )

    section(
        f"nginx: {HERD} clients at once, an uncached {ctx.args.big_mb} MB wheel, txpypi with 2 workers, "
        f"{rounds} files"
    )
    herds: dict[bool, list[float]] = {False: [], True: []}
    all_gets: list[int] = []
    for i in range(rounds):
        for processes in (False, True):
            project = BIG_PROJECT.format(1 + rounds * (2 if processes else 1) + i)
            added, gets = _one_herd(ctx, tx2, project, processes, alarms)
            herds[processes].append(added)
            all_gets.append(gets)
    rows.append(
        (
            f"{HERD} clients, uncached {ctx.args.big_mb} MB, 2 workers: upstream GETs, each of {2 * rounds}",
            " ".join(str(g) for g in all_gets),
            "",
            "",
            _target("exactly 1", all(g == 1 for g in all_gets)),
        )
    )
    added_ms = statistics.median(herds[False])
    rows.append(
        (
            f"  slowest client's TTFB over the slowest of {HERD} direct (ms), median of {rounds}",
            f"{added_ms:+.2f}",
            "",
            "",
            _target("<= +10 ms", added_ms <= 10),
        )
    )
    rows.append(
        (
            f"  the same, {HERD} curl processes starting on these cores (ms), median of {rounds}",
            f"{statistics.median(herds[True]):+.2f}",
            "",
            "",
            "(for comparison)",
        )
    )

    rss = _children_rss_mib(tx2.service.process.pid)
    print(f"  RSS of the workers after the run: {', '.join(f'{r:.0f} MiB' for r in rss)}")
    (fresh,) = start_instances(
        ctx.services,
        ctx.work,
        ctx.upstream,
        {"txpypi-idle": ["--workers", "2", "--cache-dir", str(ctx.work / "txpypi-idle-cache")]},
    )
    fetch(f"{fresh.service.base}/health")
    fetch(f"{fresh.service.base}/health")
    idle_rss = _children_rss_mib(fresh.service.process.pid)
    most = max(idle_rss, default=float("inf"))
    rows.append(("RSS of an idle worker (MiB)", f"{most:.0f}", "", "", _target("<= 50 MiB", most <= 50)))
    for what, code in _RSS_FLOORS:
        rows.append(
            (f"  RSS of a Python that only imports {what} (MiB)", f"{_rss_of(code):.0f}", "", "", "(floor)")
        )

    ctx.tables.append(
        Table(
            "txpypi against nginx proxy_cache (issue #14's targets)",
            ("measure", "txpypi", "nginx", "txpypi/nginx", "target"),
            rows,
            f"(same run, same upstream; nginx with its access log on and proxy_cache_lock; "
            f"{os.cpu_count()} CPUs shared with wrk and the upstream)",
        )
    )
    return alarms

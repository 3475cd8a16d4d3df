"""
The C{huge} section (steps 6 and 7): a cold 200 MB wheel downloaded by one
client, direct and through each proxy; then the peak RSS of each proxy
while a crowd of clients streams one, cold and warm.  L{direct_download}
and L{cold_download} serve the C{link} section too.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time
from collections import Counter
from dataclasses import dataclass

import upstream as up
from clients import READ_CHUNK, Streamed, stream
from harness import Service
from proxies import Proxy, check_stream, file_url, purge, wait_cached, wait_landed
from report import (
    RSS_TARGET_MB,
    Row,
    alarm,
    download_verdict,
    ratio,
    seconds_list,
    section,
    ttfb_verdict,
    verdict,
)
from sampling import RssSampler, cpu_seconds, process_tree, reset_hwm, status_kb
from upstream import MB, UpstreamFile, huge_file

from sections import Run


def direct_download(upstream: Service, file: UpstreamFile) -> Streamed:
    """
    C{file} straight from the upstream, which must send it right.
    """
    got = stream(f"{upstream.base}{file.path}")
    if found := check_stream("", got, file):
        raise RuntimeError(f"the upstream sent a bad {file.filename}: {found}")
    return got


def cold_download(
    upstream: Service, txpypi: Proxy, url: str, file: UpstreamFile, what: str
) -> tuple[Streamed, float, int, list[str]]:
    """
    C{file}, not in txpypi's cache, through txpypi at C{url}: the download,
    txpypi's CPU seconds meanwhile, the upstream's GETs of the file, and
    what went wrong (a miss of C{what} must be a C{MISS} with exactly one
    upstream GET).
    """
    up.reset(upstream)
    pid = txpypi.service.process.pid
    cpu = cpu_seconds(pid)
    got = stream(url)
    cpu = cpu_seconds(pid) - cpu
    gets, others = up.upstream_gets(upstream, file.path)
    problems = alarm(check_stream(what, got, file, "MISS"))
    if (gets, others) != (1, 0):
        problems += alarm([f"{what}: upstream answered {gets} GET(s), {others} other(s)"])
    return got, cpu, gets, problems


def huge_download(
    args: argparse.Namespace, upstream: Service, txpypi: Proxy, proxpi: Proxy, summary: list[Row]
) -> list[str]:
    """
    One client downloads a cold huge wheel: direct, through txpypi (purged
    between runs), through proxpi (once).  Returns what txpypi did wrong.
    """
    huge = huge_file(upstream, 0)
    mb = args.huge_mb
    section(
        f"cold {mb} MB wheel, one client reading {READ_CHUNK // MB} MB at a time and discarding "
        f"({args.huge_runs} run(s), median)"
    )
    problems: list[str] = []
    tx_url = file_url(txpypi, huge.project, huge.filename)  # warms the page: only the file is cold
    direct: list[Streamed] = []
    cold: list[Streamed] = []
    cold_gets: list[int] = []
    cold_cpu: list[float] = []  # txpypi's CPU seconds during each cold run
    for run in range(args.huge_runs):
        direct.append(direct_download(upstream, huge))
        if run and not purge(txpypi, huge):
            problems += alarm([f"could not purge {huge.filename} from txpypi: no more cold runs"])
            break
        got, cpu, gets, found = cold_download(upstream, txpypi, tx_url, huge, f"txpypi cold run {run + 1}")
        cold_cpu.append(cpu)
        cold_gets.append(gets)
        problems += found
        cold.append(got)
    # Until the last cold run's file has landed, a HIT is served from the spool file, not the store.
    if not wait_cached(tx_url) or wait_landed(txpypi.service, huge.filename, before=len(cold) - 1) is None:
        problems += alarm([f"txpypi did not cache {huge.filename}"])
    warm = stream(tx_url, digest=True)
    problems += alarm(check_stream("txpypi warm", warm, huge, "HIT"))

    px_url = file_url(proxpi, huge.project, huge.filename)
    up.reset(upstream)
    px = stream(px_url)
    px_gets, px_others = up.upstream_gets(upstream, huge.path)
    if found := check_stream("proxpi cold", px, huge):
        print(f"(proxpi: {'; '.join(found)})")

    d_s = statistics.median(r.total for r in direct)
    d_ttfb = statistics.median(r.ttfb for r in direct) * 1000
    tx_s = statistics.median(r.total for r in cold)
    tx_ttfb = statistics.median(r.ttfb for r in cold) * 1000
    print(
        f"direct from upstream: {d_s:6.2f} s ({mb / d_s:5.0f} MB/s)  TTFB {d_ttfb:7.2f} ms   "
        f"(runs: {seconds_list(direct)} s)"
    )
    print(
        f"through txpypi, cold: {tx_s:6.2f} s ({mb / tx_s:5.0f} MB/s)  TTFB {tx_ttfb:7.2f} ms   "
        f"(runs: {seconds_list(cold)} s; upstream GETs: {', '.join(map(str, cold_gets))})"
    )
    cpu = statistics.median(cold_cpu)
    print(
        f"  txpypi's CPU time during a cold run: {cpu:.2f} s, {cpu / tx_s:.0%} of its wall time "
        "(one reactor thread)"
    )
    print(f"through txpypi, warm: {warm.total:6.2f} s ({mb / warm.total:5.0f} MB/s)  sha256 checked")
    print(
        f"through proxpi, cold: {px.total:6.2f} s ({mb / px.total:5.0f} MB/s)  "
        f"TTFB {px.ttfb * 1000:7.2f} ms   "
        f"(upstream: {px_gets} GET(s), {px_others} HEAD(s)"
        + (f"; {px.redirects} redirect(s) to the upstream followed)" if px.redirects else ")")
    )
    download_target = download_verdict(tx_s / d_s)
    ttfb_target = ttfb_verdict(tx_ttfb - d_ttfb)
    print(f"target: txpypi cold download time, as a multiple of direct: {download_target}")
    print(f"target: txpypi TTFB on a miss, over the upstream's own: {ttfb_target}")
    print(
        f"ratio txpypi/proxpi cold download: {ratio(tx_s, px.total)}, TTFB: {ratio(tx_ttfb, px.ttfb * 1000)}"
    )
    summary.append((f"{mb} MB download, direct from upstream", f"{d_s:.2f} s", f"{d_s:.2f} s", "-"))
    summary.append(
        (
            f"{mb} MB cold download",
            f"{tx_s:.2f} s",
            f"{px.total:.2f} s",
            ratio(tx_s, px.total),
            download_target,
        )
    )
    summary.append((f"{mb} MB TTFB direct from upstream", f"{d_ttfb:.2f} ms", f"{d_ttfb:.2f} ms", "-"))
    summary.append(
        (
            f"{mb} MB TTFB on a miss",
            f"{tx_ttfb:.2f} ms",
            f"{px.ttfb * 1000:.2f} ms",
            ratio(tx_ttfb, px.ttfb * 1000),
            ttfb_target,
        )
    )
    return problems


@dataclass
class Crowd:
    results: list[Streamed]
    errors: list[str]
    hung: int  # clients still reading at the deadline
    seconds: float
    baseline_mb: float
    peak_mb: float
    samples: int
    hwm: bool  # whether the peak includes the kernel's VmHWM (one process only)


def crowd(url: str, clients: int, pid: int, timeout: float = 300.0) -> Crowd:
    """
    C{clients} threads stream C{url} at once (the first one hashing it),
    while the RSS of C{pid} and its descendants is sampled.
    """
    pids = process_tree(pid)
    hwm = len(pids) == 1 and reset_hwm(pid)
    results: list[Streamed | None] = [None] * clients
    errors: list[str] = []
    barrier = threading.Barrier(clients)

    def client(i: int) -> None:
        try:
            barrier.wait(timeout=30)
            results[i] = stream(url, digest=i == 0, timeout=120)
        except Exception as e:
            errors.append(f"client {i}: {e!r}")

    threads = [
        threading.Thread(target=client, args=(i,), name=f"client-{i}", daemon=True) for i in range(clients)
    ]
    sampler = RssSampler(pids)
    baseline = sampler.sample()
    with sampler:
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(max(0.0, start + timeout - time.perf_counter()))
        seconds = time.perf_counter() - start
    peak = sampler.peak_kb
    if hwm:
        peak = max(peak, status_kb(pid, "VmHWM") or 0)
    return Crowd(
        [r for r in results if r is not None],
        errors,
        sum(t.is_alive() for t in threads),
        seconds,
        baseline / 1024,
        peak / 1024,
        sampler.samples,
        hwm,
    )


def crowd_problems(what: str, c: Crowd, clients: int, huge: UpstreamFile) -> list[str]:
    problems = [f"{what}: {e}" for e in c.errors[:5]]
    if len(c.errors) > 5:
        problems.append(f"{what}: ... {len(c.errors)} clients failed in all")
    if c.hung:
        problems.append(f"{what}: {c.hung} client(s) still reading after {c.seconds:.0f} s")
    bad = Counter((r.status, r.size) for r in c.results if (r.status, r.size) != (200, huge.size))
    if bad:
        problems.append(
            f"{what}: {bad.total()} client(s) got (status, bytes) {dict(bad)}, not (200, {huge.size})"
        )
    if any(r.sha256 is not None and r.sha256 != huge.sha256 for r in c.results):
        problems.append(f"{what}: wrong bytes (the sha256 of client 0's stream does not match)")
    return problems


def describe_crowd(name: str, c: Crowd, clients: int, mb: int, upstream: tuple[int, int] | None) -> str:
    complete = sum(1 for r in c.results if r.status == 200)
    caches = Counter(r.headers.get("x-cache", "-") for r in c.results)
    text = (
        f"{name}: {complete}/{clients} complete in {c.seconds:5.2f} s "
        f"({complete * mb / c.seconds:5.0f} MB/s in all); "
        f"RSS {c.baseline_mb:4.0f} MB before, peak {c.peak_mb:4.0f} MB"
        f" ({c.samples} samples{' + VmHWM' if c.hwm else ''})"
    )
    if caches.keys() != {"-"}:
        text += "; X-Cache " + ", ".join(f"{k} x{v}" for k, v in sorted(caches.items()))
    if sum(r.redirects for r in c.results):
        text += f"; {sum(r.redirects for r in c.results)} redirect(s) to the upstream"
    if upstream is not None:
        text += f"; the upstream answered {upstream[0]} GET(s), {upstream[1]} other(s) for it"
    return text


def huge_crowds(
    args: argparse.Namespace, upstream: Service, txpypi: Proxy, proxpi: Proxy, summary: list[Row]
) -> list[str]:
    """
    C{--huge-clients} clients stream one huge wheel at once, cold and warm,
    through each proxy, while its RSS is sampled.  Returns what txpypi did wrong.
    """
    n, mb = args.huge_clients, args.huge_mb
    cold_file, warm_file = huge_file(upstream, 1), huge_file(upstream, 0)  # 0 is cached by now
    section(
        f"{n} concurrent clients streaming one {mb} MB wheel ({READ_CHUNK // MB} MB reads, discarded; "
        "client 0 checks the sha256); RSS sampled every 50 ms"
    )
    problems: list[str] = []
    crowds: dict[tuple[str, str], Crowd] = {}
    upstream_fetches: dict[str, tuple[int, int]] = {}
    for proxy in (txpypi, proxpi):
        pid = proxy.service.process.pid
        url = file_url(proxy, cold_file.project, cold_file.filename)
        up.reset(upstream)
        c = crowds[proxy.name, "cold"] = crowd(url, n, pid)
        upstream_fetches[proxy.name] = up.upstream_gets(upstream, cold_file.path)
        print(describe_crowd(f"{proxy.name:7s} cold", c, n, mb, upstream_fetches[proxy.name]), flush=True)
        found = crowd_problems(f"{proxy.name} cold crowd", c, n, cold_file)
        if proxy is txpypi:
            problems += alarm(found)
            if upstream_fetches["txpypi"] != (1, 0):
                gets, others = upstream_fetches["txpypi"]
                problems += alarm(
                    [f"txpypi cold crowd: the upstream answered {gets} GET(s), {others} other(s)"]
                )
        elif found:
            print(f"(proxpi: {'; '.join(found)})")

        url = file_url(proxy, warm_file.project, warm_file.filename)
        if proxy is txpypi and not wait_cached(url):
            problems += alarm([f"txpypi did not cache {warm_file.filename}"])
        up.reset(upstream)
        c = crowds[proxy.name, "warm"] = crowd(url, n, pid)
        warm_upstream = up.upstream_gets(upstream, warm_file.path)
        print(describe_crowd(f"{proxy.name:7s} warm", c, n, mb, warm_upstream), flush=True)
        found = crowd_problems(f"{proxy.name} warm crowd", c, n, warm_file)
        if proxy is txpypi:
            problems += alarm(found)
            if any(r.headers.get("x-cache") != "HIT" for r in c.results):
                problems += alarm(["txpypi warm crowd: not every answer was X-Cache: HIT"])
            if warm_upstream != (0, 0):
                problems += alarm([f"txpypi warm crowd: the upstream answered {warm_upstream} requests"])
        elif found:
            print(f"(proxpi: {'; '.join(found)})")
    print(
        "(proxpi's RSS is the sum of gunicorn's arbiter and worker, sampled only; "
        "txpypi's is one process, sampled and its VmHWM)"
    )
    for phase in ("cold", "warm"):
        tx, px = crowds["txpypi", phase], crowds["proxpi", phase]
        rss_target = verdict(f"< {RSS_TARGET_MB:.0f} MB", f"{tx.peak_mb:.0f} MB", tx.peak_mb < RSS_TARGET_MB)
        print(f"target: txpypi peak RSS, {n} clients {phase}: {rss_target}")
        summary.append(
            (
                f"peak RSS, {n} clients {phase}",
                f"{tx.peak_mb:.0f} MB",
                f"{px.peak_mb:.0f} MB",
                ratio(tx.peak_mb, px.peak_mb),
                rss_target,
            )
        )
        summary.append(
            (
                f"{n} clients {phase}, all done",
                f"{tx.seconds:.2f} s",
                f"{px.seconds:.2f} s",
                ratio(tx.seconds, px.seconds),
            )
        )
    tx_gets, px_gets = upstream_fetches["txpypi"], upstream_fetches["proxpi"]
    once = verdict("exactly 1", str(tx_gets[0]), tx_gets == (1, 0))
    print(f"target: upstream GETs of the file for {n} cold txpypi clients: {once}")
    summary.append(
        (f"upstream GETs, {n} clients cold", str(tx_gets[0]), f"{px_gets[0]} (+{px_gets[1]} HEAD)", "-", once)
    )
    return problems


def run(ctx: Run) -> list[str]:
    """
    A huge file, one client then a crowd.
    """
    txpypi, proxpi = ctx.proxies
    return huge_download(ctx.args, ctx.upstream, txpypi, proxpi, ctx.summary) + huge_crowds(
        ctx.args, ctx.upstream, txpypi, proxpi, ctx.summary
    )

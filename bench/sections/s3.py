"""
The C{s3} section (step 9, issue #6): warm hits from S3 (SeaweedFS)
against hits from disk, two txpypi the same but for C{--store}.
"""

from __future__ import annotations

import statistics

from clients import READ_CHUNK, Streamed, stream
from harness import S3_ENV
from proxies import Proxy, check_stream, file_url, start_instances, wait_landed, warm_up
from report import Table, alarm, ratio, seconds_list, section
from sampling import cpu_seconds
from upstream import BIG_PROJECT, FILE_PROJECT, MB, upstream_file, wheel_name
from wrk import WrkResult, fmt_wrk, run_wrk, wrk_description, wrk_rows

from sections import Run


def s3_vs_disk(ctx: Run) -> list[str]:
    """
    Issue #6: warm hits from S3 vs from local disk.  Two txpypi, the same
    but for C{--store} (both keep their metadata in SQLite): wrk on the
    ~1 MB wheel, then one client on the 50 MB wheel.  Adds its own table
    and stops the two; returns what txpypi did wrong.
    """
    work = ctx.work
    disk, s3 = start_instances(
        ctx.services,
        work,
        ctx.upstream,
        {
            "txpypi-disk": ["--store", "disk", "--cache-dir", str(work / "disk-cache")],
            "txpypi-s3": ["--cache-dir", str(work / "s3-spool"), *ctx.backends.s3("s3-vs-disk/")],
        },
        env=S3_ENV,
    )
    stores = {"disk": disk, "s3": s3}
    table = Table(
        "summary: warm hits from S3 (SeaweedFS on loopback) vs from disk",
        ("measure", "disk", "s3", "s3/disk", ""),
        note="(one txpypi each, SQLite metadata; SeaweedFS shares the CPUs with txpypi and the clients)",
    )
    problems = small_hits(ctx, stores, table) + big_hits(ctx, stores, table)
    ctx.tables.append(table)
    ctx.services.stop(disk.service, s3.service)
    return problems


def small_hits(ctx: Run, stores: dict[str, Proxy], table: Table) -> list[str]:
    """
    wrk on the warm ~1 MB wheel through each of C{stores}; its rows go to
    C{table}.  Returns what txpypi did wrong.
    """
    args = ctx.args
    problems: list[str] = []
    small = wheel_name(FILE_PROJECT, "1.0")
    section(
        f"warm hits, --store disk vs --store s3 (SeaweedFS): {small} (~{args.file_kb} KB), "
        + wrk_description(args)
    )
    results: dict[str, WrkResult] = {}
    for name, proxy in stores.items():
        url = file_url(proxy, FILE_PROJECT, small)
        warm_up(proxy, url)
        if wait_landed(proxy.service, small) is None:
            problems += alarm([f"txpypi --store {name} did not cache {small} within 60 s"])
        results[name] = run_wrk(ctx.wrk_binary, url, args)
        print(f"{name:5s} {fmt_wrk(results[name])}", flush=True)
        if results[name].errors:
            problems += alarm([f"txpypi --store {name}, warm {small}: {results[name].errors}"])
    d, s = results["disk"], results["s3"]
    print(
        f"ratio s3/disk: req/s {ratio(s.rps, d.rps)} (higher is better), "
        f"p50 {ratio(s.p50_ms, d.p50_ms)}, p99 {ratio(s.p99_ms, d.p99_ms)} (lower is better)"
    )
    table.rows += wrk_rows(f"~{args.file_kb} KB hit", d, s, flip=True)
    return problems


def big_hits(ctx: Run, stores: dict[str, Proxy], table: Table) -> list[str]:
    """
    One client on the warm 50 MB wheel through each of C{stores}, after a
    checked miss and a checked first hit; its rows go to C{table}.
    Returns what txpypi did wrong.
    """
    args = ctx.args
    problems: list[str] = []
    big = upstream_file(ctx.upstream, BIG_PROJECT.format(0))
    mb = big.size / MB
    section(
        f"warm hits, --store disk vs --store s3: {big.filename} ({mb:.0f} MB), one client reading "
        f"{READ_CHUNK // MB} MB at a time ({args.s3_runs} run(s), interleaved; median)"
    )
    urls: dict[str, str] = {}
    for name, proxy in stores.items():
        url = urls[name] = file_url(proxy, big.project, big.filename)
        problems += alarm(check_stream(f"txpypi --store {name}, miss", stream(url, digest=True), big, "MISS"))
        took = wait_landed(proxy.service, big.filename)
        if took is None:
            problems += alarm([f"txpypi --store {name} did not cache {big.filename} within 60 s"])
        else:
            print(f"{name:5s} the miss landed in the store {took:.2f} s after its client had it all")
        # A first hit, checked: it also opens the S3 client's connections.
        problems += alarm(check_stream(f"txpypi --store {name}, hit", stream(url, digest=True), big, "HIT"))
    runs: dict[str, list[Streamed]] = {name: [] for name in stores}
    cpus: dict[str, list[float]] = {name: [] for name in stores}
    for run in range(args.s3_runs):
        for name, proxy in stores.items():
            pid = proxy.service.process.pid
            cpu = cpu_seconds(pid)
            got = stream(urls[name])
            cpus[name].append(cpu_seconds(pid) - cpu)
            problems += alarm(check_stream(f"txpypi --store {name}, hit run {run + 1}", got, big, "HIT"))
            runs[name].append(got)
    seconds = {name: statistics.median(r.total for r in runs[name]) for name in stores}
    ttfb = {name: statistics.median(r.ttfb for r in runs[name]) * 1000 for name in stores}
    for name in stores:
        cpu = statistics.median(cpus[name])
        print(
            f"{name:5s} {seconds[name]:6.2f} s ({mb / seconds[name]:5.0f} MB/s)  TTFB {ttfb[name]:7.2f} ms   "
            f"(runs: {seconds_list(runs[name])} s; txpypi CPU {cpu:.2f} s, {cpu / seconds[name]:.0%})"
        )
    rate = {name: mb / seconds[name] for name in stores}
    print(
        f"ratio s3/disk: time {ratio(seconds['s3'], seconds['disk'])}, "
        f"MB/s {ratio(rate['s3'], rate['disk'])}, TTFB {ratio(ttfb['s3'], ttfb['disk'])}"
    )
    table.rows += [
        (
            f"{mb:.0f} MB hit, one client",
            f"{seconds['disk']:.2f} s",
            f"{seconds['s3']:.2f} s",
            ratio(seconds["s3"], seconds["disk"]),
        ),
        (
            f"{mb:.0f} MB hit, one client",
            f"{rate['disk']:.0f} MB/s",
            f"{rate['s3']:.0f} MB/s",
            ratio(rate["s3"], rate["disk"]),
        ),
        (
            f"{mb:.0f} MB hit TTFB",
            f"{ttfb['disk']:.2f} ms",
            f"{ttfb['s3']:.2f} ms",
            ratio(ttfb["s3"], ttfb["disk"]),
        ),
    ]
    return problems


run = s3_vs_disk

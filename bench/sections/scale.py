"""
The C{scale} section (issue #14, the cost as the cache grows): a txpypi
whose metadata database holds C{--scale-records} file records (default
1,000,000) and C{--scale-pages} project pages (default a tenth of that),
generated here with one bulk insert in the schema of
L{txpypi.storage.metadata} -- their files are not on disk, only the few
the bench asks for are, fetched through the proxy -- against a txpypi
with an empty cache, in the same run, in front of the same upstream.

It measures, with C{--stall-meter} on both:

 - start-up: from starting twistd to the first C{/health} 200, and to
   the first that knows the cache's size (read from the database);
 - a hit (the warm ~1 MB wheel) and a warm page: the median and p90 of
   sequential requests, each on a fresh connection, the two proxies
   interleaved;
 - C{/stats}: each with its own C{?top=N}, so that no answer comes from
   the one-second memo;
 - an eviction of 1 % of the files: C{max-cache-size} set 1 % under the
   cache's size through the config file and SIGHUP, in the running
   proxy; the reactor's lateness during it, from the stall meter's
   histogram (the ticks late by more than 50 ms) and its longest stall,
   and hits meanwhile.

The stall meter times the reactor against the wall clock: on a machine
shared with other work, the process being descheduled shows as a stall
too, so a single late tick is worth a second run.

Targets: start-up <= 2 s; a hit's and a warm page's median within noise
of the empty cache's (<= 1.25x, or 0.5 ms more); C{/stats} <= 100 ms;
no reactor stall of 50 ms or more during the eviction.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import sqlite3
import statistics
import time
from pathlib import Path

from clients import fetch
from harness import Service, free_ports, start_txpypi
from proxies import Proxy, as_proxy, file_url, warm_up
from report import Table, alarm, ratio, section
from upstream import FILE_PROJECT, JSON_ACCEPT, PAGE_PROJECT, wheel_name

from sections import Run
from txpypi.storage.metadata import connect
from txpypi.storage.stores import file_key

#: Every generated file's size: 1 % of the files is then 1 % of the bytes.
FILE_SIZE = 100_000
GROUP = "default"
STARTUP_TARGET_S = 2.0
STATS_TARGET_MS = 100.0
STALL_TARGET_S = 0.05
#: A figure "within noise" of the empty cache's: at most this many times it, or this much more.
NOISE_RATIO = 1.25
NOISE_MS = 0.5


def verdict(target: str, actual: str, met: bool) -> str:
    return f"{target} ({actual}): {'MET' if met else 'MISSED'}"


def generate(cache_dir: Path, records: int, pages: int) -> float:
    """
    Write a metadata database of C{records} file records (with a download
    count each) and C{pages} project pages under C{cache_dir}; the seconds
    it took.
    """
    start = time.monotonic()
    db = connect(cache_dir / "metadata.sqlite")
    db.execute("PRAGMA synchronous=OFF")
    body = json.dumps({"meta": {"api-version": "1.1"}, "name": "gen", "files": [], "versions": []}).encode()
    old = time.time() - 30 * 86400  # a month ago: older than anything the bench serves

    def files() -> object:
        for i in range(records):
            project = f"gen-{i % pages}"
            filename = f"gen_{i % pages}-{i}-py3-none-any.whl"
            sha = hashlib.sha256(i.to_bytes(8, "big")).hexdigest()
            at = old + i * 0.001
            yield (
                f"{GROUP}/{project}/{filename}",
                "https://upstream.invalid/simple/",
                f"https://files.invalid/{filename}",
                sha,
                FILE_SIZE,
                file_key(sha, filename),
                at,
                at,
            )

    def page_rows() -> object:
        for j in range(pages):
            yield (
                f"{GROUP}/simple/gen-{j}/",
                "https://upstream.invalid/simple/",
                f"https://upstream.invalid/simple/gen-{j}/",
                body,
                old,
                None,
                None,
            )

    def downloads() -> object:
        for i in range(records):
            yield (f"gen-{i % pages}", str(i), f"gen_{i % pages}-{i}-py3-none-any.whl", 1 + i % 7)

    db.execute("BEGIN")
    db.executemany("INSERT INTO files VALUES (?, ?, ?, ?, ?, ?, ?, ?)", files())  # type: ignore[arg-type]
    db.executemany("INSERT INTO pages VALUES (?, ?, ?, ?, ?, ?, ?)", page_rows())  # type: ignore[arg-type]
    db.executemany("INSERT INTO downloads VALUES (?, ?, ?, ?)", downloads())  # type: ignore[arg-type]
    db.execute("COMMIT")
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    return time.monotonic() - start


def start_timed(ctx: Run, name: str, port: int, cache_dir: Path, config: Path) -> tuple[Proxy, float, float]:
    """
    Start a txpypi on C{cache_dir} and time it to its first C{/health} 200,
    and to the first that knows the cache's size.
    """
    start = time.monotonic()
    service = start_txpypi(
        ctx.services,
        ctx.work,
        name,
        port,
        ctx.upstream,
        "--cache-dir",
        str(cache_dir),
        "--config",
        str(config),
        "--stall-meter",
        "--log-format",
        "none",
    )
    deadline = start + 120
    healthy = None
    while True:
        try:
            got = fetch(f"{service.base}/health", timeout=5)
            if got.status == 200:
                healthy = healthy or time.monotonic() - start
                if json.loads(got.body)["cache"]["bytes"] is not None:
                    break
        except OSError:
            pass
        if service.process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not become healthy:\n{service.tail()}")
        time.sleep(0.01)
    return as_proxy(service, ctx.work), healthy, time.monotonic() - start


def timed(url: str, accept: str | None = None) -> float:
    got = fetch(url, accept, max_redirects=0, timeout=30)
    if got.status != 200:
        raise RuntimeError(f"{url} answered {got.status}")
    return got.total * 1000


def median_p90(samples: list[float]) -> tuple[float, float]:
    ordered = sorted(samples)
    return statistics.median(ordered), ordered[int(len(ordered) * 0.9)]


def metrics_text(proxy: Proxy) -> str:
    return fetch(f"{proxy.service.base}/metrics").body.decode()


def metric(text: str, name: str, labels: str = "") -> float:
    """
    A sample's value in C{text}, a C{/metrics} page (0 when not there).
    """
    pattern = re.escape(name) + (re.escape("{" + labels + "}") if labels else "") + r" (\S+)"
    found = re.search(r"^" + pattern + r"$", text, re.M)
    return float(found.group(1)) if found else 0.0


def late_over(text: str, bound: str = "0.05") -> float:
    """
    The stall meter's ticks late by more than C{bound} seconds so far, in
    C{text}, one C{/metrics} page (the two figures of one scrape).
    """
    count = metric(text, "txpypi_reactor_lateness_seconds_count")
    within = metric(text, "txpypi_reactor_lateness_seconds_bucket", f'le="{bound}"')
    return count - within


def health(proxy: Proxy) -> dict[str, object]:
    cache = json.loads(fetch(f"{proxy.service.base}/health").body)["cache"]
    assert isinstance(cache, dict)
    return cache


def run(ctx: Run) -> list[str]:
    args = ctx.args
    records: int = args.scale_records
    pages: int = args.scale_pages if args.scale_pages is not None else max(1, records // 10)
    samples: int = args.scale_samples
    problems: list[str] = []
    section(f"scale: {records:,} file records and {pages:,} pages against an empty cache")
    big_dir, empty_dir = ctx.work / "scale-cache", ctx.work / "scale-empty"
    big_dir.mkdir()
    empty_dir.mkdir()
    took = generate(big_dir, records, pages)
    size_mb = (big_dir / "metadata.sqlite").stat().st_size / 1e6
    print(f"generated the database in {took:.1f} s ({size_mb:.0f} MB)", flush=True)
    config = ctx.work / "scale.yaml"
    config.write_text("index-ttl: 3600\n")
    big_port, empty_port = free_ports(2)
    empty, empty_start, empty_sized = start_timed(ctx, "txpypi-empty", empty_port, empty_dir, config)
    big, big_start, big_sized = start_timed(ctx, "txpypi-scale", big_port, big_dir, config)
    print(f"start-up to /health 200: empty {empty_start:.2f} s, {records:,} records {big_start:.2f} s")

    filename = wheel_name(FILE_PROJECT, "1.0")
    hits: dict[str, list[float]] = {empty.name: [], big.name: []}
    warm_pages: dict[str, list[float]] = {empty.name: [], big.name: []}
    urls = {}
    for proxy in (empty, big):
        urls[proxy.name] = file_url(proxy, FILE_PROJECT, filename)
        warm_up(proxy, urls[proxy.name])
        warm_up(proxy, proxy.page_url(PAGE_PROJECT), JSON_ACCEPT)
    for _ in range(samples):  # interleaved: load drift weighs on both
        for proxy in (empty, big):
            hits[proxy.name].append(timed(urls[proxy.name]))
            warm_pages[proxy.name].append(timed(proxy.page_url(PAGE_PROJECT), JSON_ACCEPT))

    stats: dict[str, list[float]] = {empty.name: [], big.name: []}
    for top in range(1, 11):  # a distinct ?top= each: none answered by the memo
        for proxy in (empty, big):
            stats[proxy.name].append(timed(f"{proxy.service.base}/stats?top={top}"))

    table = Table(
        f"the cost of a big cache: {records:,} file records, {pages:,} pages (same run, same upstream)",
        ("measure", f"{records:,} records", "empty cache", "ratio", "target"),
        note=f"(medians of {samples} sequential requests, fresh connections; /stats: 10 distinct ?top=)",
    )
    table.rows.append(
        (
            "start-up to /health 200",
            f"{big_start:.2f} s",
            f"{empty_start:.2f} s",
            ratio(big_start, empty_start),
            verdict(f"<= {STARTUP_TARGET_S:.0f} s", f"{big_start:.2f} s", big_start <= STARTUP_TARGET_S),
        )
    )
    table.rows.append(
        (
            "start-up to the cache's size known",
            f"{big_sized:.2f} s",
            f"{empty_sized:.2f} s",
            ratio(big_sized, empty_sized),
            verdict(f"<= {STARTUP_TARGET_S:.0f} s", f"{big_sized:.2f} s", big_sized <= STARTUP_TARGET_S),
        )
    )
    for what, figures in (("hit (~1 MB wheel)", hits), ("warm page", warm_pages)):
        b50, b90 = median_p90(figures[big.name])
        e50, e90 = median_p90(figures[empty.name])
        ok = b50 <= e50 * NOISE_RATIO or b50 <= e50 + NOISE_MS
        table.rows.append(
            (
                f"{what} p50 / p90",
                f"{b50:.2f} / {b90:.2f} ms",
                f"{e50:.2f} / {e90:.2f} ms",
                ratio(b50, e50),
                verdict(f"<= {NOISE_RATIO}x or +{NOISE_MS} ms", f"{b50 / e50:.2f}x", ok),
            )
        )
    worst = max(stats[big.name])
    table.rows.append(
        (
            "/stats median / worst",
            f"{statistics.median(stats[big.name]):.1f} / {worst:.1f} ms",
            f"{statistics.median(stats[empty.name]):.1f} / {max(stats[empty.name]):.1f} ms",
            ratio(worst, max(stats[empty.name])),
            verdict(f"<= {STATS_TARGET_MS:.0f} ms", f"{worst:.1f} ms", worst <= STATS_TARGET_MS),
        )
    )

    # Eviction: 1 % of the files, in the running proxy, through SIGHUP.
    before = health(big)
    evict = records // 100
    cache_bytes = before["bytes"]
    assert isinstance(cache_bytes, int)
    limit = cache_bytes - evict * FILE_SIZE
    scraped = metrics_text(big)
    late_before = late_over(scraped)
    longest_before = metric(scraped, "txpypi_reactor_stall_seconds_max")
    config.write_text(f"index-ttl: 3600\nmax-cache-size: {limit}\n")
    start = time.monotonic()
    os.kill(big.service.process.pid, signal.SIGHUP)
    during: list[float] = []
    evicted = 0.0
    while True:
        during.append(timed(urls[big.name]))
        evicted = metric(metrics_text(big), "txpypi_evictions_total")
        if evicted >= evict or time.monotonic() - start > 600:
            break
    evict_s = time.monotonic() - start
    scraped = metrics_text(big)
    late = late_over(scraped) - late_before
    longest = metric(scraped, "txpypi_reactor_stall_seconds_max")
    after = health(big)
    print(
        f"evicted {evicted:.0f} of {evict:,} files in {evict_s:.1f} s; cache {after['bytes']} bytes, "
        f"limit {limit}; {late:.0f} ticks late by > 50 ms; longest stall since start "
        f"{longest * 1000:.1f} ms (before the eviction {longest_before * 1000:.1f} ms)"
    )
    if evicted < evict:
        problems.append(f"scale: evicted {evicted:.0f} files of {evict} in {evict_s:.0f} s")
    if warm_up(big, urls[big.name]).headers.get("x-cache") != "HIT":
        problems.append("scale: the recently served wheel was evicted")
    stall = longest if longest > longest_before else None
    table.rows.append(
        (
            f"eviction of {evict:,} files: reactor",
            f"{late:.0f} ticks > 50 ms"
            + (f", longest {stall * 1000:.1f} ms" if stall is not None else ", longest < the start-up's"),
            "",
            "",
            verdict("no stall >= 50 ms", f"{late:.0f} late ticks", late == 0),
        )
    )
    d50, d90 = median_p90(during)
    table.rows.append(
        (
            "eviction: time, hits meanwhile p50 / p90",
            f"{evict_s:.1f} s, {d50:.2f} / {d90:.2f} ms",
            "",
            "",
            "(no target)",
        )
    )
    table.rows.append(
        (
            "RSS after the above",
            f"{rss_mb(big.service):.0f} MB",
            f"{rss_mb(empty.service):.0f} MB",
            ratio(rss_mb(big.service), rss_mb(empty.service)),
            "(no target)",
        )
    )
    ctx.services.stop(big.service, empty.service)

    # Once: the same database as schema 2 wrote it, upgraded at start-up.
    downgrade(big_dir / "metadata.sqlite")
    port = free_ports(1)[0]
    upgraded, up_health, up_sized = start_timed(ctx, "txpypi-upgraded", port, big_dir, config)
    table.rows.append(
        (
            "start-up, upgrading schema 2 (once)",
            f"{up_health:.2f} s, size known {up_sized:.2f} s",
            "",
            "",
            "(no target: once per database)",
        )
    )
    ctx.services.stop(upgraded.service)
    ctx.tables.append(table)
    return alarm(problems)


def rss_mb(service: Service) -> float:
    for line in Path(f"/proc/{service.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def downgrade(path: Path) -> None:
    """
    Make the database at C{path} what schema 2 left: its index on
    C{last_access} alone, no project totals.
    """
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("DROP INDEX files_by_access_key")
    db.execute("DROP TABLE project_downloads")
    db.execute("CREATE INDEX files_by_access ON files (last_access)")
    db.execute("PRAGMA user_version = 2")
    db.close()

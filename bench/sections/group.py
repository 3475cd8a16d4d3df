"""
The C{group} section (issue #12): a txpypi serving a two-member
first-index group, the first member an index that knows nothing (every
page a 404), the second the bench upstream, against the single-upstream
txpypi in the same run: wrk on the warm page and the warm cached file
(target: no measurable loss), and the cold page latency (target: one
extra round trip to the first member, no more).
"""

from __future__ import annotations

import statistics
import sys
import time

from clients import delete, expect_200, fetch, get_json
from harness import Service, clean_env, free_ports, start_txpypi
from proxies import Proxy, as_proxy, file_url, warm_up
from report import Table, alarm, ratio, section
from upstream import FILE_PROJECT, JSON_ACCEPT, PAGE_PROJECT, wheel_name
from wrk import WrkResult, run_wrk

from sections import Run

#: Cold page fetches timed per proxy (each after its page is forgotten).
COLD_SAMPLES = 15


def _start(ctx: Run) -> tuple[Service, Proxy]:
    """
    The empty index (Python's http.server on an empty directory: a 404 for
    every page) and a txpypi whose default group is [empty, upstream].
    """
    empty_port, group_port = free_ports(2)
    empty_dir = ctx.work / "empty-index"
    empty_dir.mkdir(exist_ok=True)
    argv = [sys.executable, "-m", "http.server", str(empty_port), "--bind", "127.0.0.1"]
    argv += ["--directory", str(empty_dir)]
    empty = ctx.services.start("empty", argv, clean_env(), empty_port, ctx.work)
    config = ctx.work / "group.yaml"
    config.write_text(
        "upstreams:\n"
        f"  empty: {{url: 'http://127.0.0.1:{empty_port}/simple/'}}\n"
        f"  bench: {{url: '{ctx.upstream.base}/simple/'}}\n"
        "groups:\n"
        "  default: {members: [empty, bench]}\n"
        "  nothing: {members: [empty]}\n"
    )
    # --upstream is the harness's; the YAML's upstreams take its place.
    service = start_txpypi(
        ctx.services,
        ctx.work,
        "txpypi-group",
        group_port,
        ctx.upstream,
        "--cache-dir",
        str(ctx.work / "group-cache"),
        env={"TXPYPI_CONFIG": str(config)},
        upstream_option=False,
    )
    for started in (empty, service):
        ctx.services.wait_ready(started)
    return empty, as_proxy(service, ctx.work)


def _cold_ms(proxy: Proxy, project: str) -> list[float]:
    assert proxy.admin_token is not None
    times = []
    for _ in range(COLD_SAMPLES):
        base = proxy.service.base
        if delete(f"{base}/cache/{project}", proxy.admin_token) != 200:
            raise RuntimeError(f"{proxy.name} did not forget {project}")
        start = time.perf_counter()
        got = fetch(proxy.page_url(project), JSON_ACCEPT)
        times.append((time.perf_counter() - start) * 1000)
        if got.status != 200:
            raise RuntimeError(f"{proxy.name}: cold {project} answered {got.status}")
    return times


def _miss_ms(group: Proxy, project: str) -> float:
    """
    What one upstream round trip that answers 404 costs through txpypi:
    a cold page of the group whose one member is the empty index.
    """
    assert group.admin_token is not None
    times = []
    for _ in range(COLD_SAMPLES):
        base = group.service.base
        if delete(f"{base}/nothing/cache/{project}", group.admin_token) != 200:
            raise RuntimeError("the group did not forget the 404")
        start = time.perf_counter()
        got = fetch(f"{base}/nothing/simple/{project}/", JSON_ACCEPT)
        times.append((time.perf_counter() - start) * 1000)
        if got.status != 404:
            raise RuntimeError(f"the empty group answered {got.status}")
    return statistics.median(times)


def _mean(results: list[WrkResult]) -> WrkResult:
    return WrkResult(
        statistics.mean(r.rps for r in results),
        statistics.mean(r.p50_ms for r in results),
        statistics.mean(r.p99_ms for r in results),
        sum(r.requests for r in results),
        "; ".join(r.errors for r in results if r.errors),
    )


def run(ctx: Run) -> list[str]:
    single = ctx.txpypi
    assert single is not None
    wrong: list[str] = []
    empty, group = _start(ctx)
    table = Table(
        "a two-member first-index group (the first member knows nothing) vs one upstream",
        ("measure", "group", "single", "group/single", "target"),
        note="(both txpypi, same run, same upstream; cold: median of "
        f"{COLD_SAMPLES}, each after DELETE /cache/<project>; 'a cold 404 alone': the same "
        "txpypi's group whose one member is the empty index)",
    )
    section("group: warm page and warm cached file through a two-member group vs a single upstream")
    filename = wheel_name(FILE_PROJECT, "1.0")
    for what, url_of, accept in (
        ("warm page", lambda p: p.page_url(PAGE_PROJECT), JSON_ACCEPT),
        ("warm file", lambda p: file_url(p, FILE_PROJECT, filename), None),
    ):
        runs: dict[str, list[WrkResult]] = {group.name: [], single.name: []}
        urls = {proxy.name: url_of(proxy) for proxy in (group, single)}
        for proxy in (group, single):
            warm_up(proxy, urls[proxy.name], accept)
        # Interleaved (group, single, single, group), each the mean of its
        # two runs, so that a drift of the machine's load weighs on both.
        for proxy in (group, single, single, group):
            result = run_wrk(ctx.wrk_binary, urls[proxy.name], ctx.args, accept)
            runs[proxy.name].append(result)
            print(f"{what:9s} {proxy.name:13s} {result.rps:10.0f} req/s", flush=True)
        g, s = _mean(runs[group.name]), _mean(runs[single.name])
        table.rows.append((f"{what} req/s", f"{g.rps:.0f}", f"{s.rps:.0f}", ratio(g.rps, s.rps), ">= 0.95x"))
        table.rows.append(
            (f"{what} p99 ms", f"{g.p99_ms:.2f}", f"{s.p99_ms:.2f}", ratio(g.p99_ms, s.p99_ms), "")
        )
    expect_200(group.page_url(PAGE_PROJECT), JSON_ACCEPT)
    cold_group = statistics.median(_cold_ms(group, PAGE_PROJECT))
    cold_single = statistics.median(_cold_ms(single, PAGE_PROJECT))
    miss = _miss_ms(group, PAGE_PROJECT)
    extra = cold_group - cold_single
    print(
        f"cold page: group {cold_group:.2f} ms, single {cold_single:.2f} ms; "
        f"a cold 404 through txpypi from the empty index alone {miss:.2f} ms"
    )
    table.rows.append(
        ("cold page ms", f"{cold_group:.2f}", f"{cold_single:.2f}", ratio(cold_group, cold_single), "")
    )
    table.rows.append(
        ("  extra / a cold 404 alone", f"{extra:.2f}", f"{miss:.2f}", ratio(extra, miss), "<= ~1x")
    )
    named = set(get_json(f"{group.service.base}/health")["upstreams"])
    if named != {"empty", "bench"}:
        wrong.append(f"the group's /health names the upstreams {sorted(named)}, not empty and bench")
    ctx.tables.append(table)
    ctx.services.stop(group.service, empty)
    return alarm(wrong)

"""
The C{accesslog} section (issue #14, the cheap access log): wrk on the warm
index page through three txpypi in front of the same upstream, in the same
run: the defaults (the buffered access log, to standard output), the
access log as twisted.logger events (C{--access-log log}, as before), and
none (C{--log-format none}).  Target: the log costs at most 10 % of the
throughput without it.
"""

from __future__ import annotations

import statistics

from harness import free_ports, start_txpypi
from proxies import Proxy, as_proxy, warm_up
from report import Table, alarm, ratio, section
from upstream import JSON_ACCEPT, PAGE_PROJECT
from wrk import WrkResult, run_wrk

from sections import Run


def run(ctx: Run) -> list[str]:
    main = ctx.txpypi
    assert main is not None
    events_port, none_port = free_ports(2)
    started = [
        start_txpypi(
            ctx.services,
            ctx.work,
            "txpypi-events",
            events_port,
            ctx.upstream,
            "--cache-dir",
            str(ctx.work / "events-cache"),
            "--access-log",
            "log",
        ),
        start_txpypi(
            ctx.services,
            ctx.work,
            "txpypi-nolog",
            none_port,
            ctx.upstream,
            "--cache-dir",
            str(ctx.work / "nolog-cache"),
            "--log-format",
            "none",
        ),
    ]
    for service in started:
        ctx.services.wait_ready(service)
    events, none = (as_proxy(s, ctx.work) for s in started)
    section("accesslog: the warm page with the buffered log, with logger events, and with none")
    proxies: tuple[Proxy, ...] = (main, events, none)
    runs: dict[str, list[WrkResult]] = {p.name: [] for p in proxies}
    for proxy in proxies:
        warm_up(proxy, proxy.page_url(PAGE_PROJECT), JSON_ACCEPT)
    for proxy in (*proxies, *reversed(proxies)):  # interleaved: load drift weighs on all
        result = run_wrk(ctx.wrk_binary, proxy.page_url(PAGE_PROJECT), ctx.args, JSON_ACCEPT)
        runs[proxy.name].append(result)
        print(f"{proxy.name:14s} {result.rps:10.0f} req/s   p99 {result.p99_ms:.2f} ms", flush=True)
    rps = {name: statistics.mean(r.rps for r in results) for name, results in runs.items()}
    table = Table(
        "the access log's cost on the warm page (same run, same upstream)",
        ("measure", "with it", "without", "with/without", "target"),
        note="(defaults: buffered, to standard output; events: --access-log log; none: --log-format none)",
    )
    table.rows.append(
        (
            "buffered log req/s",
            f"{rps[main.name]:.0f}",
            f"{rps[none.name]:.0f}",
            ratio(rps[main.name], rps[none.name]),
            ">= 0.90x",
        )
    )
    table.rows.append(
        (
            "logger events req/s",
            f"{rps[events.name]:.0f}",
            f"{rps[none.name]:.0f}",
            ratio(rps[events.name], rps[none.name]),
            "(as before)",
        )
    )
    ctx.tables.append(table)
    ctx.services.stop(*started)
    return alarm([])

"""
The C{link} section (step 8, issue #4's target behind a real link): the
cold huge wheel through txpypi against the direct download, the upstream
unthrottled and then paced at each of C{--link-rates}.
"""

from __future__ import annotations

import argparse
import statistics

from clients import Streamed, head
from harness import Service
from proxies import Proxy, file_url, purge
from report import Table, alarm, download_verdict, seconds_list, section
from upstream import MB, PACE_BURST, PACE_PIECE, huge_file, set_rate

from sections import Run
from sections.huge import cold_download, direct_download


def rate_label(mbit: float) -> str:
    if not mbit:
        return "unthrottled"
    return f"{mbit:g} Mbit/s ({mbit * 1e6 / 8 / MB:.0f} MB/s)"


def link_speeds(args: argparse.Namespace, upstream: Service, txpypi: Proxy, tables: list[Table]) -> list[str]:
    """
    The huge wheel, cold, through txpypi and direct, with the upstream
    unthrottled and then paced at each of C{--link-rates}: issue #4's
    download-time ratio behind a link of realistic speed rather than
    loopback.  Returns what txpypi did wrong.
    """
    huge = huge_file(upstream, 0)
    mb = args.huge_mb
    rates = [0.0, *args.link_rates]  # Mbit/s; 0 for unthrottled
    section(
        f"cold {mb} MB wheel through txpypi vs direct, the upstream at link rates "
        f"({args.link_runs} run(s) per rate, the rates interleaved; medians)"
    )
    print(
        f"(a paced upstream writes {PACE_PIECE // 1024} KB at a time from a token bucket of "
        f"{PACE_BURST // MB} MB, full at the start; Mbit = 10^6 bits, MB = 2^20 bytes)"
    )
    problems: list[str] = []
    url = file_url(txpypi, huge.project, huge.filename)  # warms the page: only the file is cold
    if head(url).get("x-cache") == "HIT" and not purge(txpypi, huge):
        raise RuntimeError(f"could not purge {huge.filename} from txpypi")
    direct: dict[float, list[Streamed]] = {rate: [] for rate in rates}
    cold: dict[float, list[Streamed]] = {rate: [] for rate in rates}
    cold_cpu: dict[float, list[float]] = {rate: [] for rate in rates}
    try:
        for run in range(args.link_runs):
            for rate in rates:
                set_rate(upstream, rate * 1e6 / 8)
                direct[rate].append(direct_download(upstream, huge))
                what = f"txpypi cold, {rate_label(rate)}, run {run + 1}"
                got, cpu, _, found = cold_download(upstream, txpypi, url, huge, what)
                cold_cpu[rate].append(cpu)
                problems += found
                cold[rate].append(got)
                if not purge(txpypi, huge):
                    problems += alarm([f"could not purge {huge.filename} from txpypi: no more cold runs"])
                    raise StopIteration
    except StopIteration:
        pass
    finally:
        set_rate(upstream, 0)

    table = Table(
        f"summary: cold {mb} MB download through txpypi vs direct, by upstream link rate",
        ("upstream link", "direct", "txpypi cold", "txpypi/direct", "txpypi target"),
        note="(one client reading 1 MB at a time; medians; CPU: txpypi's, as a share of the run's wall time)",
    )
    for rate in rates:
        if not cold[rate]:
            continue
        d_s = statistics.median(r.total for r in direct[rate])
        d_ttfb = statistics.median(r.ttfb for r in direct[rate]) * 1000
        tx_s = statistics.median(r.total for r in cold[rate])
        tx_ttfb = statistics.median(r.ttfb for r in cold[rate]) * 1000
        cpu = statistics.median(cold_cpu[rate])
        print(f"{rate_label(rate)}:")
        print(
            f"  direct:       {d_s:6.2f} s ({mb / d_s:5.0f} MB/s)  TTFB {d_ttfb:7.2f} ms   "
            f"(runs: {seconds_list(direct[rate])} s)"
        )
        if rate:
            paced = max(0, huge.size - PACE_BURST) / (rate * 1e6 / 8)
            off = d_s / paced - 1
            print(
                f"  (the pace allows {paced:.2f} s; direct took {off:+.1%} more"
                + (
                    ""
                    if abs(off) <= 0.03
                    else ": !! the upstream missed its pace, this rate's figures are off"
                )
                + ")"
            )
        print(
            f"  txpypi cold:  {tx_s:6.2f} s ({mb / tx_s:5.0f} MB/s)  TTFB {tx_ttfb:7.2f} ms   "
            f"(runs: {seconds_list(cold[rate])} s; CPU {cpu:.2f} s, {cpu / tx_s:.0%})"
        )
        slower = tx_s / d_s
        target = download_verdict(slower)
        print(f"  txpypi/direct: {slower:.2f}x; target: {target}")
        table.rows.append(
            (
                rate_label(rate),
                f"{d_s:.2f} s",
                f"{tx_s:.2f} s (CPU {cpu / tx_s:.0%})",
                f"{slower:.2f}x",
                target,
            )
        )
    tables.append(table)
    return problems


def run(ctx: Run) -> list[str]:
    assert ctx.txpypi is not None
    return link_speeds(ctx.args, ctx.upstream, ctx.txpypi, ctx.tables)

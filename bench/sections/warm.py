"""
The C{page} and C{file} sections (steps 1 and 2): wrk on a warm index page
and on a warm cached ~1 MB wheel, through each proxy.
"""

from __future__ import annotations

import argparse

from proxies import Proxy, file_url, warm_up
from report import Row, ratio, section
from upstream import FILE_PROJECT, PAGE_PROJECT, wheel_name
from wrk import WrkResult, fmt_wrk, run_wrk, wrk_description, wrk_rows

from sections import Run


def page_section(
    args: argparse.Namespace, wrk: str, proxies: tuple[Proxy, Proxy], accept: str, summary: list[Row]
) -> None:
    """
    Step 1: wrk on a warm index page.
    """
    section(f"warm index page /{PAGE_PROJECT}/ ({args.page_format}), {wrk_description(args)}")
    page_results: dict[str, WrkResult] = {}
    for proxy in proxies:
        url = proxy.page_url(PAGE_PROJECT)
        warm = warm_up(proxy, url, accept)
        page_results[proxy.name] = run_wrk(wrk, url, args, accept)
        print(f"{proxy.name:7s} {fmt_wrk(page_results[proxy.name])}   [{len(warm.body)} B body]")
    _summarize_wrk(summary, "warm page", page_results)


def file_section(
    args: argparse.Namespace, wrk: str, proxies: tuple[Proxy, Proxy], summary: list[Row]
) -> None:
    """
    Step 2: wrk on a warm cached ~1 MB wheel.
    """
    filename = wheel_name(FILE_PROJECT, "1.0")
    section(f"warm cached file {filename} (~{args.file_kb} KB), {wrk_description(args)}")
    file_results: dict[str, WrkResult] = {}
    for proxy in proxies:
        url = file_url(proxy, FILE_PROJECT, filename)
        warm_up(proxy, url)
        file_results[proxy.name] = run_wrk(wrk, url, args)
        print(f"{proxy.name:7s} {fmt_wrk(file_results[proxy.name])}   [{url}]")
    _summarize_wrk(summary, "warm file", file_results)


def _summarize_wrk(summary: list[Row], what: str, results: dict[str, WrkResult]) -> None:
    tx, px = results["txpypi"], results["proxpi"]
    print(
        f"ratio txpypi/proxpi: req/s {ratio(tx.rps, px.rps)} (higher is better), "
        f"p50 {ratio(tx.p50_ms, px.p50_ms)}, p99 {ratio(tx.p99_ms, px.p99_ms)} (lower is better)"
    )
    summary += wrk_rows(what, tx, px)


def run_page(ctx: Run) -> list[str]:
    page_section(ctx.args, ctx.wrk_binary, ctx.proxies, ctx.accept, ctx.summary)
    return []


def run_file(ctx: Run) -> list[str]:
    file_section(ctx.args, ctx.wrk_binary, ctx.proxies, ctx.summary)
    return []

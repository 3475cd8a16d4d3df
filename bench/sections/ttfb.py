"""
The C{ttfb} section (step 5): time to first byte of a cold big wheel,
straight from the upstream and through each proxy.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics

from clients import Fetched, fetch
from harness import Service
from proxies import Proxy, file_url
from report import Row, ratio, section, ttfb_verdict
from upstream import BIG_PROJECT, wheel_name

from sections import Run


def ttfb_section(
    args: argparse.Namespace, upstream: Service, proxies: tuple[Proxy, Proxy], summary: list[Row]
) -> None:
    """
    Step 5: time to first byte of a cold big wheel, direct and through each proxy.
    """
    section(f"time to first byte, cold {args.big_mb} MB wheel ({args.ttfb_samples} sample(s), median)")
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
                raise RuntimeError(f"{proxy.name} answered {got.status} or wrong bytes for {filename}")
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
    ttfb_target = ttfb_verdict(ttfb_ms["txpypi"] - d_ms)
    print(f"target: txpypi TTFB on a miss, over the upstream's own: {ttfb_target}")
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
            ttfb_target,
        )
    )


def run(ctx: Run) -> list[str]:
    ttfb_section(ctx.args, ctx.upstream, ctx.proxies, ctx.summary)
    return []

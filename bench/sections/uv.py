"""
The C{uv} section (steps 3 and 4): cold and warm C{uv pip install} of a
small dependency tree through each proxy, and the upstream requests those
installs made.
"""

from __future__ import annotations

import argparse
import re
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import upstream as up
from harness import Service, clean_env
from proxies import Proxy
from report import Row, ratio, section
from upstream import TREE_SHAPE, TREE_VERSIONS, tree, tree_top, wheel_name

from sections import Run


def find_uv() -> list[str]:
    beside = Path(sys.executable).parent / "uv"
    if beside.exists():
        return [str(beside)]
    try:
        from uv import find_uv_bin  # type: ignore[import-not-found]

        return [find_uv_bin()]
    except ImportError:
        pass
    found = shutil.which("uv")
    if found:
        return [found]
    raise SystemExit("error: uv not found (pip install uv)")


@dataclass
class UvRun:
    seconds: float
    counts: dict[str, Any]


def uv_install(uv: list[str], index_url: str, target: Path, upstream: Service, round_: int) -> UvRun:
    up.reset(upstream)
    argv = [
        *uv,
        "pip",
        "install",
        "--no-config",
        "--no-cache",
        "--python",
        sys.executable,
        "--target",
        str(target),
        "--index-url",
        index_url,
        tree_top(round_),
    ]
    env = clean_env(PIP_CONFIG_FILE="/dev/null")
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise RuntimeError(
            f"uv failed ({done.returncode}) against {index_url}:\n{done.stdout}\n{done.stderr}"
        )
    installed = (target / tree_top(round_).replace("-", "_") / "__init__.py").read_text()
    if TREE_VERSIONS[-1] not in installed:
        raise RuntimeError(f"uv installed the wrong {tree_top(round_)}: {installed!r}")
    for project in tree(round_):
        if not (target / project.replace("-", "_") / "__init__.py").exists():
            raise RuntimeError(f"uv did not install {project} into {target}")
    return UvRun(seconds, up.counts(upstream))


@dataclass
class UpstreamTally:
    total: int
    distinct: int
    pages: int
    files: int
    non_get: list[str]
    unexpected: list[str]

    def line(self) -> str:
        text = (
            f"{self.total:3d} requests ({self.distinct} distinct paths): "
            f"{self.pages} pages, {self.files} files; non-GET: {len(self.non_get)}"
        )
        if self.non_get:
            text += f" {self.non_get[:3]}{' ...' if len(self.non_get) > 3 else ''}"
        if self.unexpected:
            text += f"; unexpected paths: {self.unexpected}"
        return text


def tally(counts: dict[str, Any], round_: int) -> UpstreamTally:
    requests: dict[str, int] = counts["requests"]
    latest = TREE_VERSIONS[-1]
    projects = tree(round_)
    # proxpi asks for /simple/<project> without the slash; the fake upstream serves both.
    needed = {f"/simple/{p}" for p in projects}
    needed |= {f"/packages/{wheel_name(p, latest)}" for p in projects}
    needed |= {f"/packages/{wheel_name(p, latest)}.metadata" for p in projects}
    asked = {p.rstrip("/") for p in requests}
    return UpstreamTally(
        total=sum(requests.values()),
        distinct=len(requests),
        pages=sum(n for p, n in requests.items() if p.startswith("/simple/")),
        files=sum(n for p, n in requests.items() if p.startswith("/packages/")),
        non_get=sorted(counts["non_get"]),
        unexpected=sorted(asked - needed),
    )


def uv_section(
    args: argparse.Namespace,
    uv: list[str],
    work: Path,
    upstream: Service,
    proxies: tuple[Proxy, Proxy],
    summary: list[Row],
) -> None:
    """
    Steps 3 and 4: cold and warm uv installs through each proxy, and the
    upstream requests they made.
    """
    n = len(TREE_SHAPE)
    section(
        f"uv pip install tree<round>-top ({n} wheels, {args.uv_rounds} rounds, each a new tree): "
        "cold (empty proxy cache), then warm (new target)"
    )
    runs: dict[str, dict[str, list[UvRun]]] = {p.name: {"cold": [], "warm": []} for p in proxies}
    for round_ in range(args.uv_rounds):
        for proxy in proxies:
            for phase in ("cold", "warm"):
                target = work / f"target-{proxy.name}-{round_}-{phase}"
                runs[proxy.name][phase].append(uv_install(uv, proxy.index, target, upstream, round_))
    uv_ms: dict[tuple[str, str], float] = {}
    for proxy in proxies:
        for phase in ("cold", "warm"):
            times = [r.seconds * 1000 for r in runs[proxy.name][phase]]
            uv_ms[proxy.name, phase] = statistics.median(times)
            each = ", ".join(f"{t:.0f}" for t in times)
            print(f"{proxy.name:7s} {phase}: median {uv_ms[proxy.name, phase]:6.0f} ms   (runs: {each})")
    for phase in ("cold", "warm"):
        tx_ms, px_ms = uv_ms["txpypi", phase], uv_ms["proxpi", phase]
        print(f"ratio txpypi/proxpi {phase}: {ratio(tx_ms, px_ms)} (lower is better)")
        summary.append((f"uv install, {phase}", f"{tx_ms:.0f} ms", f"{px_ms:.0f} ms", ratio(tx_ms, px_ms)))
    requests_section(runs, proxies, summary)


def requests_section(
    runs: dict[str, dict[str, list[UvRun]]], proxies: tuple[Proxy, Proxy], summary: list[Row]
) -> None:
    """
    Step 4: the upstream requests that the installs of C{runs} made.
    """
    n = len(TREE_SHAPE)
    section("upstream requests made by those installs")
    needed = 3 * n
    print(f"needed per install: {needed} distinct ({n} pages + {n} .metadata + {n} wheels)")
    tallies: dict[tuple[str, str], list[UpstreamTally]] = {}
    for proxy in proxies:
        for phase in ("cold", "warm"):
            found = [tally(r.counts, i) for i, r in enumerate(runs[proxy.name][phase])]
            tallies[proxy.name, phase] = found
            lines = {t.line().replace(f"tree{i}-", "tree*-") for i, t in enumerate(found)}
            lines = {re.sub(r"tree\d+_", "tree*_", line) for line in lines}
            for line in sorted(lines):
                print(f"{proxy.name:7s} {phase}: {line}")
            if len(lines) > 1:
                print(f"        (the {len(found)} rounds differed)")
    tx_cold, tx_warm = tallies["txpypi", "cold"], tallies["txpypi", "warm"]
    px_cold, px_warm = tallies["proxpi", "cold"], tallies["proxpi", "warm"]

    def worst(found: list[UpstreamTally], attr: str) -> int:
        return max(getattr(t, attr) if attr != "non_get" else len(t.non_get) for t in found)

    summary.append(
        (
            "upstream reqs, cold install",
            f"{worst(tx_cold, 'total')} ({worst(tx_cold, 'non_get')} HEAD)",
            f"{worst(px_cold, 'total')} ({worst(px_cold, 'non_get')} HEAD)",
            ratio(worst(tx_cold, "total"), worst(px_cold, "total")),
        )
    )
    summary.append(
        (
            "upstream file reqs, warm install",
            str(worst(tx_warm, "files")),
            str(worst(px_warm, "files")),
            "-",
        )
    )
    for t in tx_cold:
        if t.total != needed or t.distinct != needed or t.non_get or t.unexpected:
            print(f"!! a txpypi cold install did not make exactly the {needed} needed upstream requests")
    if worst(tx_warm, "total"):
        print("!! a txpypi warm install made upstream requests")


def run(ctx: Run) -> list[str]:
    """
    First, while both caches are empty.
    """
    uv_section(ctx.args, ctx.uv, ctx.work, ctx.upstream, ctx.proxies, ctx.summary)
    return []

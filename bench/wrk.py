"""
Running wrk (C{--latency}) and reading its req/s, p50 and p99.
"""

from __future__ import annotations

import argparse
import re
import subprocess
from dataclasses import dataclass

from harness import clean_env
from report import Row, ratio

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def _ms(text: str) -> float:
    match = re.fullmatch(r"([\d.]+)(us|ms|s|m|h)", text)
    if match is None:
        raise ValueError(f"cannot parse wrk duration {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


@dataclass
class WrkResult:
    rps: float
    p50_ms: float
    p99_ms: float
    requests: int
    errors: str  # non-2xx/3xx and socket errors, "" when none


def parse_wrk(output: str) -> WrkResult:
    rps = re.search(r"^Requests/sec:\s+([\d.]+)", output, re.M)
    p50 = re.search(r"^\s+50%\s+(\S+)", output, re.M)
    p99 = re.search(r"^\s+99%\s+(\S+)", output, re.M)
    total = re.search(r"^\s+(\d+) requests in", output, re.M)
    if not (rps and p50 and p99 and total):
        raise RuntimeError(f"cannot parse wrk output:\n{output}")
    errors = []
    non2xx = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    if non2xx:
        errors.append(f"{non2xx.group(1)} non-2xx/3xx")
    sock = re.search(r"Socket errors:\s+(.*)", output)
    if sock:
        errors.append(f"socket errors: {sock.group(1).strip()}")
    return WrkResult(
        float(rps.group(1)), _ms(p50.group(1)), _ms(p99.group(1)), int(total.group(1)), "; ".join(errors)
    )


def run_wrk(wrk: str, url: str, args: argparse.Namespace, accept: str | None = None) -> WrkResult:
    argv = [wrk, f"-t{args.threads}", f"-c{args.connections}", f"-d{args.duration}s", "--latency"]
    if accept:
        argv += ["-H", f"Accept: {accept}"]
    argv.append(url)
    done = subprocess.run(argv, capture_output=True, text=True, env=clean_env(), timeout=args.duration + 60)
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return parse_wrk(done.stdout)


def fmt_wrk(r: WrkResult) -> str:
    text = f"{r.rps:10.0f} req/s   p50 {r.p50_ms:8.2f} ms   p99 {r.p99_ms:8.2f} ms   ({r.requests} requests)"
    return text + (f"   !! {r.errors}" if r.errors else "")


def wrk_description(args: argparse.Namespace) -> str:
    return f"wrk -t{args.threads} -c{args.connections} -d{args.duration}s"


def wrk_rows(what: str, left: WrkResult, right: WrkResult, flip: bool = False) -> list[Row]:
    """
    The req/s, p50 and p99 rows of a table with a column for C{left}, one
    for C{right} and their ratio: left/right, or right/left if C{flip}.
    """
    top, bottom = (right, left) if flip else (left, right)
    return [
        (f"{what} req/s", f"{left.rps:.0f}", f"{right.rps:.0f}", ratio(top.rps, bottom.rps)),
        (f"{what} p50", f"{left.p50_ms:.2f} ms", f"{right.p50_ms:.2f} ms", ratio(top.p50_ms, bottom.p50_ms)),
        (f"{what} p99", f"{left.p99_ms:.2f} ms", f"{right.p99_ms:.2f} ms", ratio(top.p99_ms, bottom.p99_ms)),
    ]

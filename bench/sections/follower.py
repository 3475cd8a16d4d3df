"""
The C{follower} section (step 10, issue #6): two instances sharing Redis
and S3, a cold big wheel sent by a paced upstream; the time to first byte
of a client of the instance that does not fetch it (the follower) against
one of the instance that does (the leader).
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import subprocess
import threading
import time

import upstream as up
from clients import Streamed, stream
from harness import REPO, S3_ENV, Service, clean_env, twistd_txpypi
from proxies import Proxy, check_stream, file_url, start_instances
from report import Table, alarm, ratio, section
from upstream import BIG_PROJECT, MB, upstream_file

from sections import Run


def peer_streaming_options() -> set[str]:
    """
    Which of C{--peer-url} and C{--peer-secret-file} (streaming a file that
    another instance is fetching from that instance) this checkout's
    txpypi lists in its C{--help}.
    """
    done = subprocess.run(
        twistd_txpypi("--help"),
        capture_output=True,
        text=True,
        env=clean_env(PYTHONPATH=str(REPO)),
        timeout=60,
    )
    return {option for option in ("--peer-url", "--peer-secret-file") if f"{option}=" in done.stdout}


def leader_then_follower(url_a: str, url_b: str) -> tuple[Streamed, Streamed, float]:
    """
    Client A streams C{url_a} in a thread; the moment it has its first
    byte, client B streams C{url_b}.  Both hash what they read.  Returns
    A's download, B's, and how many seconds after A's request B's started.
    """
    first_byte = threading.Event()
    a_result: list[Streamed] = []
    a_error: list[BaseException] = []

    def client_a() -> None:
        try:
            a_result.append(stream(url_a, digest=True, on_first_byte=first_byte.set))
        except BaseException as e:
            a_error.append(e)
            first_byte.set()

    thread = threading.Thread(target=client_a, name="client-a", daemon=True)
    a_start = time.perf_counter()
    thread.start()
    if not first_byte.wait(60) or a_error:
        raise RuntimeError(f"client A got no first byte from {url_a}: {a_error}")
    b_start = time.perf_counter() - a_start
    b = stream(url_b, digest=True)
    thread.join(120)
    if thread.is_alive() or a_error or not a_result:
        raise RuntimeError(f"client A did not finish {url_a}: {a_error}")
    return a_result[0], b, b_start


def follower_ttfb(ctx: Run) -> list[str]:
    """
    Issue #6: the follower's time to first byte vs the leader's.  Two
    instances share Redis and S3; the upstream sends a cold big wheel at
    C{--follower-rate}.  Client A asks instance 1 (which takes the lock and
    fetches: the leader); the moment A has its first byte, client B asks
    instance 2 (the follower).  Adds its own table and stops the two;
    returns what txpypi did wrong.
    """
    args = ctx.args
    peers = peer_streaming_options()
    leader, follower = start_pair(ctx, peers)
    section(
        f"leader vs follower: two instances sharing Redis and S3; a cold {args.big_mb} MB wheel that the "
        f"upstream sends at {args.follower_rate:g} MB/s ({args.big_mb / args.follower_rate:.1f} s)"
    )
    print(
        "A asks the leader; B asks the follower the moment A has its first byte "
        f"({args.follower_runs} run(s), each on another file)"
    )
    if "--peer-url" in peers:
        print(f"peer streaming: on ({', '.join(sorted(peers))}): the follower may stream from the leader")
    else:
        print(
            "peer streaming: off (this txpypi has no --peer-url): the follower waits until the file is in S3"
        )
    up.set_rate(ctx.upstream, args.follower_rate * MB)
    try:
        pairs, problems = races(ctx.upstream, leader, follower, args.follower_runs)
    finally:
        up.set_rate(ctx.upstream, 0)
    ctx.tables.append(summarize(args, pairs, "--peer-url" in peers))
    ctx.services.stop(leader.service, follower.service)
    return problems


def start_pair(ctx: Run, peers: set[str]) -> tuple[Proxy, Proxy]:
    """
    The leader and the follower: two txpypi sharing Redis and S3, and
    streaming from each other if this txpypi has the options in C{peers}.
    """
    work = ctx.work
    shared = [*ctx.backends.s3("follower/"), "--redis", ctx.backends.redis()]
    if "--peer-url" in peers:
        shared += ["--peer-url", "http://127.0.0.1:{port}"]  # each instance's own URL
    if "--peer-secret-file" in peers:
        secret = work / "peer-secret"
        secret.write_text(secrets.token_hex(16) + "\n")  # 32 characters, the same for both
        shared += ["--peer-secret-file", str(secret)]
    leader, follower = start_instances(
        ctx.services,
        work,
        ctx.upstream,
        {
            "txpypi-leader": [*shared, "--cache-dir", str(work / "leader-spool")],
            "txpypi-follower": [*shared, "--cache-dir", str(work / "follower-spool")],
        },
        env=S3_ENV,
    )
    return leader, follower


#: One run: A's download, B's, and how many seconds after A's request B's started.
Pair = tuple[Streamed, Streamed, float]


def races(upstream: Service, leader: Proxy, follower: Proxy, runs: int) -> tuple[list[Pair], list[str]]:
    """
    C{runs} times, each on another cold big wheel: A asks C{leader}, B
    asks C{follower} once A has its first byte.  Prints each run; returns
    the runs and what txpypi did wrong.
    """
    problems: list[str] = []
    pairs: list[Pair] = []
    for run in range(runs):
        big = upstream_file(upstream, BIG_PROJECT.format(run))
        url_a = file_url(leader, big.project, big.filename)  # warms the pages: only the file is cold
        url_b = file_url(follower, big.project, big.filename)
        up.reset(upstream)
        a, b, b_start = leader_then_follower(url_a, url_b)
        gets, others = up.upstream_gets(upstream, big.path)
        what = f"run {run + 1}"
        problems += alarm(check_stream(f"leader (A), {what}", a, big, "MISS"))
        problems += alarm(check_stream(f"follower (B), {what}", b, big))
        if (gets, others) != (1, 0):
            problems += alarm(
                [f"{what}: the upstream answered {gets} GET(s), {others} other(s) for the file"]
            )
        pad = " " * len(what)
        print(
            f"{what}: A (leader):   TTFB {a.ttfb * 1000:8.2f} ms, done in {a.total:5.2f} s, "
            f"X-Cache {a.headers.get('x-cache')}\n"
            f"{pad}  B (follower): TTFB {b.ttfb * 1000:8.2f} ms, done in {b.total:5.2f} s, "
            f"X-Cache {b.headers.get('x-cache')}\n"
            f"{pad}  B asked {b_start * 1000:.1f} ms after A, done {b_start + b.total - a.total:+.2f} s "
            f"after A; the upstream answered {gets} GET(s) for the file",
            flush=True,
        )
        pairs.append((a, b, b_start))
    return pairs, problems


def summarize(args: argparse.Namespace, pairs: list[Pair], peer_streaming: bool) -> Table:
    """
    Print the medians of C{pairs}; the section's summary table.
    """
    a_ttfb = statistics.median(a.ttfb for a, _, _ in pairs) * 1000
    b_ttfb = statistics.median(b.ttfb for _, b, _ in pairs) * 1000
    a_total = statistics.median(a.total for a, _, _ in pairs)
    b_total = statistics.median(b.total for _, b, _ in pairs)
    lag = statistics.median(start + b.total - a.total for a, b, start in pairs)
    print(
        f"median: A TTFB {a_ttfb:.2f} ms, B TTFB {b_ttfb:.2f} ms ({ratio(b_ttfb, a_ttfb)}); "
        f"A {a_total:.2f} s, B {b_total:.2f} s; B done {lag:+.2f} s after A"
    )
    return Table(
        f"summary: leader vs follower, cold {args.big_mb} MB wheel at {args.follower_rate:g} MB/s, "
        f"peer streaming {'on' if peer_streaming else 'off (no --peer-url)'}",
        ("measure", "leader (A)", "follower (B)", "B/A", ""),
        [
            ("TTFB (from each one's request)", f"{a_ttfb:.2f} ms", f"{b_ttfb:.2f} ms", ratio(b_ttfb, a_ttfb)),
            (
                "whole file (from each one's request)",
                f"{a_total:.2f} s",
                f"{b_total:.2f} s",
                ratio(b_total, a_total),
            ),
            (
                "done, after A's request",
                f"{a_total:.2f} s",
                f"{a_total + lag:.2f} s",
                ratio(a_total + lag, a_total),
            ),
        ],
        "(B asks the moment A has its first byte; medians of the runs)",
    )


run = follower_ttfb

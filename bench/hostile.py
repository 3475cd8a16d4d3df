"""
A hostile mix, bounded in count and time: does anything a client does pile
up in the proxy?

    python bench/hostile.py                 # 5 rounds, about a minute
    python bench/hostile.py --rounds 3 --per-round 100

Starts the fake upstream of C{bench.py} and txpypi (a real C{twistd}), and,
when it is installed, proxpi (C{pip install '.[bench]'}), then runs the same
mix against each, round after round:

  - conditional GETs of a cached file that its ETag matches (C{304});
  - malformed ranges (a superscript digit, junk, an empty suffix);
  - index pages of made-up projects, half of them new each round and half
    asked again;
  - clients that ask for a big file and never read a byte;
  - clients that read the start of the big file and hang up;
  - GETs that declare a 10^12-byte body;
  - connections that send nothing at all.

After each round it waits for the proxy to let go of the clients that never
read (txpypi runs with C{--send-timeout 2}), then prints the proxy's open
descriptors, its RSS and the upstream requests so far.  Flat is the aim:
descriptors back where they were, RSS flat once the first rounds warmed
the process up, every request answered,
and no upstream request for a name asked before, nor for the big file after
its one download.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import socket
import string
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import upstream as up
from clients import expect_200
from harness import Service, free_ports, session, start_proxpi, start_txpypi
from report import section, verdict
from sampling import process_tree, rss_mib

SEND_TIMEOUT = 2.0
BIG = up.BIG_PROJECT.format(0)


@dataclass
class Target:
    """
    A proxy under the mix: where its pages and files are.
    """

    name: str
    service: Service
    page: Callable[[str], str]  # project -> path of its index page
    file_path: str  # the big file's path
    small_path: str  # a small cached file's path

    @property
    def pid(self) -> int:
        return self.service.process.pid


def descriptors(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def request(port: int, raw: bytes, read: int | None = None, timeout: float = 3.0) -> bytes:
    """
    Send C{raw} on a fresh connection; read the answer (all of it, or
    C{read} bytes and hang up).
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(raw)
        got = b""
        while read is None or len(got) < read:
            try:
                chunk = s.recv(65536)
            except (ConnectionResetError, TimeoutError):
                break
            if not chunk:
                break
            got += chunk
        return got


def get(path: str, *headers: str) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: 127.0.0.1", "Connection: close", *headers, "", ""]
    return "\r\n".join(lines).encode("utf-8")  # a header may hold any bytes


def status(answer: bytes) -> int:
    try:
        return int(answer.split(b" ", 2)[1])
    except (IndexError, ValueError):
        return 0


@dataclass
class Round:
    descriptors: int
    rss: float
    upstream_pages: int
    upstream_files: int
    statuses: dict[str, dict[int, int]]
    seconds: float


def upstream_counts(upstream: Service) -> tuple[int, int]:
    requests = up.counts(upstream)["requests"]
    pages = sum(n for path, n in requests.items() if path.startswith("/simple/"))
    files = sum(n for path, n in requests.items() if path.startswith("/packages/"))
    return pages, files


def mix(
    target: Target, round_: int, per_round: int, names: list[str], etag: str, budget: float
) -> dict[str, dict[int, int]]:
    """
    One round of the mix, with a few threads, for at most C{budget} seconds
    (what is left then is counted as status C{-1}, not sent); the status
    codes seen, by kind (C{0}: no answer in 3 s, or the connection refused).
    """
    port = target.service.port
    seen: dict[str, dict[int, int]] = {}
    lock = threading.Lock()
    held: list[socket.socket] = []

    def count(kind: str, code: int) -> None:
        with lock:
            seen.setdefault(kind, {})
            seen[kind][code] = seen[kind].get(code, 0) + 1

    def conditional() -> None:
        count("304", status(request(port, get(target.small_path, f"If-None-Match: {etag}"))))

    def bad_range() -> None:
        value = random.choice(["bytes=²-", "bytes=x-y", "bytes=-0", "bytes=٣-5", "bytes=5-2,junk"])
        count("range", status(request(port, get(target.small_path, f"Range: {value}"))))

    def made_up(i: int) -> None:
        count("names", status(request(port, get(target.page(names[i % len(names)])))))

    def never_reads() -> None:
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(get(target.file_path))
        with lock:
            held.append(s)

    def hangs_up() -> None:
        count("hang-up", status(request(port, get(target.file_path), read=64 * 1024)))

    def huge_body() -> None:
        count("body", status(request(port, get(target.small_path, "Content-Length: 1000000000000"))))

    def silent() -> None:
        s = socket.create_connection(("127.0.0.1", port))
        with lock:
            held.append(s)

    jobs: list[Callable[[], None]] = []
    for i in range(per_round):
        jobs += [conditional, bad_range, lambda i=i: made_up(i)]  # type: ignore[misc]
    for _ in range(max(1, per_round // 10)):
        jobs += [never_reads, hangs_up, huge_body, silent]
    random.Random(round_).shuffle(jobs)

    stop_at = time.monotonic() + budget

    def worker(part: list[Callable[[], None]]) -> None:
        for job in part:
            if time.monotonic() > stop_at:
                count("not sent", -1)
                continue
            try:
                job()
            except OSError:
                count("refused", 0)

    threads = [threading.Thread(target=worker, args=(jobs[i::8],)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # The clients that never read nor send: wait for the proxy to let them
    # go (a closed connection reads as b"" or a reset), at most a few times
    # its timeout, then close what is left ourselves.
    deadline = time.monotonic() + 5 * SEND_TIMEOUT + 5
    for s in held:
        closed = False
        try:
            while time.monotonic() < deadline:
                s.settimeout(max(0.1, deadline - time.monotonic()))
                if not s.recv(65536):
                    closed = True
                    break
        except ConnectionResetError:
            closed = True
        except OSError:
            pass
        count("held", 1 if closed else 0)  # 1: the proxy let it go; 0: still open at the deadline
        s.close()
    return seen


def run(
    target: Target, upstream: Service, rounds: int, per_round: int, pids: list[int], budget: float
) -> list[Round]:
    small = expect_200(f"{target.service.base}{target.small_path}")
    etag = small.headers.get("etag") or '"none"'
    seed = random.Random(7)

    def made_up_name() -> str:
        return "zz-" + "".join(seed.choices(string.ascii_lowercase, k=12))

    asked = [made_up_name() for _ in range(per_round // 2)]
    results = []
    for round_ in range(rounds):
        names = asked + [made_up_name() for _ in range(per_round - len(asked))]
        started = time.monotonic()
        statuses = mix(target, round_, per_round, names, etag, budget)
        took = time.monotonic() - started
        time.sleep(0.5)  # the proxy's own last closes; a measurement, not a race
        pages, files = upstream_counts(upstream)
        results.append(Round(descriptors(target.pid), rss_mib(pids), pages, files, statuses, took))
        r = results[-1]
        print(
            f"  round {round_ + 1}: {r.descriptors:4d} fds  {r.rss:6.1f} MiB  "
            f"upstream pages {r.upstream_pages:5d}  files {r.upstream_files:3d}  ({took:.1f} s)",
            flush=True,
        )
        print(f"           statuses: {json.dumps(r.statuses, sort_keys=True)}", flush=True)
    return results


def verdicts(name: str, results: list[Round], per_round: int) -> list[str]:
    first, middle, last = results[0], results[len(results) // 2], results[-1]
    counts = [
        (code, n)
        for r in results
        for kind, codes in r.statuses.items()
        if kind != "held"
        for code, n in codes.items()
    ]
    answered = sum(n for code, n in counts if code > 0)
    unsent = sum(n for code, n in counts if code < 0)
    total = sum(n for _, n in counts)
    lines = [
        verdict(
            "descriptors flat",
            f"{first.descriptors} -> {last.descriptors}",
            last.descriptors <= first.descriptors + 5,
        ),
        verdict(
            "RSS flat once warm (the second half of the rounds: <= +2 MiB)",
            f"{first.rss:.1f}, then {middle.rss:.1f} -> {last.rss:.1f} MiB",
            last.rss <= middle.rss + 2,
        ),
        verdict(
            "every request answered",
            f"{answered} of {total} ({unsent} not sent within the budget)",
            answered == total,
        ),
        verdict(
            "big file fetched once",
            f"{last.upstream_files} upstream file requests",
            last.upstream_files <= first.upstream_files,
        ),
    ]
    new_per_round = per_round - per_round // 2
    grown = last.upstream_pages - first.upstream_pages
    lines.append(
        verdict(
            "names asked before are not asked again",
            f"+{grown} upstream pages over {len(results) - 1} rounds of {new_per_round} new names",
            grown <= new_per_round * (len(results) - 1),
        )
    )
    return [f"{name}: {line}" for line in lines]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=200, help="conditional GETs, bad ranges and names")
    parser.add_argument("--big-mb", type=int, default=20)
    parser.add_argument("--round-seconds", type=float, default=30.0, help="the most a round may take")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args(argv)
    summary: list[str] = []
    with session(args.keep) as (work, services):
        up_port, tx_port, px_port = free_ports(3)
        upstream = up.start_upstream(
            services,
            work,
            up_port,
            *up.sizes(file_kb=100, big_mb=args.big_mb, big_files=1, uv_rounds=0, huge_mb=1, huge_files=0),
        )
        (work / "admin-token").write_text("x" * 32 + "\n")
        txpypi = start_txpypi(
            services,
            work,
            "txpypi",
            tx_port,
            upstream,
            "--cache-dir",
            str(work / "txpypi-cache"),
            "--send-timeout",
            str(SEND_TIMEOUT),
            "--log-format",
            "none",
        )
        for service in (upstream, txpypi):
            services.wait_ready(service)
        small_file = up.wheel_name(up.FILE_PROJECT, "1.0")
        big_file = up.wheel_name(BIG, "1.0")
        targets = [
            Target(
                "txpypi",
                txpypi,
                lambda p: f"/simple/{p}/",
                f"/files/{BIG}/{big_file}",
                f"/files/{up.FILE_PROJECT}/{small_file}",
            )
        ]
        try:
            import proxpi  # noqa: F401
        except ImportError:
            print("(proxpi is not installed: txpypi alone)")
        else:
            proxpi_service = start_proxpi(services, work, px_port, upstream)
            services.wait_ready(proxpi_service)
            targets.append(
                Target(
                    "proxpi",
                    proxpi_service,
                    lambda p: f"/index/{p}/",
                    f"/index/{BIG}/{big_file}",
                    f"/index/{up.FILE_PROJECT}/{small_file}",
                )
            )
        for target in targets:
            section(f"{target.name}: {args.rounds} rounds of the hostile mix")
            expect_200(f"{target.service.base}{target.small_path}")
            expect_200(f"{target.service.base}{target.small_path}")
            pids = process_tree(target.pid)
            print(
                f"  before: {descriptors(target.pid):4d} fds  {rss_mib(pids):6.1f} MiB",
                flush=True,
            )
            results = run(target, upstream, args.rounds, args.per_round, pids, args.round_seconds)
            summary += verdicts(target.name, results, args.per_round)
            up.reset(upstream)
    section("verdicts")
    for line in summary:
        print("  " + line)
    return 0


if __name__ == "__main__":
    sys.exit(main())

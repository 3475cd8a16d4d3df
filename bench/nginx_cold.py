"""
Cold download of one large wheel on unthrottled loopback: direct from the
upstream, through nginx's proxy_cache (the generic baseline; it neither
hashes nor checks the file), and through txpypi, in the same run.

    python bench/nginx_cold.py [--runs 3] [--mb 200]

Needs nginx and curl.  Prints each run and the medians, with the ratios to
the direct download.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path

from harness import REPO, free_ports
from upstream import JSON_ACCEPT as JSON
from upstream import SCRIPT


def free_port() -> int:
    return free_ports(1)[0]


def wait(url: str, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            urllib.request.urlopen(url, timeout=2).read()
            return
        except OSError:
            time.sleep(0.2)  # polling a starting server
    raise SystemExit(f"not up: {url}")


def curl(url: str) -> float:
    started = time.perf_counter()
    subprocess.run(["curl", "-sSf", "-o", "/dev/null", url], check=True)
    return time.perf_counter() - started


NGINX = """daemon off; user root; worker_processes 1; pid {work}/nginx.pid; error_log {work}/error.log;
events {{ worker_connections 64; }}
http {{
  access_log off;
  proxy_cache_path {work}/cache levels=1:2 keys_zone=c:10m max_size=4g inactive=1d use_temp_path=off;
  server {{
    listen 127.0.0.1:{port};
    location / {{ proxy_pass http://127.0.0.1:{upstream}; proxy_cache c; proxy_cache_valid 200 1d; }}
  }}
}}
"""


def cold_through(start: Callable[[str, int], subprocess.Popen[bytes]], ready: str, path: str) -> float:
    """
    Start a proxy with C{start(work, port)} (a temporary directory and a
    free port of its own), wait until C{ready} answers, then time a curl
    of C{path} through it; the proxy is stopped and its directory removed.
    """
    work, port = tempfile.mkdtemp(), free_port()
    proxy = start(work, port)
    try:
        wait(f"http://127.0.0.1:{port}{ready}")
        return curl(f"http://127.0.0.1:{port}{path}")
    finally:
        proxy.terminate()
        proxy.wait()
        shutil.rmtree(work, ignore_errors=True)


def through_nginx(upstream: int, path: str) -> float:
    def start(work: str, port: int) -> subprocess.Popen[bytes]:
        Path(work, "nginx.conf").write_text(NGINX.format(work=work, port=port, upstream=upstream))
        return subprocess.Popen(["nginx", "-c", f"{work}/nginx.conf", "-p", work])

    return cold_through(start, "/simple/", path)


def through_txpypi(upstream: int, project: str, filename: str) -> float:
    def start(work: str, port: int) -> subprocess.Popen[bytes]:
        argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()", "-n", "--pidfile="]
        argv += ["--logfile=/dev/null", "txpypi", "--listen", f"tcp:{port}:interface=127.0.0.1"]
        argv += ["--upstream", f"http://127.0.0.1:{upstream}/simple/", "--cache-dir", work]
        argv += ["--log-format", "none"]
        return subprocess.Popen(argv, env=dict(os.environ, PYTHONPATH=str(REPO)))

    return cold_through(start, f"/simple/{project}/", f"/files/{project}/{filename}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--mb", type=int, default=200)
    args = parser.parse_args()
    upstream = free_port()
    argv = [sys.executable, str(SCRIPT), "--serve-upstream", str(upstream)]
    argv += ["--huge-mb", str(args.mb), "--upstream-huge-files", "1", "--uv-rounds", "0"]
    server = subprocess.Popen(argv, env=dict(os.environ, PYTHONPATH=str(REPO)), stdout=subprocess.DEVNULL)
    try:
        wait(f"http://127.0.0.1:{upstream}/simple/")
        index = f"http://127.0.0.1:{upstream}/simple/huge-0/"
        request = urllib.request.Request(index, headers={"Accept": JSON})
        page = json.loads(urllib.request.urlopen(request).read())
        filename = next(f["filename"] for f in page["files"] if f["filename"].endswith(".whl"))
        path = f"/packages/{filename}"
        curl(f"http://127.0.0.1:{upstream}{path}")  # warm the upstream's own page cache
        runs: list[tuple[float, float, float]] = []
        for i in range(args.runs):
            direct = curl(f"http://127.0.0.1:{upstream}{path}")
            nginx = through_nginx(upstream, path)
            txpypi = through_txpypi(upstream, "huge-0", filename)
            runs.append((direct, nginx, txpypi))
            print(
                f"run {i}: direct {direct:.3f} s, "
                f"nginx proxy_cache cold {nginx:.3f} s ({nginx / direct:.2f}x), "
                f"txpypi cold {txpypi:.3f} s ({txpypi / direct:.2f}x)",
                flush=True,
            )
        direct, nginx, txpypi = (sorted(column)[len(column) // 2] for column in zip(*runs, strict=True))
        print(
            f"median of {args.runs}: direct {direct:.3f} s; nginx {nginx:.3f} s ({nginx / direct:.2f}x); "
            f"txpypi {txpypi:.3f} s ({txpypi / direct:.2f}x, {txpypi / nginx:.2f}x nginx's time)"
        )
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()

"""
systemd: the units pass systemd-analyze, and twistd serves an install on a
listening socket it inherits the way systemd hands it over (LISTEN_FDS).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest_twisted

from tests.conftest import ROOT, TLS, Served
from tests.e2e.test_install import assert_imports, uv_install
from tests.processes import socket_activated


def test_units_pass_systemd_analyze(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze is not None, "systemd-analyze is needed (Debian package systemd)"
    twistd = Path(sys.executable).with_name("twistd")
    assert twistd.exists()
    for unit in ("txpypi.service", "txpypi.socket"):
        text = (ROOT / "etc" / unit).read_text()
        (tmp_path / unit).write_text(text.replace("/opt/txpypi/bin/twistd", str(twistd)))
    result = subprocess.run(
        [analyze, "verify", str(tmp_path / "txpypi.socket"), str(tmp_path / "txpypi.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stdout + result.stderr


@pytest_twisted.ensureDeferred
async def test_socket_activation(json_upstream: Served, tmp_path: Path, tls: TLS) -> None:
    """
    The listening socket is made here and passed as fd 3 with LISTEN_FDS=1,
    LISTEN_FDNAMES and LISTEN_PID set to the child's own pid (the shell
    execs twistd), as systemd does; txpypi listens on nothing else.
    """
    args = ["--upstream", json_upstream.url, "--cache-dir", str(tmp_path / "cache")]
    process, port = socket_activated([*args, "--listen", "systemd:domain=INET:index=0"], tmp_path)
    try:
        await process.listening
        await uv_install(f"http://127.0.0.1:{port}/simple/", tls, tmp_path / "t", "alpha")
        await assert_imports(tmp_path / "t")
    finally:
        await process.stop()

"""
systemd: the units pass systemd-analyze, and twistd serves an install on a
listening socket it inherits the way systemd hands it over (LISTEN_FDS).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest_twisted
from twisted.internet import protocol
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from tests.conftest import ROOT, TLS, Served, clean_env, get_reactor
from tests.e2e.test_install import assert_imports, uv_install


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


class _Watch(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.output = b""
        self.ready: Deferred[None] = Deferred()
        self.ended: Deferred[None] = Deferred()

    def outReceived(self, data: bytes) -> None:
        self.output += data
        if b"starting on" in self.output and not self.ready.called:
            self.ready.callback(None)

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        if not self.ready.called:
            self.ready.errback(RuntimeError(self.output.decode("utf-8", "replace")))
        self.ended.callback(None)


@pytest_twisted.ensureDeferred
async def test_socket_activation(json_upstream: Served, tmp_path: Path, tls: TLS) -> None:
    """
    The listening socket is made here and passed as fd 3 with LISTEN_FDS=1,
    LISTEN_FDNAMES and LISTEN_PID set to the child's own pid (the shell
    execs twistd), as systemd does; txpypi listens on nothing else.
    """
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    port = listener.getsockname()[1]
    command = (
        "export LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=txpypi.socket; "
        f"exec {sys.executable} -c 'from twisted.scripts.twistd import run; run()'"
        f" --nodaemon --pidfile= --logfile=- txpypi --upstream {json_upstream.url}"
        f" --cache-dir {tmp_path / 'cache'} --listen systemd:domain=INET:index=0"
    )
    watch = _Watch()
    transport = get_reactor().spawnProcess(
        watch,
        "/bin/sh",
        ["/bin/sh", "-c", command],
        env=clean_env(PYTHONPATH=str(ROOT)),
        path=str(tmp_path),
        childFDs={0: "w", 1: "r", 2: "r", 3: listener.fileno()},
    )
    listener.close()  # the child holds it now
    try:
        await watch.ready
        await uv_install(f"http://127.0.0.1:{port}/simple/", tls, tmp_path / "t", "alpha")
        await assert_imports(tmp_path / "t")
    finally:
        if not watch.ended.called:
            transport.signalProcess("TERM")
        await watch.ended

"""
A real C{twistd -n txpypi} process for tests: started with the checkout on
its path, watched through its log, stopped with SIGTERM and then SIGKILL.
"""

from __future__ import annotations

import re
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from twisted.internet import protocol
from twisted.internet.defer import Deferred
from twisted.python.failure import Failure

from tests.conftest import ROOT, clean_env, get_reactor


class Twistd(protocol.ProcessProtocol):
    """
    Runs C{twistd -n txpypi ARGS} and fires Deferreds on what its log says.
    """

    def __init__(self) -> None:
        self.output = b""
        self.listening: Deferred[int] = Deferred()
        self.ended: Deferred[None] = Deferred()
        self._patterns: list[tuple[re.Pattern[bytes], Deferred[re.Match[bytes]]]] = []
        self.transport_: Any = None

    @classmethod
    def start(cls, args: list[str], cwd: Path) -> Twistd:
        watcher = cls()
        argv = [sys.executable, "-c", "from twisted.scripts.twistd import run; run()"]
        argv += ["--nodaemon", "--pidfile=", "--logfile=-", "txpypi", *args]
        env = clean_env(PYTHONPATH=str(ROOT))
        watcher.transport_ = get_reactor().spawnProcess(watcher, sys.executable, argv, env=env, path=str(cwd))
        return watcher

    def wait_for(self, pattern: bytes) -> Deferred[re.Match[bytes]]:
        """
        Fire with the first match of C{pattern} in the log (past or future).
        """
        d: Deferred[re.Match[bytes]] = Deferred()
        self._patterns.append((re.compile(pattern), d))
        self._check()
        return d

    def _check(self) -> None:
        match = re.search(rb"Site (?:\(TLS\) )?starting on (\d+)", self.output)
        if match and not self.listening.called:
            self.listening.callback(int(match.group(1)))
        for pattern, d in list(self._patterns):
            found = pattern.search(self.output)
            if found:
                self._patterns.remove((pattern, d))
                d.callback(found)

    def outReceived(self, data: bytes) -> None:
        self.output += data
        self._check()

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        error = RuntimeError("twistd ended:\n" + self.output.decode("utf-8", "replace"))
        if not self.listening.called:
            self.listening.errback(error)
        for _, d in self._patterns:
            d.errback(error)
        self._patterns = []
        self.ended.callback(None)

    def tail(self, size: int = 6000) -> str:
        """
        The end of the log, for a failure message.
        """
        text = self.output.decode("utf-8", "replace")
        return text if len(text) <= size else "[...]\n" + text[-size:]

    def kill(self) -> Deferred[None]:
        """
        SIGKILL: no chance to clean up.
        """
        if not self.ended.called:
            self.transport_.signalProcess("KILL")
        return self.ended

    def stop(self, timeout: float = 15) -> Deferred[None]:
        """
        SIGTERM, then SIGKILL after C{timeout} seconds.
        """
        if not self.ended.called:
            self.transport_.signalProcess(signal.SIGTERM)
            timer = get_reactor().callLater(timeout, self.kill)
            self.ended.addBoth(lambda r: timer.active() and timer.cancel() or r)
        return self.ended


def first_to_log(processes: Sequence[Twistd], pattern: bytes) -> Deferred[Twistd]:
    """
    Fire with the first of C{processes} whose log matches C{pattern} (past or
    future); fail if they all end without it.
    """
    first: Deferred[Twistd] = Deferred()
    ended: list[Failure] = []

    def matched(_: object, process: Twistd) -> None:
        if not first.called:
            first.callback(process)

    def failed(reason: Failure) -> None:
        ended.append(reason)
        if len(ended) == len(processes) and not first.called:
            first.errback(reason)

    for process in processes:
        process.wait_for(pattern).addCallbacks(matched, failed, callbackArgs=(process,))
    return first


def logs(processes: Sequence[Twistd], size: int = 6000) -> str:
    """
    The end of each process's log, numbered from 1, for a failure message.
    """
    return "\n".join(f"--- instance {n} ---\n{p.tail(size)}" for n, p in enumerate(processes, 1))


def socket_activated(args: list[str], cwd: Path) -> tuple[Twistd, int]:
    """
    C{twistd -n txpypi ARGS} on a listening socket made here and handed
    over as systemd does: fd 3, C{LISTEN_FDS=1}, C{LISTEN_FDNAMES}, and
    C{LISTEN_PID} the child's own pid (the shell execs twistd).  Returns
    the process and the socket's port.
    """
    import shlex
    import socket

    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    port = listener.getsockname()[1]
    command = (
        "export LISTEN_PID=$$ LISTEN_FDS=1 LISTEN_FDNAMES=txpypi.socket; "
        f"exec {sys.executable} -c 'from twisted.scripts.twistd import run; run()'"
        " --nodaemon --pidfile= --logfile=- txpypi " + " ".join(map(shlex.quote, args))
    )
    process = Twistd()
    process.transport_ = get_reactor().spawnProcess(
        process,
        "/bin/sh",
        ["/bin/sh", "-c", command],
        env=clean_env(PYTHONPATH=str(ROOT)),
        path=str(cwd),
        childFDs={0: "w", 1: "r", 2: "r", 3: listener.fileno()},
    )
    listener.close()  # the child holds it now
    return process, port

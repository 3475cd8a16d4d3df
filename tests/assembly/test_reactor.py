"""
L{txpypi.reactor}: the epoll reactor without a log context per event.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from twisted.internet.error import ConnectionDone
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure

from tests.conftest import clean_env
from txpypi.reactor import QuickEPollReactor


class _Reader:
    """
    One end of a socket pair, read by the reactor.
    """

    def __init__(self, sock: socket.socket, fail_with: Exception | None = None) -> None:
        self.sock = sock
        self.read: list[bytes] = []
        self.lost: list[Failure] = []
        self.fail_with = fail_with
        self.lose_fails = False
        self.prefixes = 0

    def fileno(self) -> int:
        return self.sock.fileno()

    def logPrefix(self) -> str:
        self.prefixes += 1
        return "reader"

    def doRead(self) -> Any:
        data = self.sock.recv(100)
        if self.fail_with is not None:
            raise self.fail_with
        self.read.append(data)
        return None

    def connectionLost(self, reason: Failure) -> None:
        self.lost.append(reason)
        if self.lose_fails:
            raise RuntimeError("connectionLost failed too")


@pytest.fixture
def reactor() -> Iterator[QuickEPollReactor]:
    made = QuickEPollReactor()
    yield made
    made.removeAll()
    made._poller.close()
    made.waker.connectionLost(Failure(ConnectionDone()))


def pair() -> tuple[socket.socket, socket.socket]:
    a, b = socket.socketpair()
    a.setblocking(False)
    return a, b


def test_it_hands_each_ready_descriptor_to_its_selectable(reactor: QuickEPollReactor) -> None:
    """
    Bytes on a socket reach its reader's C{doRead}, without the reactor
    asking the reader for a log prefix.
    """
    a, b = pair()
    with a, b:
        reader = _Reader(a)
        reactor.addReader(reader)  # type: ignore[arg-type]
        b.send(b"hello")
        reactor.doIteration(1)
        assert reader.read == [b"hello"] and reader.prefixes == 0
        reactor.doIteration(0)  # nothing more: no read
        assert reader.read == [b"hello"]
        reactor.removeReader(reader)  # type: ignore[arg-type]


def test_a_failing_reader_is_dropped_and_the_others_still_read(reactor: QuickEPollReactor) -> None:
    """
    A C{doRead} that raises loses its connection (as Twisted's reactor
    does); one whose C{connectionLost} raises too is logged; either way the
    other ready readers of the same poll still read.
    """
    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)
    pairs = [pair() for _ in range(3)]
    try:
        failing = _Reader(pairs[0][0], RuntimeError("doRead failed"))
        failing_twice = _Reader(pairs[1][0], RuntimeError("doRead failed"))
        failing_twice.lose_fails = True
        fine = _Reader(pairs[2][0])
        for reader in (failing, failing_twice, fine):
            reactor.addReader(reader)  # type: ignore[arg-type]
        for _, other in pairs:
            other.send(b"x")
        reactor.doIteration(1)
        assert fine.read == [b"x"]
        assert len(failing.lost) == 1 and failing.lost[0].check(RuntimeError)
        assert len(failing_twice.lost) == 1
        assert failing not in reactor.getReaders() and fine in reactor.getReaders()
        escaped = [e for e in events if e.get("log_namespace") == "txpypi.reactor"]
        assert len(escaped) == 1 and escaped[0]["log_failure"].check(RuntimeError)
        assert "connectionLost failed too" in str(escaped[0]["log_failure"].value)
    finally:
        globalLogPublisher.removeObserver(events.append)
        reactor.removeAll()
        for a, b in pairs:
            a.close()
            b.close()


def _python(code: str) -> str:
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env=clean_env(),
        cwd=os.getcwd(),
    )
    return out.stdout.strip()


def test_install_chooses_it_unless_a_reactor_is_there() -> None:
    """
    L{install} installs it in a process with no reactor yet, and leaves a
    reactor already installed alone.
    """
    shown = "from twisted.internet import reactor; print(type(reactor).__name__)"
    assert _python(f"from txpypi.reactor import install; print(install()); {shown}") == (
        "True\nQuickEPollReactor"
    )
    first = "from twisted.internet import pollreactor; pollreactor.install(); "
    assert _python(f"{first}from txpypi.reactor import install; print(install()); {shown}") == (
        "False\nPollReactor"
    )

"""
The parts of C{--workers} that need no processes: the option, the sockets
the parent makes from endpoint strings, the role handed to a worker, and
the metrics of several workers summed into one proxy's.
"""

from __future__ import annotations

import os
import signal
import socket
import stat
from pathlib import Path
from typing import Any

import pytest
from twisted.internet.error import ProcessDone, ProcessTerminated
from twisted.internet.task import Clock
from twisted.python.failure import Failure

from tests.conftest import TLS
from txpypi import options
from txpypi.config import ConfigError
from txpypi.web.metrics import Metrics, merge
from txpypi.workers import ROLE_ENV, STEADY, Inherited, Role, Supervisor, make_socket


def test_workers_option() -> None:
    assert options.read(None, {}, {}).workers == 1
    assert options.read(None, {"workers": "3"}, {}).workers == 3
    assert options.read(None, {"workers": "auto"}, {}).workers == len(os.sched_getaffinity(0))
    for bad in ("0", "65", "two"):
        with pytest.raises(ConfigError, match="workers"):
            options.read(None, {"workers": bad}, {})


def test_the_parent_makes_listening_sockets_from_endpoint_strings(tmp_path: Path, tls: TLS) -> None:
    """
    tcp, ssl (its certificate read, and the worker told to speak TLS) and
    unix endpoints give a listening, non-blocking socket; a port in use or
    a missing key is an C{OSError}, an unknown endpoint a C{ValueError}.
    """
    made = []
    try:
        tcp, sock = make_socket("tcp:0:interface=127.0.0.1")
        made.append(sock)
        assert not tcp.tls and tcp.family == socket.AF_INET and not sock.getblocking()
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
        port = sock.getsockname()[1]
        with pytest.raises(OSError):
            make_socket(f"tcp:{port}:interface=127.0.0.1")
        secure, sock = make_socket(tls.endpoint(0))
        made.append(sock)
        assert secure.tls and secure.description == tls.endpoint(0)
        path = tmp_path / "txpypi.sock"
        unix, sock = make_socket(f"unix:{path}:mode=600")
        made.append(sock)
        assert unix.family == socket.AF_UNIX and stat.S_IMODE(path.stat().st_mode) == 0o600
        with pytest.raises(OSError):
            make_socket(f"ssl:0:privateKey={tmp_path / 'missing.pem'}")
        with pytest.raises(ValueError):
            make_socket("nonsense:80")
    finally:
        for sock in made:
            sock.close()


def test_a_role_goes_through_the_environment_whole() -> None:
    role = Role(
        index=1,
        count=2,
        listen=(Inherited(5, socket.AF_INET, "tcp:5000", False),),
        own=Inherited(7, socket.AF_INET, "tcp:0:interface=127.0.0.1"),
        peer_urls=("http://127.0.0.1:1/", "http://127.0.0.1:2/"),
        secret="s" * 32,
        config="/etc/txpypi.yaml",
        given={"listen": ["tcp:5000"], "offline": True},
        parent=42,
    )
    assert Role.load(role.dump()) == role
    assert role.peer_url == "http://127.0.0.1:2/" and role.siblings == ("http://127.0.0.1:1/",)
    assert "s" * 32 not in repr(role)


def test_the_metrics_of_workers_are_summed_but_what_they_share() -> None:
    """
    Counters and histograms add up; the gauges of the one cache and stores
    do not.
    """
    texts = []
    for n in (1, 2):
        metrics = Metrics.create()
        for _ in range(n):
            metrics.finished.count("file", "200", 0.001 * n)
        metrics.store_up.labels("files").set(n - 1)  # down in the first
        metrics.watch(lambda n=n: {"txpypi_cache_bytes": 1000.0, "txpypi_downloads_in_flight": float(n)})  # type: ignore[misc]
        texts.append(metrics.render())
    merged = merge(texts, answering=2).decode()
    assert 'txpypi_requests_total{code="200",route="file"} 3.0' in merged
    assert 'txpypi_request_duration_seconds_count{route="file"} 3.0' in merged
    assert 'txpypi_request_duration_seconds_bucket{le="0.001",route="file"} 1.0' in merged
    assert 'txpypi_request_duration_seconds_bucket{le="0.0025",route="file"} 3.0' in merged
    assert "txpypi_cache_bytes 1000.0" in merged
    assert "txpypi_downloads_in_flight 3.0" in merged
    assert 'txpypi_store_up{store="files"} 0.0' in merged
    assert "txpypi_workers_answering 2.0" in merged
    assert merged.count("# TYPE txpypi_requests_total counter") == 1


class _Transport:
    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.signals: list[int | str] = []

    def signalProcess(self, signum: int | str) -> None:
        self.signals.append(signum)


class _Processes:
    """
    Stands in for the reactor's spawnProcess: records each worker started.
    """

    def __init__(self) -> None:
        self.started: list[tuple[Any, dict[str, str], dict[int, Any]]] = []

    def spawnProcess(
        self,
        protocol: Any,
        executable: str,
        args: list[str],
        env: dict[str, str],
        path: str,
        childFDs: dict[int, Any],
    ) -> _Transport:
        transport = _Transport(1000 + len(self.started))
        protocol.makeConnection(transport)
        self.started.append((protocol, env, childFDs))
        return transport


def test_the_supervisor_starts_restarts_and_stops_its_workers(tmp_path: Path) -> None:
    """
    Two workers, each told its index and given the shared socket and its
    own; one that dies soon after its start is started again after 0.5 s,
    then 1 s; one that ran a while, at once.  Stopping sends SIGTERM to
    each and waits for them all.
    """
    settings = options.read(
        None, {"workers": "2", "listen": ["tcp:0:interface=127.0.0.1"], "cache-dir": str(tmp_path)}, {}
    )
    processes, clock = _Processes(), Clock()
    supervisor = Supervisor(settings, None, {"workers": "2"}, processes, clock)  # type: ignore[arg-type]
    supervisor.startService()
    try:
        roles = [Role.load(env[ROLE_ENV]) for _, env, _ in processes.started]
        assert [r.index for r in roles] == [0, 1]
        assert roles[0].listen == roles[1].listen and roles[0].own != roles[1].own
        for (_, _, fds), role in zip(processes.started, roles, strict=True):
            assert {role.listen[0].fd, role.own.fd} <= set(fds)
        ended = Failure(ProcessTerminated(signal=9))
        for delay in (0.5, 1.0):
            processes.started[-1][0].processEnded(ended)
            clock.advance(delay - 0.01)
            count = len(processes.started)
            clock.advance(0.01)
            assert len(processes.started) == count + 1
            assert Role.load(processes.started[-1][1][ROLE_ENV]).index == 1
        clock.advance(STEADY)
        processes.started[-1][0].processEnded(ended)
        clock.advance(0)
        assert Role.load(processes.started[-1][1][ROLE_ENV]).index == 1
    finally:
        stopped = supervisor.stopService()
    running = [protocol for protocol, _, _ in processes.started if not protocol.ended.called]
    assert len(running) == 2
    assert all(p.transport.signals == [signal.SIGTERM] for p in running)
    done: list[object] = []
    stopped.addBoth(done.append)
    running[0].processEnded(Failure(ProcessDone(0)))
    assert not done
    running[1].processEnded(Failure(ProcessDone(0)))
    assert done == [None]
    clock.advance(1000)  # no restart after the stop
    assert len([p for p, _, _ in processes.started if not p.ended.called]) == 0


def test_the_supervisor_gives_up_on_a_worker_that_keeps_dying(tmp_path: Path) -> None:
    """
    GIVE_UP_AFTER deaths in a row, each soon after the start: no more
    restarts, the reactor is stopped, and once every worker ended the
    parent exits with an error.
    """
    from txpypi.workers import GIVE_UP_AFTER

    settings = options.read(
        None, {"workers": "2", "listen": ["tcp:0:interface=127.0.0.1"], "cache-dir": str(tmp_path)}, {}
    )
    processes, clock = _Processes(), Clock()
    stops: list[bool] = []
    processes.stop = lambda: stops.append(True)  # type: ignore[attr-defined]
    supervisor = Supervisor(settings, None, {}, processes, clock)  # type: ignore[arg-type]
    exits: list[int] = []
    supervisor.exit = exits.append
    supervisor.startService()
    ended = Failure(ProcessTerminated(exitCode=1))
    for _ in range(GIVE_UP_AFTER):
        latest = [p for p, env, _ in processes.started if Role.load(env[ROLE_ENV]).index == 1][-1]
        latest.processEnded(ended)
        clock.advance(60)
    assert supervisor.gave_up and stops == [True]
    started = len(processes.started)
    clock.advance(120)
    assert len(processes.started) == started  # not started again
    d = supervisor.stopService()
    [p for p, _, _ in processes.started if not p.ended.called][0].processEnded(Failure(ProcessDone(0)))
    assert d.called and exits == [1]


def test_a_second_parent_on_the_same_cache_dir_refuses_to_start(tmp_path: Path) -> None:
    settings = options.read(
        None, {"workers": "2", "listen": ["tcp:0:interface=127.0.0.1"], "cache-dir": str(tmp_path)}, {}
    )
    first = Supervisor(settings, None, {}, _Processes(), Clock())  # type: ignore[arg-type]
    first.privilegedStartService()
    try:
        second = Supervisor(settings, None, {}, _Processes(), Clock())  # type: ignore[arg-type]
        with pytest.raises(SystemExit, match="in use by another txpypi"):
            second.privilegedStartService()
    finally:
        first._close()
    again = Supervisor(settings, None, {}, _Processes(), Clock())  # type: ignore[arg-type]
    again.privilegedStartService()
    again._close()


@pytest.mark.parametrize("kind", ["tcp", "unix"])
def test_a_worker_accepts_one_connection_each_time_it_is_woken(kind: str, tmp_path: Path) -> None:
    """
    Twisted accepts up to 100 connections and more at once: a burst would
    all go to the first worker awake.  On a shared socket (TCP or UNIX) a
    worker takes one per wake-up, and the next connection wakes the others
    too.
    """
    from twisted.internet import reactor
    from twisted.internet.protocol import Factory, Protocol

    from txpypi.workers import adopt

    made: list[Protocol] = []

    class Counting(Factory):
        def buildProtocol(self, addr: Any) -> Protocol:
            protocol = Protocol()
            made.append(protocol)
            return protocol

    path = str(tmp_path / "s.sock")
    inherited, kept = make_socket("tcp:0:interface=127.0.0.1" if kind == "tcp" else f"unix:{path}")
    copy = Inherited(os.dup(inherited.fd), inherited.family, inherited.description)
    port = adopt(reactor, copy, Counting())
    port.stopReading()  # driven by hand here

    def connect() -> socket.socket:
        if kind == "tcp":
            return socket.create_connection(kept.getsockname())
        client = socket.socket(socket.AF_UNIX)
        client.connect(path)
        return client

    clients = [connect() for _ in range(3)]
    try:
        port.doRead()
        assert len(made) == 1
        port.doRead()
        port.doRead()
        assert len(made) == 3
    finally:
        for client in clients:
            client.close()
        for protocol in made:
            protocol.transport.abortConnection()
        port.connectionLost(Failure(Exception("done")))
        kept.close()

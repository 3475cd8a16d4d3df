"""
Worker processes (C{--workers N}): the parent makes the listening sockets
once (or takes the ones systemd handed over), starts N workers that accept
on all of them, starts again a worker that dies, and passes SIGHUP and
SIGTERM on to every worker.  The parent serves nothing itself.

Each worker also gets a listening socket of its own (on loopback, or on the
host of C{--peer-url} with C{--redis}), where the other workers reach it to
follow a download in progress there and to gather the metrics and health
of all (see L{txpypi.web.siblings}).  What a worker inherits is its
L{Role}, handed over in the environment.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import shutil
import signal
import socket
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs
from twisted.application.service import Service
from twisted.internet import abstract, tcp, unix
from twisted.internet.defer import Deferred, succeed
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ProcessExitedAlready
from twisted.internet.interfaces import IDelayedCall, IReactorProcess, IReactorTime
from twisted.internet.protocol import Factory, ProcessProtocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from txpypi.config import Settings

log = Logger(namespace="txpypi.workers")

#: The environment variable that hands a worker its L{Role}.
ROLE_ENV = "TXPYPI_WORKER"

#: How long a worker must have run for its death to be restarted at once;
#: one that died sooner is restarted after a delay that doubles each time,
#: up to L{MAX_RESTART_DELAY}.
STEADY = 10.0
MAX_RESTART_DELAY = 30.0

#: How long past C{--shutdown-grace} the workers have to exit after
#: SIGTERM before they are killed.
EXIT_MARGIN = 15.0

#: A worker that dies this many times in a row, each within L{STEADY} of
#: its start, is not started again: the parent stops, and exits with an
#: error (for systemd to see).
GIVE_UP_AFTER = 10

#: The file in the cache directory that the parent (and its workers, which
#: inherit it) hold locked while they run: a second parent on the same
#: directory, or one started while an earlier one's workers still drain,
#: refuses to start.
LOCK_FILE = "workers.lock"


@attrs.frozen
class Inherited:
    """
    A listening socket a worker inherits: its descriptor (the same number
    in the worker), address family, the endpoint string it was made for,
    and whether connections to it speak TLS (then the worker reads the
    endpoint string again for its certificate).
    """

    fd: int
    family: int
    description: str
    tls: bool = False


@attrs.frozen
class Role:
    """
    What makes a process one of the workers: its index, the sockets it
    inherits, where its siblings are, and the settings it reads (the
    parent's config file and command line).
    """

    index: int
    count: int
    listen: tuple[Inherited, ...]
    #: This worker's own listening socket, for its siblings.
    own: Inherited
    #: Where each worker (by index) is reached by the others.
    peer_urls: tuple[str, ...]
    #: The secret that signs requests between workers (and instances).
    secret: str = attrs.field(repr=False)
    config: str | None = None
    given: dict[str, Any] = attrs.field(factory=dict)
    #: The parent's process id: a worker whose parent is gone exits.
    parent: int = 0

    @property
    def peer_url(self) -> str:
        return self.peer_urls[self.index]

    @property
    def others(self) -> tuple[int, ...]:
        """
        The other workers' indexes, in the order of L{siblings}.
        """
        return tuple(i for i in range(len(self.peer_urls)) if i != self.index)

    @property
    def siblings(self) -> tuple[str, ...]:
        """
        Where the other workers are reached.
        """
        return tuple(self.peer_urls[i] for i in self.others)

    def dump(self) -> str:
        return json.dumps(attrs.asdict(self))

    @classmethod
    def load(cls, text: str) -> Role:
        raw = json.loads(text)
        return cls(
            index=raw["index"],
            count=raw["count"],
            listen=tuple(Inherited(**each) for each in raw["listen"]),
            own=Inherited(**raw["own"]),
            peer_urls=tuple(raw["peer_urls"]),
            secret=raw["secret"],
            config=raw["config"],
            given=raw["given"],
            parent=raw["parent"],
        )


#: What systemd tells the process it starts of the sockets it hands over:
#: the workers get theirs from the parent instead.
_SYSTEMD_VARIABLES = frozenset({"LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"})


def _family(interface: str) -> int:
    return socket.AF_INET6 if abstract.isIPv6Address(interface) else socket.AF_INET


class _Binder:
    """
    Stands in for the reactor while an endpoint string is read: makes the
    listening socket the endpoint would listen on (without accepting on
    it), or takes the descriptor systemd handed over.
    """

    def __init__(self, description: str) -> None:
        self.description = description
        self.made: socket.socket | None = None
        self.inherited: Inherited | None = None

    def _bind(self, family: int, address: Any, backlog: int, tls: bool) -> None:
        sock = socket.socket(family, socket.SOCK_STREAM)
        if family != socket.AF_UNIX:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(backlog)
        sock.setblocking(False)
        self.made = sock
        self.inherited = Inherited(sock.fileno(), family, self.description, tls)

    def listenTCP(self, port: int, factory: Any, backlog: int = 50, interface: str = "") -> None:
        self._bind(_family(interface), (interface, port), backlog, tls=False)

    def listenSSL(
        self, port: int, factory: Any, contextFactory: Any, backlog: int = 50, interface: str = ""
    ) -> None:
        self._bind(_family(interface), (interface, port), backlog, tls=True)

    def listenUNIX(
        self, address: str, factory: Any, backlog: int = 50, mode: int = 0o666, wantPID: int = 0
    ) -> None:
        try:
            if stat.S_ISSOCK(os.stat(address).st_mode):
                os.unlink(address)  # a socket file left by an earlier run
        except FileNotFoundError:
            pass
        self._bind(socket.AF_UNIX, address, backlog, tls=False)
        os.chmod(address, mode)

    def adoptStreamPort(self, fileDescriptor: int, addressFamily: int, factory: Any) -> None:
        # The endpoint closes the descriptor systemd handed over: keep a copy.
        self.made = socket.socket(fileno=os.dup(fileDescriptor))
        self.inherited = Inherited(self.made.fileno(), addressFamily, self.description)


def make_socket(description: str) -> tuple[Inherited, socket.socket]:
    """
    The listening socket for an endpoint string, and the socket object that
    keeps it open.

    @raise ValueError: the string cannot be listened on this way.
    """
    binder = _Binder(description)
    d = serverFromString(binder, description).listen(Factory())
    failures: list[Failure] = []
    d.addErrback(failures.append)
    if failures:
        failures[0].raiseException()
    if binder.inherited is None or binder.made is None:
        raise ValueError(f"listen: {description!r} is not a stream socket endpoint that workers can share")
    return binder.inherited, binder.made


class _Adopter:
    """
    Stands in for the reactor while a worker reads a TLS endpoint string:
    listens by adopting the inherited socket, wrapping its connections in
    TLS with the endpoint's certificate.
    """

    def __init__(self, reactor: Any, inherited: Inherited) -> None:
        self._reactor = reactor
        self._inherited = inherited

    def listenSSL(
        self, port: int, factory: Any, contextFactory: Any, backlog: int = 50, interface: str = ""
    ) -> Any:
        from twisted.protocols.tls import TLSMemoryBIOFactory

        wrapped = TLSMemoryBIOFactory(contextFactory, False, factory)
        return _shared_port(self._reactor, self._inherited, wrapped)


#: How many connections a worker accepts from a shared socket each time it
#: is woken for it.  Twisted accepts up to 100 and more at once: under a
#: burst the first worker awake took every connection and the others none.
#: One at a time (nginx's default, C{multi_accept off}) spreads a burst over
#: the workers, each woken by the next connection in turn.
ACCEPTS_PER_WAKE = 1


class _OneAcceptPerWake:
    """
    A port on a socket the workers share (TCP or UNIX): see L{ACCEPTS_PER_WAKE}.
    """

    numberAccepts: int

    def doRead(self) -> None:
        self.numberAccepts = ACCEPTS_PER_WAKE
        super().doRead()  # type: ignore[misc]


class _SharedTCPPort(_OneAcceptPerWake, tcp.Port):  # type: ignore[misc]
    """
    A TCP socket the workers share.
    """


def _shared_port(reactor: Any, inherited: Inherited, factory: Any) -> Any:
    """
    Listen on the inherited TCP socket, as C{reactor.adoptStreamPort} does,
    with a L{_SharedTCPPort}.
    """
    port = _SharedTCPPort._fromListeningDescriptor(reactor, inherited.fd, inherited.family, factory)
    port.startListening()
    return port


class _SharedUnixPort(_OneAcceptPerWake, unix.Port):  # type: ignore[misc]
    """
    A UNIX socket a worker adopted: its file belongs to the parent, which
    made it with its mode and removes it at the end; a worker neither
    changes the mode (Twisted's port would make it C{0666}) nor removes
    the file when it stops listening (the other workers still accept on
    it).
    """

    _shouldShutdown = False  # see adopt()

    def startListening(self) -> None:
        try:
            self.mode = stat.S_IMODE(os.stat(self._bindPath).st_mode)
        except OSError:
            pass
        super().startListening()

    def connectionLost(self, reason: Any) -> None:
        tcp.Port.connectionLost(self, reason)


def adopt(reactor: Any, inherited: Inherited, factory: Any) -> Any:
    """
    Accept connections for C{factory} on an inherited listening socket (the
    descriptor is duplicated: the inherited one is closed).
    """
    # Twisted accepts until there is nothing more to accept: on a blocking
    # socket (shared with the other workers) the last accept would wait.
    os.set_blocking(inherited.fd, False)
    if inherited.family == socket.AF_UNIX and not inherited.tls:
        shared = _SharedUnixPort._fromListeningDescriptor(reactor, inherited.fd, factory)
        shared.startListening()
        os.close(inherited.fd)
        return shared
    if inherited.tls:
        port: list[Any] = []
        serverFromString(_Adopter(reactor, inherited), inherited.description).listen(factory).addCallback(
            port.append
        )
        result = port[0]
    else:
        result = _shared_port(reactor, inherited, factory)
    # A port shuts its socket down as it stops listening: on a socket the
    # other workers share, that would stop them accepting too.  Closing
    # this worker's copy is all it may do.
    result._shouldShutdown = False
    os.close(inherited.fd)
    return result


def peer_host(settings: Settings) -> str:
    """
    Where the workers' own sockets listen: loopback, or with C{--redis} and
    C{--peer-url} that URL's host, for the other instances to reach them.
    """
    if settings.redis is not None and settings.peer_url is not None:
        return urlsplit(settings.peer_url).hostname or "127.0.0.1"
    return "127.0.0.1"


class _Worker(ProcessProtocol):
    def __init__(self, supervisor: Supervisor, index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.started = 0.0
        self.ended: Deferred[None] = Deferred()

    def processEnded(self, reason: Failure) -> None:
        self.supervisor._ended(self, reason)
        self.ended.callback(None)


class Supervisor(Service):
    """
    The parent of the workers.
    """

    def __init__(
        self,
        settings: Settings,
        config: str | None,
        given: dict[str, Any],
        reactor: IReactorProcess,
        clock: IReactorTime,
    ) -> None:
        self._settings = settings
        self._config = config
        self._given = given
        self._reactor = reactor
        self._clock = clock
        #: The sockets of C{--listen}, and the workers' own.
        self._public: list[socket.socket] = []
        self._sockets: list[socket.socket] = []
        self._listen: tuple[Inherited, ...] = ()
        self._own: tuple[Inherited, ...] = ()
        self._peer_urls: tuple[str, ...] = ()
        self._secret = settings.peer_secret or secrets.token_hex(32)
        self._running: dict[int, _Worker] = {}
        self._restarts: dict[int, IDelayedCall] = {}
        self._failures: dict[int, int] = {}
        self._stopping = False
        self._previous: Any = None
        #: The UNIX socket files the parent made, removed at the end.
        self._unix_paths: list[str] = []
        #: The descriptor holding L{LOCK_FILE}, handed to every worker.
        self._lock: int | None = None
        #: Whether the parent gave up on a worker (it then exits with an
        #: error, by L{exit}: the process's own, but in tests).
        self.gave_up = False
        self.exit: Callable[[int], object] = os._exit

    def privilegedStartService(self) -> None:
        # Bound before twistd gives up its privileges (a port under 1024).
        super().privilegedStartService()
        self._lock_cache_dir()
        listen = []
        for description in self._settings.listen:
            try:
                inherited, made = make_socket(description)
            except OSError as e:
                raise SystemExit(f"listen: cannot listen on {description}: {e.strerror or e}") from None
            listen.append(inherited)
            self._public.append(made)
            if inherited.family == socket.AF_UNIX and not description.startswith("systemd:"):
                self._unix_paths.append(made.getsockname())
        host = peer_host(self._settings)
        own, urls = [], []
        for _ in range(self._settings.workers):
            sock = socket.socket(_family(host), socket.SOCK_STREAM)
            try:
                sock.bind((host, 0))
            except OSError as e:
                sock.close()
                raise SystemExit(
                    f"peer-url: the workers cannot listen on {host}: {e.strerror or e}"
                ) from None
            sock.listen(128)
            sock.setblocking(False)
            self._sockets.append(sock)
            own.append(Inherited(sock.fileno(), sock.family, f"tcp:0:interface={host}"))
            shown = f"[{host}]" if sock.family == socket.AF_INET6 else host
            urls.append(f"http://{shown}:{sock.getsockname()[1]}/")
        self._listen, self._own, self._peer_urls = tuple(listen), tuple(own), tuple(urls)
        # The spool files of an earlier run (the workers clean their own).
        shutil.rmtree(Path(self._settings.cache_dir) / "tmp", ignore_errors=True)

    def _lock_cache_dir(self) -> None:
        cache_dir = Path(self._settings.cache_dir)
        cache_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(cache_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise SystemExit(
                f"cache-dir: {cache_dir} is in use by another txpypi with workers "
                "(or its workers, still running)"
            ) from None
        self._lock = fd

    def startService(self) -> None:
        super().startService()
        if not self._listen:  # started without privilegedStartService (a test)
            self.privilegedStartService()
        self._previous = signal.signal(signal.SIGHUP, self._on_hup)
        for index in range(self._settings.workers):
            self._spawn(index)

    def role(self, index: int) -> Role:
        return Role(
            index=index,
            count=self._settings.workers,
            listen=self._listen,
            own=self._own[index],
            peer_urls=self._peer_urls,
            secret=self._secret,
            config=self._config,
            given=self._given,
            parent=os.getpid(),
        )

    def _spawn(self, index: int) -> None:
        self._restarts.pop(index, None)
        if self._stopping:
            return
        worker = _Worker(self, index)
        env = {k: v for k, v in os.environ.items() if k not in _SYSTEMD_VARIABLES}
        env[ROLE_ENV] = self.role(index).dump()
        fds: dict[int, Any] = {0: 0, 1: 1, 2: 2}
        for inherited in (*self._listen, self._own[index]):
            fds[inherited.fd] = inherited.fd
        if self._lock is not None:
            fds[self._lock] = self._lock  # held while any worker lives
        worker.started = self._clock.seconds()
        self._reactor.spawnProcess(
            worker,
            sys.executable,
            [sys.executable, "-m", "txpypi.worker"],
            env=env,
            path=os.getcwd(),
            childFDs=fds,
        )
        self._running[index] = worker
        log.info("started worker {index} (pid {pid})", index=index, pid=worker.transport.pid)  # type: ignore[union-attr]

    def _ended(self, worker: _Worker, reason: Failure) -> None:
        if self._running.get(worker.index) is worker:
            del self._running[worker.index]
        if self._stopping:
            return
        ran = self._clock.seconds() - worker.started
        failures = 0 if ran >= STEADY else self._failures.get(worker.index, 0) + 1
        self._failures[worker.index] = failures
        if failures >= GIVE_UP_AFTER:
            log.critical(
                "worker {index} died {count} times in a row within {steady:g} s of its start "
                "({why}); giving up",
                index=worker.index,
                count=failures,
                steady=STEADY,
                why=reason.getErrorMessage(),
            )
            self.gave_up = True
            self._give_up()
            return
        delay = 0.0 if failures == 0 else min(MAX_RESTART_DELAY, 0.5 * 2 ** (failures - 1))
        log.warn(
            "worker {index} ended ({why}); starting it again in {delay:.1f} s",
            index=worker.index,
            why=reason.getErrorMessage(),
            delay=delay,
        )
        self._restarts[worker.index] = self._clock.callLater(delay, self._spawn, worker.index)

    def _give_up(self) -> None:
        stop = getattr(self._reactor, "stop", None)
        if stop is not None:
            stop()  # the services stop (the other workers drain), then exit 1

    def _signal_all(self, signum: int) -> None:
        for worker in list(self._running.values()):
            try:
                worker.transport.signalProcess(signum)  # type: ignore[union-attr]
            except (ProcessExitedAlready, OSError):
                pass

    def _on_hup(self, signum: int, frame: Any) -> None:
        log.info("SIGHUP: passing it on to {count} worker(s)", count=len(self._running))
        self._signal_all(signal.SIGHUP)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        self._stopping = True
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
            self._previous = None
        for call in self._restarts.values():
            call.cancel()
        self._restarts.clear()
        workers = list(self._running.values())
        if not workers:
            self._close()
            if self.gave_up:
                self.exit(1)
            return succeed(None)
        self._signal_all(signal.SIGTERM)
        # No new connection waits in a backlog that nobody will accept: the
        # workers keep their own copies until each stops listening.
        self._close_listening()
        kill = self._clock.callLater(
            self._settings.shutdown_grace + EXIT_MARGIN, self._signal_all, signal.SIGKILL
        )
        d = Deferred.fromCoroutine(self._wait(workers))

        def done(result: None) -> None:
            if kill.active():
                kill.cancel()
            self._close()
            if self.gave_up:
                self.exit(1)  # after every worker ended: for systemd to see a failure

        return d.addCallback(done)

    async def _wait(self, workers: list[_Worker]) -> None:
        for worker in workers:
            await worker.ended

    def _close_listening(self) -> None:
        for sock in self._public:
            sock.close()
        self._public = []
        for path in self._unix_paths:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
        self._unix_paths = []

    def _close(self) -> None:
        self._close_listening()
        for sock in self._sockets:
            sock.close()
        self._sockets = []
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

"""
One worker process (C{python -m txpypi.worker}), started by
L{txpypi.workers.Supervisor} with its L{Role} in the environment: it reads
the same settings as its parent, serves on the sockets it inherited, and
exits with its parent.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from typing import Any

from twisted.logger import FileLogObserver, Logger, formatEventAsClassicLogText, globalLogBeginner
from twisted.python import usage

from txpypi.workers import ROLE_ENV, Role

#: C{prctl}'s option that signals a process when its parent dies (Linux).
_PR_SET_PDEATHSIG = 1


def _die_with_parent(parent: int) -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):
        pass  # not Linux: the parent's SIGTERM is all there is
    if os.getppid() != parent:
        sys.exit("txpypi worker: the parent is gone")


def _observer(index: int) -> FileLogObserver:
    def format_event(event: dict[str, Any]) -> str | None:
        if event.get("log_system") in (None, "-"):
            event = {**event, "log_system": f"worker {index}"}
        return formatEventAsClassicLogText(event)

    return FileLogObserver(sys.stdout, format_event)


def main() -> None:
    # A SIGHUP before the reload service listens for it (the parent passes
    # one on as soon as it gets it) must not end the worker: it is kept,
    # and delivered again once the service is up.
    held: list[int] = []
    signal.signal(signal.SIGHUP, lambda signum, frame: held.append(signum))
    role = Role.load(os.environ.pop(ROLE_ENV))
    _die_with_parent(role.parent)
    globalLogBeginner.beginLoggingTo([_observer(role.index)], redirectStandardIO=False)

    from txpypi.reactor import install

    install()
    from twisted.internet import reactor

    from txpypi import tap

    config = tap.Options()
    config.config_path = role.config
    config.given = dict(role.given)
    try:
        config.settings = config.reread()
    except usage.UsageError as e:
        sys.exit(f"txpypi worker {role.index}: {e}")
    service = tap.worker_service(config, role, reactor)  # type: ignore[arg-type]
    service.privilegedStartService()

    def start() -> None:
        try:
            service.startService()
        except BaseException:
            # Half started, it would serve nothing and the parent would not
            # know: end, and be started again.
            Logger(namespace="txpypi.workers").failure("worker {index} could not start", index=role.index)
            os._exit(1)
        Logger(namespace="txpypi.workers").info(
            "worker {index} ready (pid {pid})", index=role.index, pid=os.getpid()
        )
        if held:
            os.kill(os.getpid(), signal.SIGHUP)

    reactor.callWhenRunning(start)  # type: ignore[attr-defined]
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)  # type: ignore[attr-defined]

    stopping: list[bool] = []

    def stop() -> None:
        if not stopping:
            stopping.append(True)
            reactor.stop()  # type: ignore[attr-defined]

    def on_signal(signum: int, frame: Any) -> None:
        # SIGTERM may come twice (from the parent, and from systemd to the
        # whole control group): the second changes nothing.
        reactor.callFromThread(stop)  # type: ignore[attr-defined]

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    reactor.run(installSignalHandlers=False)  # type: ignore[attr-defined,call-arg]


if __name__ == "__main__":
    main()

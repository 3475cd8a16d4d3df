"""
A worker's counters across its restarts (see L{txpypi.workers}).

The totals of C{/metrics} are the sum of the workers' own figures, and a
worker started again (after it died, or was killed) starts from zero: the
totals would go down, which Prometheus reads as a reset, and the next
C{rate()} would count everything again.  So each time a worker's figures
leave it (its own part of a scrape it answers, or its answer to a sibling
that gathers the totals), L{CarriedCounters} first writes them to the
worker's file, C{<cache-dir>/tmp/metrics/w<N>}; the worker started again
in its place reads that file and adds its counters and histograms (not its
gauges: they are the state of a process that is gone) to its own.  Every
figure that was ever seen is there, so the totals never go down while the
parent runs; what a killed worker counted after its last report is lost,
but that was never seen either.  The parent removes C{tmp/} when it
starts: a new run starts from zero, as a restarted process should.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, DeferredLock
from twisted.logger import Logger

from txpypi.web.metrics import GROWING, merge

log = Logger(namespace="txpypi.metrics")


def carried_path(cache_dir: str, index: int) -> Path:
    """
    The file of worker C{index}'s counters.
    """
    return Path(cache_dir) / "tmp" / "metrics" / f"w{index}"


class CarriedCounters:
    """
    One worker's figures as it reports them: its own, plus the counters of
    the workers that ran in its place before it (L{load}); each report is
    written before it is given (L{report}).
    """

    def __init__(
        self,
        path: Path,
        run: Callable[..., Deferred[Any]],
        before: bytes | None = None,
        others: tuple[Path, ...] = (),
    ) -> None:
        self._path = path
        #: The files of the other workers, in the order of their sockets
        #: (L{txpypi.workers.Role.siblings}).
        self.others = others
        #: Runs a blocking call in a thread (the writes, and reading the
        #: others' files).
        self._run = run
        #: The counters and histograms of the workers before this one.
        self.before = before
        #: One report at a time: written in the order they were made, so
        #: that the file always holds the latest.
        self._lock = DeferredLock()
        self._failing = False

    @classmethod
    def load(
        cls, path: Path, run: Callable[..., Deferred[Any]], others: tuple[Path, ...] = ()
    ) -> CarriedCounters:
        """
        The counters of the worker started at C{path}, carrying on from the
        last report of the one before it, if any (read at start-up, before
        the worker serves).
        """
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            text = path.read_bytes()
        except FileNotFoundError:
            return cls(path, run, others=others)
        try:
            before = merge([text], kinds=GROWING)
        except ValueError as e:  # UnicodeDecodeError too
            log.warn(
                "metrics: {path} (the counters of the worker before) is unreadable ({e}): from zero",
                path=str(path),
                e=e,
            )
            return cls(path, run, others=others)
        return cls(path, run, before, others)

    async def report(self, own: Callable[[], bytes]) -> bytes:
        """
        This worker's figures now (C{own()}, plus the counters carried
        over), once they are written.  A write that fails is logged (once
        until one works again) and the figures are given all the same.
        """
        async with self._lock:
            text = own()
            if self.before is not None:
                text = merge([self.before, text])
            try:
                await self._run(_write, self._path, text)
            except OSError as e:
                if not self._failing:
                    log.warn(
                        "metrics: cannot write {path} ({e}): a restart of this worker would lower the totals",
                        path=str(self._path),
                        e=e,
                    )
                self._failing = True
            else:
                self._failing = False
            return text

    async def latest(self, answers: list[tuple[bytes | None, bool]]) -> list[bytes]:
        """
        The other workers' parts of the totals: each one's file, which holds
        the last figures it gave anyone (so never less than any of them),
        else its answer (C{answers}, from L{txpypi.web.siblings}: one that
        did not answer now may be older than what it gave since, or gone).
        """
        files: list[bytes | None] = await self._run(_read_all, self.others)
        found = []
        for file, (text, _) in zip(files, answers, strict=True):
            part = file if file is not None else text
            if part is not None:
                found.append(part)
        return found


def _read_all(paths: tuple[Path, ...]) -> list[bytes | None]:
    found: list[bytes | None] = []
    for path in paths:
        try:
            found.append(path.read_bytes())
        except OSError:
            found.append(None)
    return found


def _write(path: Path, text: bytes) -> None:
    # Whole or not at all: a worker killed mid-write leaves the last report.
    part = path.with_name(path.name + ".part")
    part.write_bytes(text)
    os.replace(part, path)

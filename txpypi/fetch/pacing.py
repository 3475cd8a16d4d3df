"""
Holding the upstream back while its bytes pile up: in the hash queue past
C{queue_high}, or in memory past C{memory_high} (the disk is full, and the
clients have not read them yet).  While the clients hold it back so, those
that read nothing for a whole read timeout are cut off, so that one stuck
client cannot stall everyone.
"""

from __future__ import annotations

from collections.abc import Callable

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from txpypi.concurrency.waiters import Timer
from txpypi.fetch.body import UpstreamBody
from txpypi.fetch.reader import Readers
from txpypi.fetch.spool import Spool

log = Logger(namespace="txpypi.download")


@attrs.define(eq=False)
class Pacing:
    """
    One flight's back-pressure on its upstream.
    """

    _clock: IReactorTime
    _body: UpstreamBody
    _spool: Spool
    _readers: Readers
    #: Bytes received so far.
    _written: Callable[[], int]
    _filename: str
    memory_high: int
    queue_high: int
    _stuck: Timer = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._stuck = Timer(self._clock)

    def received(self, hash_pending: int) -> None:
        """
        Bytes came, and C{hash_pending} wait for the hash.
        """
        if len(self._spool.memory) > self.memory_high:
            self._pause("memory")
        if hash_pending > self.queue_high:
            self._pause("queue")

    def hashed(self, hash_pending: int) -> None:
        if hash_pending <= self.queue_high // 2:
            self._body.unpause("queue")

    def spooled(self, error: OSError | None) -> None:
        """
        A batch was written (or failed with C{error}: memory is all there is).
        """
        if error is not None:
            self.trim()
            self._watch_stuck()  # if the upstream was already paused for the spool
        elif len(self._spool.memory) <= self.memory_high // 2:
            self._unpause_memory()

    def trim(self) -> None:
        """
        Drop the bytes in memory that every reader is past, and resume the
        upstream once they caught up.
        """
        if self._spool.cacheable:
            return
        self._spool.trim(self._readers.lowest(self._written()))
        if len(self._spool.memory) <= self.memory_high // 2:
            self._unpause_memory()

    def forget_stuck(self) -> None:
        self._stuck.cancel()

    def _pause(self, why: str) -> None:
        if self._body.pause(why):
            self._watch_stuck()

    def _unpause_memory(self) -> None:
        self.forget_stuck()
        self._body.unpause("memory")

    def _held_back(self) -> bool:
        """
        Whether the clients hold the upstream back (the disk is full, so
        memory is all there is).
        """
        return self._body.paused_for("memory") and not self._spool.cacheable

    def _watch_stuck(self) -> None:
        """
        Cut off, in a read timeout, the readers that have not read on from
        where the slowest is now (one watch at a time).
        """
        if self._held_back() and not self._stuck.running:
            lowest = self._readers.lowest(self._written())
            self._stuck.start(self._body.read_timeout, self._cut_stuck, lowest)

    def _cut_stuck(self, lowest: int) -> None:
        if not self._body.paused_for("memory"):
            return
        for reader in list(self._readers):
            if reader.position <= lowest:
                log.warn(
                    "cutting off a client of {filename} that read nothing for {timeout:g} s "
                    "while the disk is full",
                    filename=self._filename,
                    timeout=self._body.read_timeout,
                )
                reader.cut()
        self.trim()
        self._watch_stuck()  # still held back: by the next slowest, for as long

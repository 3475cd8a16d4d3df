"""
How late the reactor runs what it was asked to run: a timer due every
C{interval} seconds notes how long after its time it fired.  A reactor
thread busy with one long piece of work (a big sort, a long loop, a
blocking call) shows as one late tick; C{--stall-meter} exports the
figures as metrics.
"""

from __future__ import annotations

import bisect

import attrs
from twisted.internet.interfaces import IDelayedCall, IReactorTime

#: The upper bounds, in seconds, of the lateness buckets counted.
BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@attrs.define
class StallMeter:
    """
    Measures the reactor's lateness every C{interval} seconds once
    L{start}ed: the longest seen, and how many ticks were late by at most
    each of L{BUCKETS} (the last count: later than them all).
    """

    _clock: IReactorTime
    interval: float = 0.01
    #: The longest lateness seen, in seconds.
    longest: float = 0.0
    #: The ticks measured.
    ticks: int = 0
    #: Their lateness added up, in seconds.
    total: float = 0.0
    #: Ticks by lateness: C{counts[i]} were late by at most C{BUCKETS[i]}
    #: (and more than the bound before); the last, by more than them all.
    counts: list[int] = attrs.field(factory=lambda: [0] * (len(BUCKETS) + 1))
    _due: float = 0.0
    _call: IDelayedCall | None = None

    def start(self) -> None:
        if self._call is None:
            self._schedule()

    def stop(self) -> None:
        if self._call is not None:
            if self._call.active():
                self._call.cancel()
            self._call = None

    def _schedule(self) -> None:
        self._due = self._clock.seconds() + self.interval
        self._call = self._clock.callLater(self.interval, self._tick)

    def _tick(self) -> None:
        self.note(max(0.0, self._clock.seconds() - self._due))
        self._schedule()

    def note(self, late: float) -> None:
        """
        Count one tick that fired C{late} seconds after its time.
        """
        self.ticks += 1
        self.total += late
        self.longest = max(self.longest, late)
        self.counts[bisect.bisect_left(BUCKETS, late)] += 1


__all__ = ["BUCKETS", "StallMeter"]

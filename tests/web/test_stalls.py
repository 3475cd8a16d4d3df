"""
The reactor stall meter (C{--stall-meter}): its figures on a hand-driven
L{Clock}, and as they show on C{/metrics}.
"""

from __future__ import annotations

from twisted.internet.task import Clock

from txpypi.concurrency.stalls import BUCKETS, StallMeter
from txpypi.web.metrics import Metrics


def test_ticks_on_time_are_not_late() -> None:
    """
    A reactor that runs each tick when due shows no stall.
    """
    clock = Clock()
    meter = StallMeter(clock)
    meter.start()
    for _ in range(5):
        clock.advance(0.01)
    assert meter.ticks == 5
    assert meter.longest == 0.0
    assert meter.counts[0] == 5


def test_a_blocked_reactor_shows_as_one_late_tick() -> None:
    """
    A tick due in 10 ms that runs 310 ms after the last was 300 ms late:
    the longest stall, counted in the bucket up to 0.5 s; the next tick is
    due 10 ms after that one ran, not at once.
    """
    clock = Clock()
    meter = StallMeter(clock)
    meter.start()
    clock.advance(0.01)
    clock.advance(0.31)  # the reactor was busy for 300 ms past the tick's time
    assert meter.ticks == 2
    assert abs(meter.longest - 0.3) < 1e-9
    assert meter.counts[BUCKETS.index(0.5)] == 1
    clock.advance(0.005)
    assert meter.ticks == 2  # not due yet
    clock.advance(0.005)
    assert meter.ticks == 3
    assert abs(meter.longest - 0.3) < 1e-9


def test_stop_cancels_the_timer() -> None:
    clock = Clock()
    meter = StallMeter(clock)
    meter.start()
    meter.stop()
    assert clock.getDelayedCalls() == []
    clock.advance(1)
    assert meter.ticks == 0


def test_the_metrics_show_the_longest_stall_and_the_histogram() -> None:
    """
    C{/metrics} has the longest stall as a gauge and each tick's lateness
    as a histogram.
    """
    meter = StallMeter(Clock())
    meter.note(0.0)
    meter.note(0.07)
    metrics = Metrics.create()
    metrics.watch_stalls(meter)
    sample = metrics.registry.get_sample_value
    assert sample("txpypi_reactor_stall_seconds_max") == 0.07
    assert sample("txpypi_reactor_lateness_seconds_bucket", {"le": "0.05"}) == 1
    assert sample("txpypi_reactor_lateness_seconds_bucket", {"le": "0.1"}) == 2
    assert sample("txpypi_reactor_lateness_seconds_count") == 2
    assert b"txpypi_reactor_stall_seconds_max 0.07" in metrics.render()

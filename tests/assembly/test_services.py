"""
Services of the assembly that the other tests do not start: the heap
frozen once the process is built, and the stall meter run while its
service runs.
"""

from __future__ import annotations

import gc

from twisted.internet.task import Clock

from txpypi.concurrency.stalls import StallMeter
from txpypi.services import HeapFreezeService, StallMeterService


def test_the_heap_is_frozen_once_built() -> None:
    """
    Starting the service freezes the objects there are, so that full
    collections skip them; objects made after it are collected as before.
    """
    gc.unfreeze()
    service = HeapFreezeService()
    try:
        service.startService()
        frozen = gc.get_freeze_count()
        assert frozen > 1000
        made_after = [object()]
        assert gc.get_freeze_count() == frozen
        assert gc.is_tracked(made_after)
    finally:
        gc.unfreeze()
        service.stopService()


def test_the_stall_meter_runs_while_its_service_runs() -> None:
    clock = Clock()
    meter = StallMeter(clock)
    service = StallMeterService(meter)
    service.startService()
    clock.advance(0.01)
    clock.advance(0.01)
    assert meter.ticks == 2
    service.stopService()
    assert clock.getDelayedCalls() == []
    clock.advance(1)
    assert meter.ticks == 2

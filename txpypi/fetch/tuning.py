"""
How a flight is tuned: how long and how slowly its upstream may send, how
many bytes may pile up before the upstream is held back, and how the spool
is written, punched and its blocking work run (the production ways, or a
test's full disk and hand-driven worker).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred

from txpypi.concurrency.waiters import in_thread_now
from txpypi.fetch.punch import PUNCH_HOLE, PunchHole, PunchPolicy

#: Received bytes that may wait for the worker thread to hash them before
#: the upstream is paused; it is resumed below half of it.
QUEUE_HIGH = 8 * 1024 * 1024

#: When the spool cannot be written, a flight keeps its bytes in memory for
#: its clients; past this many it pauses the upstream until they catch up.
MEMORY_HIGH = 8 * 1024 * 1024


@attrs.frozen
class FlightTuning:
    """
    The settings and the ways of one flight (the file cache gives every
    flight the same).
    """

    #: The upstream must send something this often, in seconds.
    read_timeout: float = 60.0
    #: The slowest an upstream may send, in bytes per second, averaged over
    #: each C{read_timeout} (0: no minimum): a slow drip cannot hold the
    #: download, its clients and its cluster lock for ever.
    min_rate: float = 0.0
    #: How spool bytes are written (a test may inject a full disk; once
    #: started, the spool's own C{write}).
    spool_write: Callable[[int, memoryview], int] = os.write
    #: How the spool's freed prefix is punched out (L{None}: it cannot be).
    punch: PunchHole | None = PUNCH_HOLE
    punch_policy: PunchPolicy = PunchPolicy()
    #: How hashing and spool writes run: C{run(f, *args)} gives a Deferred of
    #: C{f(*args)}, called in a worker thread in production.
    run: Callable[..., Deferred[Any]] = in_thread_now
    memory_high: int = MEMORY_HIGH
    queue_high: int = QUEUE_HIGH

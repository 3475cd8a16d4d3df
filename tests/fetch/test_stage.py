"""
A flight's one state (L{txpypi.fetch.stage}): the moves it may make, and
the ones it refuses; and the flight's stage as a download goes.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.internet.task import Clock
from twisted.web.client import ResponseDone

from tests.fetch.test_flight import DATA, harness
from txpypi.concurrency.waiters import Timer
from txpypi.fetch.stage import MOVES, IllegalMove, Lifecycle, Stage

S = Stage

#: Every move a flight may make, written out by hand (not read from MOVES).
ALLOWED = {
    (S.STARTING, S.STREAMING),
    (S.STARTING, S.FAILED),
    (S.STREAMING, S.RECEIVED),
    (S.STREAMING, S.FAILED),
    (S.RECEIVED, S.VERIFIED),
    (S.RECEIVED, S.FAILED),
    (S.VERIFIED, S.COMMITTING),
    (S.VERIFIED, S.LANDED),
    (S.COMMITTING, S.LANDED),
}


def at(*path: Stage) -> Lifecycle:
    """
    A lifecycle moved along C{path} from STARTING.
    """
    life = Lifecycle()
    for stage in path:
        life.move(stage)
    return life


#: A way to reach each stage.
PATHS = {
    S.STARTING: (),
    S.STREAMING: (S.STREAMING,),
    S.RECEIVED: (S.STREAMING, S.RECEIVED),
    S.VERIFIED: (S.STREAMING, S.RECEIVED, S.VERIFIED),
    S.COMMITTING: (S.STREAMING, S.RECEIVED, S.VERIFIED, S.COMMITTING),
    S.LANDED: (S.STREAMING, S.RECEIVED, S.VERIFIED, S.COMMITTING, S.LANDED),
    S.FAILED: (S.FAILED,),
}


@pytest.mark.parametrize("source", list(Stage))
@pytest.mark.parametrize("target", list(Stage))
def test_each_move_is_allowed_or_refused(source: Stage, target: Stage) -> None:
    life = at(*PATHS[source])
    assert life.stage is source
    assert life.can(target) == ((source, target) in ALLOWED)
    if (source, target) in ALLOWED:
        life.move(target)
        assert life.stage is target and life.reached(source)
    else:
        with pytest.raises(IllegalMove):
            life.move(target)
        assert life.stage is source  # a refused move changes nothing


def test_the_table_is_the_one_written_out() -> None:
    assert {(a, b) for a, moves in MOVES.items() for b in moves} == ALLOWED


def test_what_the_stages_mean() -> None:
    assert [s for s in Stage if at(*PATHS[s]).verified] == [S.VERIFIED, S.COMMITTING, S.LANDED]
    assert [s for s in Stage if at(*PATHS[s]).over] == [S.LANDED, S.FAILED]
    failed_late = at(S.STREAMING, S.FAILED)
    assert failed_late.failed and failed_late.reached(S.STREAMING)  # it had started
    assert not at(S.FAILED).reached(S.STREAMING)


def test_a_flight_goes_through_its_stages(tmp_path: Path) -> None:
    h = harness(tmp_path)
    assert h.flight.life.stage is S.STREAMING and h.flight.has_started  # the fake answers at once
    h.response.send(DATA)
    assert h.flight.life.stage is S.STREAMING and not h.flight.verified
    h.response.end(ResponseDone())
    assert h.flight.life.stage is S.LANDED and h.flight.done and h.landed[0] is not None
    assert not h.flight.stop("too late")  # a landed flight is not stopped


def test_a_stopped_flight_fails_and_stays_failed(tmp_path: Path) -> None:
    h = harness(tmp_path)
    h.response.send(DATA[:10])
    assert h.flight.stop("the proxy is shutting down")
    assert h.flight.life.stage is S.FAILED and h.flight.has_started and h.flight.done
    assert h.flight.failure is not None and h.flight.failure.status == 503
    assert not h.flight.stop("again")
    h.clock.advance(10)  # no timer fires into a failed flight
    assert h.flight.life.stage is S.FAILED and h.landed == [None]


def test_a_timer_is_started_pushed_back_and_cancelled() -> None:
    clock = Clock()
    fired: list[str] = []
    timer = Timer(clock)
    timer.cancel()  # nothing pending: fine
    timer.start(5, fired.append, "one")
    timer.start(5, fired.append, "two")  # instead of the first
    clock.advance(4)
    timer.reset(5)
    clock.advance(4)
    assert fired == [] and timer.running
    clock.advance(1)
    assert fired == ["two"] and not timer.running and clock.getDelayedCalls() == []
    timer.start(1, fired.append, "three")
    timer.cancel()
    clock.advance(2)
    assert fired == ["two"] and clock.getDelayedCalls() == []

"""
The one state of a flight, and the moves it may make: the only place that
says which stage may follow which.

    STARTING --> STREAMING --> RECEIVED --> VERIFIED --> COMMITTING --> LANDED
        |            |            |             |                         ^
        +------------+------------+--> FAILED   +-------------------------+

A flight fails (or is stopped, which is a failure with a 503) only before it
is verified: once it is, its clients have every byte, and what is left is
the caching, which lands the flight cached or not.
"""

from __future__ import annotations

import enum

import attrs


class Stage(enum.Enum):
    #: The spool is open; the upstream's response headers are awaited.
    STARTING = "starting"
    #: The body arrives.
    STREAMING = "streaming"
    #: The body ended; the hash is catching up before it can be checked.
    RECEIVED = "received"
    #: Length and hash check out: clients may have the last byte.
    VERIFIED = "verified"
    #: Going into the store (or given up uncached); the spool is no longer written.
    COMMITTING = "committing"
    #: Over, verified: cached, or not (the store failed, the disk was full).
    LANDED = "landed"
    #: Over, nothing cached: the fetch failed or was stopped.
    FAILED = "failed"


#: Where each stage may go next.
MOVES: dict[Stage, frozenset[Stage]] = {
    Stage.STARTING: frozenset({Stage.STREAMING, Stage.FAILED}),
    Stage.STREAMING: frozenset({Stage.RECEIVED, Stage.FAILED}),
    Stage.RECEIVED: frozenset({Stage.VERIFIED, Stage.FAILED}),
    # LANDED straight away: a crash after verification leaves the file uncached.
    Stage.VERIFIED: frozenset({Stage.COMMITTING, Stage.LANDED}),
    Stage.COMMITTING: frozenset({Stage.LANDED}),
    Stage.LANDED: frozenset(),
    Stage.FAILED: frozenset(),
}

#: The stages in which clients may have every byte.
VERIFIED = frozenset({Stage.VERIFIED, Stage.COMMITTING, Stage.LANDED})
#: The stages after which nothing happens any more.
OVER = frozenset({Stage.LANDED, Stage.FAILED})


class IllegalMove(Exception):
    """
    A move that L{MOVES} does not allow: a bug in the flight.
    """


@attrs.define
class Lifecycle:
    """
    Where a flight is (L{stage}), and where it has been.
    """

    stage: Stage = Stage.STARTING
    _seen: set[Stage] = attrs.field(factory=lambda: {Stage.STARTING})

    def can(self, to: Stage) -> bool:
        return to in MOVES[self.stage]

    def move(self, to: Stage) -> None:
        """
        @raise IllegalMove: if the current stage may not go to C{to}.
        """
        if not self.can(to):
            raise IllegalMove(f"a flight cannot go from {self.stage.name} to {to.name}")
        self.stage = to
        self._seen.add(to)

    def reached(self, stage: Stage) -> bool:
        """
        Whether the flight was ever in C{stage} (it may have moved on).
        """
        return stage in self._seen

    @property
    def verified(self) -> bool:
        return self.stage in VERIFIED

    @property
    def failed(self) -> bool:
        return self.stage is Stage.FAILED

    @property
    def over(self) -> bool:
        return self.stage in OVER

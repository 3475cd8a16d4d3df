"""
Download slots: at most C{--max-downloads} downloads at a time; a download
over the limit waits for a slot, then is refused with L{Busy}.
"""

from __future__ import annotations

from twisted.internet.interfaces import IReactorTime

from txpypi.concurrency.turns import Turns


class Busy(Exception):
    """
    Too many downloads are in progress, and none ended in time: the client
    is told to come back (C{503} with C{Retry-After}).
    """

    def __init__(self, reason: str, retry_after: int = 5) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after = retry_after


class Slots(Turns):
    """
    At most C{limit} downloads at a time (C{--max-downloads}); a download
    over it waits for a slot (see L{Turns}), then fails with L{Busy}.
    """

    def __init__(self, clock: IReactorTime, limit: int) -> None:
        super().__init__(clock, limit, _busy)


def _busy(timeout: float, running: int) -> Exception:
    return Busy(f"{running} downloads are in progress; try again shortly")


__all__ = ["Busy", "Slots"]

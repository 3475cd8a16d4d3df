"""
What a file fetch is asked for, and how it fails: the values that the
flight, the file cache and the web layer share.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import attrs
from twisted.internet.defer import Deferred


class FlightFailed(Exception):
    """
    The upstream fetch failed; C{status} and C{reason} say how (for clients
    who have not yet been sent headers).
    """

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


class ByteSource(Protocol):
    """
    Bytes a client reads at its own pace: a flight's reader, or a store's.
    """

    @property
    def size(self) -> int | None: ...

    def read(self, offset: int, length: int) -> Deferred[bytes]: ...

    def close(self) -> None: ...


@attrs.frozen
class Peer:
    """
    Another instance of the cluster that is downloading a file: C{url} is
    its peer route for the file, C{path} that route's path (signed with the
    cluster's C{secret}).  A worker of this machine may also be followed
    from its spool file, as C{notes} tells (see L{txpypi.fetch.tail}).
    """

    url: str
    path: str
    secret: str = attrs.field(repr=False)
    #: Reads the note the leader left in its lock file, when it is a worker
    #: of this machine: L{None} once its lock is let go, C{""} before it
    #: wrote one.
    notes: Callable[[], str | None] | None = attrs.field(default=None, eq=False, repr=False)


@attrs.frozen
class Wanted:
    """
    A file to fetch: the URL the upstream index listed, and what the index
    said about its hash and size.
    """

    key: str
    filename: str
    upstream: str
    url: str
    expected_hash: tuple[str, str] | None
    size: int | None

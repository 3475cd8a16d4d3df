"""
The upstream GET of a file (L{open_response}; or the spool of the worker
that fetches it, L{txpypi.fetch.tail}) and its response body as it
arrives: the body protocol that feeds a flight (L{BodySink}), and
L{UpstreamBody}, which pauses and resumes it and times it (it must send
something every C{read_timeout}, and at least C{min_rate} bytes per second
over each C{read_timeout}).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

import attrs
from twisted.internet.interfaces import IPushProducer, IReactorTime
from twisted.python.failure import Failure
from twisted.web.iweb import IResponse

from txpypi.concurrency.waiters import Timer
from txpypi.core.peer import HEADER, sign
from txpypi.fetch.clients import FileClient
from txpypi.fetch.tail import SpoolTail, open_spool
from txpypi.fetch.upstream import UpstreamError, UpstreamNotFound
from txpypi.fetch.wanted import FlightFailed, Peer, Wanted

#: How much an upstream file connection reads from its socket at once.
RECV_SIZE = 1024 * 1024


async def open_response(
    client: FileClient, wanted: Wanted, peer: Peer | None, clock: IReactorTime, spool_dir: str
) -> IResponse | SpoolTail:
    """
    Ask the upstream for the file (or, with C{peer}, the instance that
    fetches it: from its spool file in C{spool_dir} when it is a worker of
    this machine that spools it there, else signing a request to it); the
    response, its body to come.

    @raise FlightFailed: if there is none to have.
    """
    if peer is not None and peer.notes is not None:
        tail = await open_spool(peer.notes, spool_dir, clock, client.response_timeout)
        if tail is not None:
            return tail
    try:
        if peer is None:
            # The listed file, with its upstream and hash: the policy needs them.
            return await client.open_file(wanted)
        headers = {HEADER: sign(peer.secret, peer.path, clock.seconds()).encode()}
        return await client.open_file(peer.url, headers, "peer")
    except UpstreamNotFound:
        if peer is not None:
            raise FlightFailed(404, f"the instance at {peer.url} is not downloading it") from None
        raise FlightFailed(404, f"upstream has no file at {wanted.url}") from None
    except UpstreamError as e:
        raise FlightFailed(e.status, e.reason) from None


class BodyReceiver(Protocol):
    """
    What a L{BodySink} feeds.
    """

    def receiving(self, transport: IPushProducer) -> None: ...

    def data(self, data: bytes) -> None: ...

    def ended(self, reason: Failure) -> None: ...


class BodySink:
    """
    The body protocol that feeds a flight (or, given L{None}, drops the
    connection).
    """

    def __init__(self, receiver: BodyReceiver | None) -> None:
        self._receiver = receiver

    def makeConnection(self, transport: Any) -> None:
        if self._receiver is None:
            transport.stopProducing()
        else:
            self._receiver.receiving(transport)

    def dataReceived(self, data: bytes) -> None:
        if self._receiver is not None:
            self._receiver.data(data)

    def connectionLost(self, reason: Failure) -> None:
        if self._receiver is not None:
            self._receiver.ended(reason)


@attrs.define(eq=False)
class UpstreamBody:
    """
    The body while it is ours to wait for: paused for a reason or several
    (C{"memory"}, C{"queue"}), resumed once none is left, and given up when
    it stalls or drips.
    """

    _clock: IReactorTime
    #: Bytes received so far.
    _received: Callable[[], int]
    #: Called when the upstream is too slow.
    _too_slow: Callable[[FlightFailed], None]
    read_timeout: float = 60.0
    #: The slowest an upstream may send, in bytes per second, averaged over
    #: each C{read_timeout} (0: no minimum).
    min_rate: float = 0.0
    _transport: IPushProducer | None = None
    #: Why the upstream is paused, if it is.
    _paused: set[str] = attrs.field(factory=set)
    _idle: Timer = attrs.field(init=False)
    _rate: Timer = attrs.field(init=False)
    #: What had been received when the current rate window began.
    _window_from: int = 0

    def __attrs_post_init__(self) -> None:
        self._idle = Timer(self._clock)
        self._rate = Timer(self._clock)

    def attach(self, transport: IPushProducer) -> None:
        self._transport = transport
        # Read the socket in bigger gulps than Twisted's 64 KiB: fewer trips
        # through the reactor and the HTTP parser per megabyte.
        connection = getattr(transport, "_producer", None)
        if connection is not None and hasattr(connection, "bufferSize"):
            connection.bufferSize = RECV_SIZE

    def watch(self) -> None:
        """
        Start the idle and rate timers.
        """
        self._idle.start(self.read_timeout, self._stalled)
        if self.min_rate > 0 and self.read_timeout > 0:
            self._window_from = self._received()
            self._rate.start(self.read_timeout, self._check_rate)

    def arrived(self) -> None:
        """
        Bytes came: the idle timer starts again.
        """
        self._idle.reset(self.read_timeout)

    def _stalled(self) -> None:
        self._too_slow(FlightFailed(504, f"upstream sent nothing for {self.read_timeout:g} seconds"))

    def _check_rate(self) -> None:
        got = self._received() - self._window_from
        if got < self.min_rate * self.read_timeout:
            self._too_slow(
                FlightFailed(
                    504,
                    f"upstream too slow: {got} bytes in {self.read_timeout:g} s, "
                    f"under the minimum of {self.min_rate:g} bytes/s",
                )
            )
            return
        self._window_from = self._received()
        self._rate.start(self.read_timeout, self._check_rate)

    def _unwatch(self) -> None:
        self._idle.cancel()
        self._rate.cancel()

    def paused_for(self, why: str) -> bool:
        return why in self._paused

    def pause(self, why: str) -> bool:
        """
        Pause the upstream for C{why}; C{False} if it already was for it, or
        is gone.
        """
        if why in self._paused or self._transport is None:
            return False
        if not self._paused:
            self._unwatch()  # our own pause is not the upstream stalling
            self._transport.pauseProducing()
        self._paused.add(why)
        return True

    def unpause(self, why: str) -> None:
        """
        C{why} no longer holds: resume the upstream if nothing else does.
        """
        if why not in self._paused:
            return
        self._paused.discard(why)
        if not self._paused and self._transport is not None:
            self.watch()
            self._transport.resumeProducing()

    def ended(self) -> None:
        """
        The body ended: nothing to time or pause any more.
        """
        self._transport = None
        self._paused.clear()
        self._unwatch()

    def stop(self) -> None:
        """
        Drop the connection: stop downloading what nobody will get.
        """
        self._unwatch()
        if self._transport is not None:
            transport, self._transport = self._transport, None
            transport.stopProducing()

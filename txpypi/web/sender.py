"""
Sending a file's bytes to one client: L{Sender}, a push producer registered
on the client's request that reads a byte source (a flight's reader, or a
store's) at the client's pace; and L{abort_client}, the cut that a client
cannot take for the end of a body.
"""

from __future__ import annotations

import socket
import struct
from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.web.server import Request
from zope.interface import implementer

from txpypi.concurrency.waiters import Once
from txpypi.fetch.reader import FlightReader
from txpypi.fetch.wanted import ByteSource, FlightFailed
from txpypi.storage.outages import Unavailable

log = Logger(namespace="txpypi.download")

#: How much a sender reads from its source at once.
CHUNK = 256 * 1024


def abort_client(request: Request) -> None:
    """
    Cut a client off mid-body with a reset, not a FIN: a client reading a
    body without a length up to the end of the connection must not take the
    cut for the end.
    """
    transport: Any = request.channel.transport if request.channel else None
    if transport is None:
        return
    try:
        transport.getHandle().setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except (AttributeError, OSError):
        pass
    transport.abortConnection()


@implementer(IPushProducer)
class Sender:
    """
    Sends a byte source to one client, honouring the client's back-pressure.
    On a source failure the client's connection is aborted, so that it never
    mistakes a partial body for a whole one.
    """

    def __init__(
        self, request: Request, source: ByteSource, start: int = 0, end: int | None = None, first: bytes = b""
    ) -> None:
        """
        @param start: the first byte to send.
        @param end: the (exclusive) end of the bytes to send, or L{None} for
            the end of the source.
        @param first: the bytes from C{start} on that the caller already
            read (to be sure the source works before answering); sent first.
        """
        self._request = request
        self._source = source
        if isinstance(source, FlightReader):
            source.on_cut = self.abort
        self._paused = False
        self._resume: Deferred[None] | None = None
        self._pending: Deferred[bytes] | None = None
        self._stopped = False
        self._offset = start
        self._end = end
        self._first = first
        self.sent = 0
        self._over: Once[None] = Once()

    def when_done(self) -> Deferred[None]:
        """
        Fire when this sender is over, however it ended.
        """
        return self._over.wait()

    def start(self) -> Deferred[None]:
        self._request.registerProducer(self, True)
        self._request.notifyFinish().addErrback(lambda _: self.stopProducing())
        return Deferred.fromCoroutine(self._run())

    async def _run(self) -> None:
        try:
            await self._send()
        except CancelledError:
            self._stopped = True  # the request that runs us was cancelled: its client is gone
        except Exception as e:
            # The client has headers and part of the body: all we can do is
            # make sure it cannot mistake that part for the whole.
            if isinstance(e, Unavailable):
                # The store's outage is logged once, where it was found.
                log.info("cutting off a client: {error}", error=str(e))
            elif not isinstance(e, FlightFailed):
                log.failure("sending a file failed; aborting the client")
            self._stopped = True
            self._request.unregisterProducer()
            self._abort()
        finally:
            self._source.close()
        if not self._stopped:
            self._request.unregisterProducer()
            self._request.finish()
        self._over.happen(None)

    async def _send(self) -> None:
        first, self._first = self._first, b""
        if first:
            self._offset += len(first)
            self.sent += len(first)
            self._request.write(first)
        while not self._stopped:
            if self._paused:
                self._resume = Deferred()
                await self._resume
                continue
            length = CHUNK if self._end is None else min(CHUNK, self._end - self._offset)
            if length <= 0:
                break
            self._pending = self._source.read(self._offset, length)
            data = await self._pending
            self._pending = None
            if not data:
                if self._end is not None:
                    raise FlightFailed(502, "file ended before the range did")
                break
            self._offset += len(data)
            self.sent += len(data)
            self._request.write(data)

    def abort(self) -> None:
        """
        Drop the client's connection (at shutdown, past the grace period).
        """
        self.stopProducing()
        self._abort()

    def _abort(self) -> None:
        abort_client(self._request)

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        resume, self._resume = self._resume, None
        if resume is not None:
            resume.callback(None)

    def stopProducing(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        for d in (self._pending, self._resume):
            if d is not None and not d.called:
                d.cancel()


async def send_among(sender: Sender, senders: set[Sender]) -> None:
    """
    Send the body, kept in C{senders} while it does: the shutdown waits for
    those (and cuts off the ones still sending past its grace period).
    """
    senders.add(sender)
    try:
        await sender.start()
    finally:
        senders.discard(sender)

"""
Sending a file's bytes to one client: L{Sender}, a push producer registered
on the client's request that reads a byte source (a flight's reader, or a
store's) at the client's pace; L{SendfileSender} and L{PreadSender}, the
senders of a file on the local disk (with no Deferred per chunk), which
L{sender_for} picks; and L{abort_client}, the cut that a client cannot take
for the end of a body.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
from typing import Any

from twisted.internet import tcp
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.server import Request
from zope.interface import implementer

from txpypi.concurrency.waiters import Once
from txpypi.fetch.reader import FlightReader
from txpypi.fetch.wanted import ByteSource, FlightFailed
from txpypi.storage.outages import Unavailable
from txpypi.storage.stores import ILocalFile

log = Logger(namespace="txpypi.download")

#: How much a sender reads from its source at once.
CHUNK = 256 * 1024
#: How much a L{PreadSender} reads at once (one read per time the client's
#: transport asks for more).
LOCAL_CHUNK = 512 * 1024
#: The most one C{sendfile} call is asked for (the kernel sends what fits in
#: the socket's buffer); one call each time the socket is writable.
SENDFILE_CHUNK = 4 * 1024 * 1024
#: What C{sendfile} fails with when the client is gone.
_GONE = (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN, errno.ESHUTDOWN, errno.ECONNABORTED)


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


def plain_transport(request: Request) -> Any | None:
    """
    The client's transport when bytes may be written straight to its socket
    (a TCP or UNIX connection without TLS), else L{None}.
    """
    transport: Any = request.channel.transport if request.channel else None
    if isinstance(transport, tcp.Connection) and not transport.TLS:
        return transport
    return None


def from_spool(request: Request, source: ByteSource) -> bool:
    """
    Whether C{source} is a download in progress that goes to C{request}'s
    client from its spool file (L{SpoolSender}): its headers go at once,
    without waiting for its first bytes (a failure before them cuts the
    client off, as one after them does).
    """
    spooled = isinstance(source, FlightReader) and source.size is not None
    return spooled and plain_transport(request) is not None


def sender_for(
    request: Request, source: ByteSource, start: int = 0, end: int | None = None, first: bytes = b""
) -> Sender:
    """
    The sender of C{source} to C{request}'s client: a file on the local disk
    (L{ILocalFile}) goes by C{sendfile} over a plain connection
    (L{SendfileSender}) and by large synchronous reads over TLS
    (L{PreadSender}); a download in progress (a flight's reader) by
    C{sendfile} from its spool file over a plain connection
    (L{SpoolSender}); any other (an object store's, a flight's over TLS) by
    L{Sender}, a Deferred per read.
    """
    local = ILocalFile(source, None)
    if local is None and not isinstance(source, FlightReader):
        return Sender(request, source, start, end, first)
    # (Without a length the body is chunked, which sendfile cannot frame.)
    framed = request.responseHeaders.getRawHeaders(b"content-length") is not None
    if local is None:
        if not (framed and from_spool(request, source)):
            return Sender(request, source, start, end, first)
        assert isinstance(source, FlightReader) and source.size is not None
        stop = source.size if end is None else end
        return SpoolSender(request, source, plain_transport(request), stop, start, end, first)
    transport = plain_transport(request)
    if transport is None or not framed:
        return PreadSender(request, source, local.fd, local.size, start, end, first)
    return SendfileSender(request, source, local.fd, local.size, transport, start, end, first)


class LocalSender(Sender):
    """
    Sends a file on the local disk, by descriptor, with no Deferred per
    chunk: each time the client's transport asks for more
    (C{resumeProducing}), L{_step} sends bytes until the transport pauses
    this sender again.  Back-pressure, the range, the bookkeeping
    (C{sent}, the request's C{sentLength}) and the ends (finished, the
    client gone, a failure) are those of L{Sender}; the source is closed
    when the sender is over, whichever way.
    """

    def __init__(
        self,
        request: Request,
        source: ByteSource,
        fd: int,
        size: int,
        start: int = 0,
        end: int | None = None,
        first: bytes = b"",
    ) -> None:
        """
        @param fd: the file's descriptor, and C{size} its size.
        """
        super().__init__(request, source, start, end, first)
        self._fd: int = fd
        self._stop_at: int = size if end is None else end
        self._pumping = False

    def start(self) -> Deferred[None]:
        done = self.when_done()
        self._request.registerProducer(self, True)
        self._request.notifyFinish().addErrback(lambda _: self.stopProducing())
        if not self._stopped:
            first, self._first = self._first, b""
            self._begin(first)
            self._pump()
        return done

    def _begin(self, first: bytes) -> None:
        """
        Send the headers and the bytes the caller already read.
        """
        self._offset += len(first)
        self.sent += len(first)
        self._request.write(first)

    def _step(self) -> None:
        """
        Send some bytes from C{self._offset} on (or wait for the client).
        """
        raise NotImplementedError()

    def _pump(self) -> None:
        if self._pumping:
            return  # resumed while sending: the loop below goes on
        self._pumping = True
        try:
            while not (self._paused or self._stopped):
                if self._offset >= self._stop_at:
                    self._finish()
                    return
                self._step()
        except Exception as e:
            self._fail(e)
        finally:
            self._pumping = False

    def _finish(self) -> None:
        self._stopped = True
        self._request.unregisterProducer()
        self._request.finish()
        self._over_with()

    def _fail(self, error: Exception) -> None:
        """
        The client has headers and part of the body: cut it off, so that
        it cannot mistake that part for the whole.
        """
        if isinstance(error, FlightFailed):
            log.warn("cutting off a client: {error}", error=str(error))
        else:
            log.failure("sending a file failed; aborting the client")
        self._stopped = True
        self._request.unregisterProducer()
        self._over_with()
        self._abort()

    def _over_with(self) -> None:
        if not self._over.happened:
            self._source.close()
            self._over.happen(None)

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._pump()

    def stopProducing(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._over_with()


class PreadSender(LocalSender):
    """
    The fastest path Twisted allows where the bytes cannot go to the socket
    straight (TLS: they must be encrypted in this process): large
    synchronous C{pread}s, each written at once, until the transport's
    buffer is full and it pauses this sender.
    """

    def _step(self) -> None:
        length = min(LOCAL_CHUNK, self._stop_at - self._offset)
        data = os.pread(self._fd, length, self._offset)
        if not data:
            raise FlightFailed(502, "file ended before the range did")
        self._offset += len(data)
        self.sent += len(data)
        self._request.write(data)


class SendfileSender(LocalSender):
    """
    Sends the bytes from the file's descriptor straight into the client's
    socket with C{os.sendfile}, one call each time the socket is writable.

    The headers go through the transport as usual (L{Request.write}), and
    are flushed before the first C{sendfile}.  To wait until the socket is
    writable, the sender does what the transport does when its buffer is
    full: the transport's producer (the channel) is paused, which pauses
    this sender and starts the send timeout, and the transport is told to
    write; with nothing in its buffer, its next C{doWrite} (when the socket
    is writable) resumes the channel, which resumes this sender.  A client
    that takes no bytes wakes nothing up.  The socket is corked while the
    body goes, so the headers and the body share packets.
    """

    #: The system call (a seam for the tests, which count the calls).
    _sendfile = staticmethod(os.sendfile)

    def __init__(
        self,
        request: Request,
        source: ByteSource,
        fd: int,
        size: int,
        transport: Any,
        start: int = 0,
        end: int | None = None,
        first: bytes = b"",
    ) -> None:
        super().__init__(request, source, fd, size, start, end, first)
        self._transport = transport
        self._socket: socket.socket = transport.getHandle()

    def _begin(self, first: bytes) -> None:
        self._cork(True)
        super()._begin(first)
        transport = self._transport
        if _buffered(transport) and transport.doWrite() is not None:
            self._wait()  # the write failed: the transport will notice when writable

    def _step(self) -> None:
        transport = self._transport
        if _buffered(transport):
            self._wait()
            return
        self._send_from(self._fd, min(SENDFILE_CHUNK, self._stop_at - self._offset))

    def _send_from(self, fd: int, length: int) -> None:
        """
        One C{sendfile} of up to C{length} bytes of C{fd} at the offset.
        """
        transport = self._transport
        try:
            sent = self._sendfile(self._socket.fileno(), fd, self._offset, length)
        except BlockingIOError:
            self._wait()
            return
        except InterruptedError:
            return
        except OSError as e:
            if e.errno not in _GONE:
                raise
            self.stopProducing()
            transport.abortConnection()
            return
        if sent == 0:
            raise FlightFailed(502, "file ended before the range did")
        self._offset += sent
        self.sent += sent
        self._request.sentLength += sent
        self._moved()
        if self._offset < self._stop_at:
            self._wait()  # the socket took what it could; or let the other clients go first

    def _moved(self) -> None:
        """
        The client has the bytes before the offset.
        """

    def _wait(self) -> None:
        """
        Be resumed once the socket is writable (see the class's docstring).
        """
        transport = self._transport
        channel: Any = self._request.channel
        transport.producerPaused = True
        channel.pauseProducing()
        transport.startWriting()

    def _finish(self) -> None:
        self._cork(False)  # the body's last bytes go now
        super()._finish()

    def _over_with(self) -> None:
        if not self._over.happened:
            self._cork(False)
        super()._over_with()

    def _cork(self, on: bool) -> None:
        if hasattr(socket, "TCP_CORK"):
            try:
                self._socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, int(on))
            except OSError:
                pass  # not TCP (a UNIX socket), or closed


class SpoolSender(SendfileSender):
    """
    Sends a download in progress (a flight's reader) by C{sendfile} from
    its spool file, as its bytes land there: a herd's clients behind the
    download cost a system call per socket-full, not a read, a copy and a
    Deferred per chunk.  Bytes not in the file yet (at the download's edge,
    or all of the rest once the disk is full) are read the usual way, from
    memory or once they arrive, and written through the transport.  The
    flight's rules hold as for any reader: the last byte waits until the
    file is verified, and a failed download cuts the client off.
    """

    def __init__(
        self,
        request: Request,
        reader: FlightReader,
        transport: Any,
        stop: int,
        start: int = 0,
        end: int | None = None,
        first: bytes = b"",
    ) -> None:
        """
        @param stop: where the body ends (the range's end, or the file's size).
        """
        super().__init__(request, reader, -1, stop, transport, start, end, first)
        self._reader = reader

    def _step(self) -> None:
        transport = self._transport
        if _buffered(transport):
            self._wait()
            return
        if self._pending is not None:
            self._paused = True  # a read is under way: it resumes us
            return
        count, fd = self._reader.sendable(self._offset, self._stop_at)
        if count > 0:
            self._send_from(fd, min(SENDFILE_CHUNK, count))
        else:
            self._read_next()

    def _moved(self) -> None:
        self._reader.moved_to(self._offset)

    def _cork(self, on: bool) -> None:
        """
        Never corked: at the download's edge the sender waits for bytes,
        and a corked socket would hold what it has (the headers, say) back
        for up to 200 ms meanwhile.
        """

    def _read_next(self) -> None:
        """
        Read the next bytes the usual way (they are not in the file yet),
        pausing until they come.
        """
        self._paused = True
        length = min(CHUNK, self._stop_at - self._offset)
        pending = self._pending = self._reader.read(self._offset, length)
        pending.addCallbacks(self._read, self._read_failed)

    def _read(self, data: bytes) -> None:
        self._pending = None
        if self._stopped:
            return
        if not data:
            self._fail(FlightFailed(502, "file ended before the range did"))
            return
        self._offset += len(data)
        self.sent += len(data)
        self._request.write(data)
        self.resumeProducing()

    def _read_failed(self, failure: Failure) -> None:
        self._pending = None
        if self._stopped and failure.check(CancelledError):
            return
        if not self._stopped:
            self._fail(failure.value if isinstance(failure.value, Exception) else Exception(failure))

    def stopProducing(self) -> None:
        pending = self._pending
        super().stopProducing()
        if pending is not None and not pending.called:
            pending.cancel()


def _buffered(transport: Any) -> int:
    """
    How many bytes the transport holds that the socket has not taken yet.
    """
    buffered: int = len(transport.dataBuffer) - transport.offset + transport._tempDataLen
    return buffered


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

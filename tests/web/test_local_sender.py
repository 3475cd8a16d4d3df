"""
The senders of local files on a real L{Request} over a L{DummyChannel}:
which one L{sender_for} picks, and the C{pread} path's back-pressure and
ends (no real socket: the C{sendfile} path is tested over loopback in
L{tests.integration.test_sendfile}).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tests.web.test_sender import _request
from txpypi.storage.stores import FdReader
from txpypi.web.sender import LOCAL_CHUNK, PreadSender, Sender, sender_for


def _reader(tmp_path: Path, data: bytes) -> FdReader:
    path = tmp_path / "f"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    return FdReader(fd, len(data), "ab/f")


def _closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return True
    return False


def test_a_local_file_on_a_transport_without_a_socket_is_read_in_large_blocks(tmp_path: Path) -> None:
    """
    A local reader on a transport that is not a plain TCP one (TLS, or
    this test's) gets the pread path: one block per resume of the
    transport, nothing while it is paused, the range's bytes exactly, the
    reader closed and the request finished at the end.
    """
    data = os.urandom(3 * LOCAL_CHUNK + 10)
    reader = _reader(tmp_path, data)
    request, transport = _request()
    request.setHeader(b"content-length", b"%d" % (len(data) - 5))
    sender = sender_for(request, reader, 5)
    assert type(sender) is PreadSender
    steps: list[int] = []

    def write(chunk: bytes) -> None:  # the transport: full after each block
        steps.append(len(chunk))
        if chunk:
            sender.pauseProducing()

    request.write = write  # type: ignore[method-assign]
    body = []
    real_step = sender._step

    def step() -> None:
        before = sender._offset
        real_step()
        body.append(data[before : sender._offset])

    sender._step = step  # type: ignore[method-assign]
    done = sender.start()
    assert steps == [0, LOCAL_CHUNK]  # the headers, then one block, then paused
    sender.resumeProducing()
    sender.resumeProducing()
    assert not done.called
    sender.resumeProducing()
    assert not done.called
    sender.resumeProducing()
    assert done.called and request.finished
    assert steps[:5] == [0, LOCAL_CHUNK, LOCAL_CHUNK, LOCAL_CHUNK, 5]  # (then finish's own write)
    assert b"".join(body) == data[5:] and sender.sent == len(data) - 5
    assert _closed(reader.fd)
    del transport


def test_a_local_sender_stopped_closes_its_file(tmp_path: Path) -> None:
    """
    A client that leaves mid-file stops the sender: over, the descriptor
    closed, the request not finished.
    """
    reader = _reader(tmp_path, os.urandom(2 * LOCAL_CHUNK))
    request, _ = _request()
    request.setHeader(b"content-length", b"%d" % (2 * LOCAL_CHUNK))
    sender = sender_for(request, reader)
    request.write = lambda chunk: chunk and sender.pauseProducing()  # type: ignore[method-assign]
    done = sender.start()
    assert not done.called
    sender.stopProducing()
    assert done.called and not request.finished and _closed(reader.fd)
    sender.resumeProducing()  # after the end: nothing more is read
    assert sender.sent == LOCAL_CHUNK


def test_other_sources_keep_the_deferred_path(tmp_path: Path) -> None:
    """
    A source that is not a local file keeps L{Sender}.
    """

    class Remote:
        size = 3

        def read(self, offset: int, length: int) -> Any:
            raise NotImplementedError

        def close(self) -> None:
            pass

    request, _ = _request()
    assert type(sender_for(request, Remote())) is Sender

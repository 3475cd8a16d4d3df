"""
Freeing what the store already has: while a big file streams into a store
that takes it as it downloads (S3), the spool's prefix that the upload has
and every client has read is freed (a hole punched in the file,
L{PunchPolicy.step} bytes at a time), so that the file is never held whole
on local disk.  Clients that come later wait for the file to land and read
it from the store.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import attrs
from twisted.logger import Logger
from twisted.python.failure import Failure

from txpypi.concurrency.waiters import Progress
from txpypi.fetch.spool import Spool
from txpypi.storage.stores import IUpload

log = Logger(namespace="txpypi.download")

#: C{punch(fd, offset, length)}: free a range of a file, keeping its size.
PunchHole = Callable[[int, int, int], None]

#: Files at least this big are punched...
PUNCH_MIN = 64 * 1024 * 1024
#: ...this many bytes at a time.
PUNCH_STEP = 8 * 1024 * 1024


def find_punch_hole() -> PunchHole | None:
    """
    C{punch(fd, offset, length)}: free a range of a file, keeping its size
    (Linux C{fallocate} with C{FALLOC_FL_PUNCH_HOLE}), or L{None} where
    there is no such call.
    """
    import ctypes
    import ctypes.util
    import sys

    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fallocate = libc.fallocate
    except (OSError, AttributeError):
        return None
    fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
    fallocate.restype = ctypes.c_int
    keep_size_punch_hole = 0x01 | 0x02

    def punch(fd: int, offset: int, length: int) -> None:
        if fallocate(fd, keep_size_punch_hole, offset, length) != 0:
            error = ctypes.get_errno()
            raise OSError(error, os.strerror(error))

    return punch


#: The way to free a range of a spool file here, if there is one: found
#: once, and the default of every flight's C{punch}.
PUNCH_HOLE: PunchHole | None = find_punch_hole()


@attrs.frozen
class PunchPolicy:
    """
    Which files are punched (at least C{min_size} bytes), and how much at a
    time (C{step} bytes).
    """

    min_size: int = PUNCH_MIN
    step: int = PUNCH_STEP


@attrs.define(eq=False)
class Puncher:
    """
    Frees one spool's prefix in step with the store's upload and the
    spool's slowest reader.
    """

    #: How the spool's freed prefix is punched out (L{None}: it cannot be;
    #: set to L{None} for this file alone when it fails).
    punch: PunchHole | None
    policy: PunchPolicy
    _filename: str
    #: Called whenever a punch returned or the upload moved: look again.
    _again: Callable[[], None]
    #: A punch is running.
    busy: bool = False
    #: Waiting for the upload to send more before looking again.
    _awaiting_upload: bool = False
    #: How many of the spool's first bytes are freed.
    freed: Progress = attrs.field(factory=Progress)
    #: Reads before this offset fail: it is being freed, or is.
    floor: int = 0
    #: Whether a client may still join: not once the spool's start is freed.
    joinable: bool = True

    def consider(self, upload: IUpload, spool: Spool, size: int, lowest: int) -> None:
        """
        Free the prefix that C{upload} has and every reader (the slowest at
        C{lowest}) has read, once it is a step long.
        """
        if self.punch is None or self.busy or not spool.writable or size < self.policy.min_size:
            return
        step = self.policy.step
        reachable = min(lowest, spool.spooled)
        upto = min(upload.sent, reachable)
        upto -= upto % step
        if upto - self.freed.value < step:
            if upload.sent < reachable - reachable % step and not self._awaiting_upload:
                # The upload is what holds us back: look again when it moved.
                self._awaiting_upload = True
                upload.wait_sent(self.freed.value + step).addBoth(self._upload_moved)
            return
        self.joinable = False  # a new client could not read from the start
        self.busy = True
        self.floor = upto
        start = self.freed.value
        d = spool.on_writer(self.punch, start, upto - start)
        d.addCallbacks(self._punched_to, self._failed, callbackArgs=(upto,))

    def _upload_moved(self, _: object) -> None:
        self._awaiting_upload = False
        self._again()

    def _punched_to(self, _: None, upto: int) -> None:
        self.busy = False
        self.freed.advance(upto)
        self._again()

    def _failed(self, failure: Failure) -> None:
        self.busy = False
        self.floor = self.freed.value
        if self.freed.value == 0:
            self.joinable = True  # nothing was freed: a new client can read from the start
        self.punch = None  # not for this file again; the spool keeps it whole until it lands
        if failure.check(OSError):
            log.info(
                "cannot free parts of the spool of {filename} ({error}); keeping it whole until it lands",
                filename=self._filename,
                error=failure.value,
            )
        else:
            log.failure("freeing part of a spool file failed", failure)
        self._again()

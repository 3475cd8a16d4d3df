"""
Locks that the worker processes of one machine share: one small file per
name under the cache directory, held with C{flock}.  The kernel lets go of
a dead process's locks at once, so nothing here expires and nothing is
renewed; the holder's name is written in the file for the others to read
(to follow its download).

The calls are a few system calls on a local file that never wait (the
locks are taken with C{LOCK_NB}), made on the calling thread as local file
reads are (see L{txpypi.storage.stores.FdReader}).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
from pathlib import Path

import attrs
from twisted.internet.defer import Deferred, succeed


@attrs.define
class FileLocks:
    """
    Named locks, each a file in C{directory} (the same interface as
    L{txpypi.storage.redismeta.RedisLocks}; the TTLs are not needed).
    """

    directory: Path
    #: What the holder writes in the lock file (see L{txpypi.core.peer.owner_id}).
    owner: str = attrs.field(repr=False)
    #: The descriptor that holds each lock held here, by name.
    _held: dict[str, int] = attrs.field(factory=dict)

    def _path(self, name: str) -> Path:
        # Names are file keys and fixed names: hashed, they never leave the directory.
        return self.directory / hashlib.sha256(name.encode()).hexdigest()[:40]

    def _acquire(self, name: str) -> bool:
        if name in self._held:
            return False
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self._path(name)
        for _ in range(3):
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                return False
            # Its last holder removes the file as it lets go: a lock taken
            # on a file no longer at the path holds nothing.
            try:
                same = os.stat(path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, self.owner.encode(), 0)
                self._held[name] = fd
                return True
            os.close(fd)
        return False

    def acquire(self, name: str, ttl: float = 0.0) -> Deferred[bool]:
        """
        Take C{name}; C{False} if it is held (here or by another process).
        """
        return succeed(self._acquire(name))

    def renew(self, name: str, ttl: float = 0.0) -> Deferred[bool]:
        """
        Whether C{name} is still held here (a lock here never expires).
        """
        return succeed(name in self._held)

    def release(self, name: str) -> Deferred[None]:
        fd = self._held.pop(name, None)
        if fd is not None:
            try:
                os.unlink(self._path(name))
            except FileNotFoundError:
                pass
            os.close(fd)  # and with it the lock
        return succeed(None)

    def holder(self, name: str) -> Deferred[str | None]:
        """
        Who holds C{name}, as its holder wrote it, or L{None}.
        """
        try:
            with open(self._path(name), "rb") as f:
                text = f.read(4096).decode("utf-8", "replace")
        except FileNotFoundError:
            return succeed(None)
        return succeed(text or None)

    def release_all(self) -> None:
        """
        Let go of every lock held here (at shutdown).
        """
        for name in list(self._held):
            self.release(name)

"""
Locks that the worker processes of one machine share: one small file per
name under the cache directory, held with C{flock}.  The kernel lets go of
a dead process's locks at once, so nothing here expires and nothing is
renewed; the holder's name is written in the file for the others to read
(to follow its download), and under it the holder's note of where it
spools the download (see L{txpypi.fetch.tail}).

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

    def _text(self, name: str) -> str | None:
        try:
            with open(self._path(name), "rb") as f:
                return f.read(4096).decode("utf-8", "replace")
        except FileNotFoundError:
            return None

    def holder(self, name: str) -> Deferred[str | None]:
        """
        Who holds C{name}, as its holder wrote it, or L{None}.
        """
        text = self._text(name)
        return succeed(text.split("\n", 1)[0] or None if text is not None else None)

    def note(self, name: str, text: str) -> None:
        """
        Write C{text} under the holder's name in the file of C{name}, if it
        is held here (in one write that only adds to what is there: a
        reader sees the name whole, and the note whole or in part).
        """
        fd = self._held.get(name)
        if fd is not None:
            os.pwrite(fd, f"{self.owner}\n{text}".encode(), 0)

    def notes(self, name: str) -> str | None:
        """
        The note under the holder's name in the file of C{name}: C{""}
        while there is none, L{None} once nobody holds it (let go, or its
        holder died: the kernel let go of its lock, not of its file).

        Telling a dead holder from a live one takes the lock shared for an
        instant: a worker that tries to take it in that instant is told it
        is held, follows, hears from here that nobody holds it, and looks
        again.
        """
        try:
            fd = os.open(self._path(name), os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                text = os.pread(fd, 4096, 0).decode("utf-8", "replace")
            else:
                return None  # nobody holds it (closing the descriptor lets go again)
        finally:
            os.close(fd)
        if not text:
            return None
        return text.split("\n", 1)[1] if "\n" in text else ""

    def release_all(self) -> None:
        """
        Let go of every lock held here (at shutdown).
        """
        for name in list(self._held):
            self.release(name)

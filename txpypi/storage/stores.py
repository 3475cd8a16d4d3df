"""
File stores: where verified files live.

A store receives a finished, verified spool file and makes it durable under a
key; later it hands out readers for that key.  Stores are pluggable behind
L{IFileStore}; L{DiskStore} is the default.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from zope.interface import Attribute, Interface, implementer

from txpypi.core.names import BadName


class IFileReader(Interface):
    """
    Random access to one stored file.
    """

    size = Attribute("The file's length in bytes.")

    def read(offset: int, length: int) -> Deferred[bytes]:
        """
        Read up to C{length} bytes at C{offset}; C{b""} at the end.
        """

    def close() -> None:
        """
        Release the reader.
        """


class IRedirectable(Interface):
    """
    A reader whose bytes a client may fetch itself, straight from the store
    (an object store's presigned URL).
    """

    def url(ttl: float) -> Deferred[str]:
        """
        A URL that answers a GET (honouring C{Range}) with the file's bytes
        for C{ttl} seconds.
        """


class ILocalFile(Interface):
    """
    A reader of a file on the local disk, by an open descriptor: its bytes
    may go to a socket with C{sendfile}, or be sent by a web server in
    front that reads the same directory (C{X-Accel-Redirect}).
    """

    fd = Attribute("The open descriptor (the reader's own: L{IFileReader.close} closes it).")
    size = Attribute("The file's length in bytes.")
    key = Attribute("The store key, a path relative to the store's C{files/} directory.")


class IProbed(Interface):
    """
    A store that can tell whether it can serve (for outage probes).
    """

    def probe() -> Deferred[None]:
        """
        Fail unless the store can serve: read a known object, say.
        """


class IFileStore(Interface):
    """
    A place that keeps verified files by key.
    """

    spool_dir = Attribute("A local directory for temporary spool files, on the same file system.")

    def commit(spool_path: str, key: str) -> Deferred[None]:
        """
        Make the finished spool file at C{spool_path} durable under C{key}.
        The spool file is consumed.
        """

    def open(key: str) -> Deferred[IFileReader | None]:
        """
        Open the file stored under C{key}, or L{None} when there is none.
        """

    def delete(key: str) -> Deferred[None]:
        """
        Forget the file stored under C{key}, if any.
        """


class IUpload(Interface):
    """
    One file going into a store while its spool file is still being
    written.  Every upload ends with exactly one of L{complete} or
    L{abort}.
    """

    sent = Attribute("How many of the file's first bytes the store has (and no longer needs from the spool).")

    def spooled(length: int) -> None:
        """
        The spool file now holds the file's first C{length} bytes.
        """

    def wait_sent(length: int) -> Deferred[None]:
        """
        Fire once the store has the file's first C{length} bytes (or the
        upload is over).
        """

    def complete(length: int) -> Deferred[None]:
        """
        The file is whole (C{length} bytes) and verified: make it visible
        under its key.  The spool file is consumed.  On failure (L{UploadFailed}
        when the bytes are not the file, or the upload is already over)
        nothing is visible and nothing is left behind in the store.
        """

    def abort() -> Deferred[None]:
        """
        Give up: nothing becomes visible, and what was sent is removed.  The
        spool file is left to the caller.  Never fails (errors are logged).
        """


class UploadFailed(Exception):
    """
    A streaming upload could not be completed.
    """


class IStreamingUpload(Interface):
    """
    A store that can take a file while it downloads, when its key is known
    up front (from the sha256 that the index listed).
    """

    def start_upload(spool_path: str, key: str, sha256: str) -> IUpload:
        """
        Start taking the file being spooled at C{spool_path}, to be stored
        under C{key}; it is made visible only if the bytes read back from
        the spool have C{sha256}.
        """


def file_key(sha256: str, filename: str) -> str:
    """
    The store key for a verified file: content-addressed, with the file name
    kept for people reading the directory.
    """
    return f"{sha256[:2]}/{sha256}/{filename}"


@implementer(IFileReader, ILocalFile)
@attrs.define
class FdReader:
    """
    Reads a local file by descriptor with C{pread}, so that many readers may
    share one descriptor.  Reads of local files run on the calling thread, as
    in twisted.web.static.File: they hit the page cache and do not wait on
    the network.  The sender may also send it with C{sendfile} (see
    L{ILocalFile}).
    """

    fd: int
    size: int
    #: The store key it was opened under (C{""} when it has none).
    key: str = ""
    _closed: bool = False

    def read(self, offset: int, length: int) -> Deferred[bytes]:
        return succeed(os.pread(self.fd, min(length, max(0, self.size - offset)), offset))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            os.close(self.fd)


@implementer(IFileStore)
@attrs.define
class DiskStore:
    """
    Files under a root directory.  Commits fsync the file and rename it into
    place, in a thread pool; nothing is ever read or written outside C{root}.
    """

    root: Path
    _pool: ThreadPool
    _reactor: object
    #: Where spool files are written (C{<root>/tmp} by default; a worker
    #: process has its own, see L{txpypi.tap.spool_dir}).
    spool: str | None = None
    _files: str | None = attrs.field(default=None, init=False, repr=False)

    @property
    def spool_dir(self) -> str:
        return str(self.root / "tmp") if self.spool is None else self.spool

    def prepare(self) -> None:
        """
        Create the directories and remove spool files that a crash left.
        Called once at start-up, before the reactor serves requests.
        """
        (self.root / "files").mkdir(parents=True, exist_ok=True)
        spool = Path(self.spool_dir)
        shutil.rmtree(spool, ignore_errors=True)
        spool.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str, resolved: bool = False) -> str:
        """
        The file of C{key}, worked out by hand, not by the file system: a
        hit does no system call for it (resolving the path took a fifth of
        a hit's time).  The store's own directory is resolved once; a key
        that would lead out of it (C{..}, an absolute path, a NUL) is a
        L{BadName}.  With C{resolved} (for writing and removing, in the
        thread pool), symbolic links are followed too, and one that leads
        out of the store is a L{BadName}: a read follows a link only that
        someone who may write the cache directory put there.
        """
        files = self._files
        if files is None:
            files = self._files = os.path.realpath(self.root / "files")
        path = os.path.normpath(os.path.join(files, key))
        if "\0" in key or os.path.isabs(key) or not path.startswith(files + os.sep):
            raise BadName(f"store key escapes the store: {key!r}")
        if resolved and not os.path.realpath(path).startswith(files + os.sep):
            raise BadName(f"store key escapes the store: {key!r}")
        return path

    def _commit(self, spool_path: str, key: str) -> None:
        target = Path(self._path(key, resolved=True))
        target.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(spool_path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            os.replace(spool_path, target)
        except OSError as e:
            if e.errno != errno.EXDEV:
                raise
            shutil.move(spool_path, target)
        dir_fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)

    def commit(self, spool_path: str, key: str) -> Deferred[None]:
        return deferToThreadPool(self._reactor, self._pool, self._commit, spool_path, key)  # type: ignore[arg-type]

    def open(self, key: str) -> Deferred[IFileReader | None]:
        return succeed(self.open_now(key))

    def open_now(self, key: str) -> FdReader | None:
        """
        Open the file of C{key} at once (a local file: see L{FdReader}), or
        L{None} when there is none.
        """
        try:
            fd = os.open(self._path(key), os.O_RDONLY)
        except FileNotFoundError:
            return None
        return FdReader(fd, os.fstat(fd).st_size, key)

    def _delete(self, key: str) -> None:
        path = Path(self._path(key, resolved=True))
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        try:
            path.parent.rmdir()  # files/aa/<sha256>/ holds one file
        except OSError:
            pass

    def delete(self, key: str) -> Deferred[None]:
        return deferToThreadPool(self._reactor, self._pool, self._delete, key)  # type: ignore[arg-type]

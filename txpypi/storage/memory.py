"""
Stores in memory: a file store in a dictionary (its spool directory on
disk, since flights spool to real files), and its readers.  For tests and
for trying things out; the contract tests run them against the same
suites as the disk and S3 stores.
"""

from __future__ import annotations

import hashlib
import os

import attrs
from twisted.internet.defer import Deferred, fail, succeed
from zope.interface import implementer

from txpypi.concurrency.waiters import Progress
from txpypi.storage.stores import IFileReader, IFileStore, IStreamingUpload, IUpload, UploadFailed


@implementer(IFileReader)
@attrs.define
class BytesReader:
    """
    A reader of bytes in memory.
    """

    data: bytes

    @property
    def size(self) -> int:
        return len(self.data)

    def read(self, offset: int, length: int) -> Deferred[bytes]:
        return succeed(self.data[offset : offset + length])

    def close(self) -> None:
        pass


@implementer(IFileReader)
@attrs.define
class FailingReader:
    """
    A reader of a file that exists but cannot be read.
    """

    size: int

    def read(self, offset: int, length: int) -> Deferred[bytes]:
        return fail(OSError("injected: the store cannot read this object"))

    def close(self) -> None:
        pass


@implementer(IFileStore)
@attrs.define
class MemoryStore:
    """
    A file store in a dictionary, with its spool directory on disk (flights
    spool to real files).
    """

    spool_dir: str
    files: dict[str, bytes] = attrs.field(factory=dict)
    #: Files open, but every read fails (as an object store whose gateway
    #: answers while its volume servers are down).
    failing_reads: bool = False

    def commit(self, spool_path: str, key: str) -> Deferred[None]:
        with open(spool_path, "rb") as f:
            self.files[key] = f.read()
        os.unlink(spool_path)
        return succeed(None)

    def open(self, key: str) -> Deferred[IFileReader | None]:
        data = self.files.get(key)
        if data is not None and self.failing_reads:
            return succeed(FailingReader(len(data)))
        return succeed(None if data is None else BytesReader(data))

    def delete(self, key: str) -> Deferred[None]:
        self.files.pop(key, None)
        return succeed(None)


@implementer(IUpload)
@attrs.define(eq=False)
class MemoryUpload:
    """
    One file going into a L{MemoryStreamingStore} while it is spooled: the
    store "has" every byte spooled so far (C{sent} follows C{spooled}), and
    the file becomes visible only at L{complete}, if its bytes, read back
    from the spool, have the sha256 it was started with.
    """

    _store: MemoryStreamingStore
    _spool_path: str
    _key: str
    _sha256: str
    _progress: Progress = attrs.field(factory=Progress)
    _over: bool = False

    @property
    def sent(self) -> int:
        return self._progress.value

    def spooled(self, length: int) -> None:
        if not self._over and length > self._progress.value:
            self._progress.advance(length)

    def wait_sent(self, length: int) -> Deferred[None]:
        return self._progress.wait(length)

    def complete(self, length: int) -> Deferred[None]:
        if self._over:
            return fail(UploadFailed(f"the upload of {self._key} is already over"))
        self._over = True
        with open(self._spool_path, "rb") as f:
            data = f.read(length)
        if len(data) != length or hashlib.sha256(data).hexdigest() != self._sha256:
            return fail(UploadFailed(f"the bytes of {self._key} do not have its sha256"))
        self._store.files[self._key] = data
        os.unlink(self._spool_path)
        self._progress.advance(length)
        return succeed(None)

    def abort(self) -> Deferred[None]:
        self._over = True
        return succeed(None)


@implementer(IStreamingUpload)
@attrs.define
class MemoryStreamingStore(MemoryStore):
    """
    A L{MemoryStore} that also takes files while they download
    (L{IStreamingUpload}), as the S3 store does.
    """

    def start_upload(self, spool_path: str, key: str, sha256: str) -> IUpload:
        return MemoryUpload(self, spool_path, key, sha256)

"""
A file store in S3 (or an S3-compatible server), on boto3.

boto3 blocks, so every call runs on a dedicated, bounded thread pool that a
service starts and stops, never on the reactor thread and never on a pool
shared with other blocking work.  One client, made from an explicit
Session, is shared by those threads (boto3 clients are thread-safe).
Credentials come from boto3's standard chain (environment, profile,
instance role), never from the command line.

A file becomes visible in S3 only once it is verified.  When the index
listed its sha256, its key is known before the download starts, and an
L{S3Upload} sends it as a multipart upload while it downloads: each part is
read back from the spool once the spool holds it, and the upload is
completed only after the download is verified (and the bytes read back have
the expected sha256), or aborted, leaving nothing.  Without a sha256 the
verified spool file is uploaded afterwards (L{S3Store.commit}).
"""

from __future__ import annotations

import hashlib
import os
import threading
from typing import Any

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from txpypi.concurrency.waiters import Once, Progress
from txpypi.storage.stores import (
    IFileReader,
    IFileStore,
    IProbed,
    IRedirectable,
    IStreamingUpload,
    IUpload,
    UploadFailed,
)

log = Logger(namespace="txpypi.s3store")

#: The size of the parts of a multipart upload (S3 wants at least 5 MiB for
#: all but the last).  One part at a time is held in memory per upload.
PART_SIZE = 8 * 1024 * 1024


def make_client(endpoint_url: str | None, region: str | None, timeout: float = 10.0) -> Any:
    """
    A boto3 S3 client from an explicit Session.  Its calls are bounded: a
    connection or an answer that takes over C{timeout} seconds fails, and a
    failed call is tried once more (boto3's own default tries 5 times over
    60 s timeouts, that is minutes of a thread and a client waiting for an
    S3 that is down).
    """
    import boto3
    from botocore.config import Config

    session = boto3.session.Session()
    return session.client(
        "s3",
        endpoint_url=endpoint_url,
        region_name=region,
        config=Config(
            connect_timeout=timeout,
            read_timeout=timeout,
            retries={"total_max_attempts": 2, "mode": "standard"},
            signature_version="s3v4",  # presigned URLs too: SigV2 is not accepted everywhere
            max_pool_connections=32,
        ),
    )


@implementer(IFileReader, IRedirectable)
@attrs.define
class S3Reader:
    """
    Reads one object on the S3 pool: a first read is one ranged GET of just
    the bytes asked for (a client's small C{Range}); a read that goes on
    where the last one ended opens one GET to the end of the object and
    keeps reading its body, a chunk per read, at the client's pace.  Or a
    presigned URL for a client to GET the object itself.
    """

    _store: S3Store
    _key: str
    size: int
    #: Guards the fields below, which only pool threads touch: a client
    #: that leaves closes its reader while a read may still run.
    _lock: threading.Lock = attrs.field(factory=threading.Lock)
    _body: Any = None
    #: Where the open body, or else the last read, stands.
    _at: int = -1
    _closed: bool = False

    def read(self, offset: int, length: int) -> Deferred[bytes]:
        if offset >= self.size or length <= 0:
            return succeed(b"")
        return self._store.run(self._read, offset, min(self.size, offset + length))

    def _read(self, offset: int, end: int) -> bytes:
        with self._lock:
            if self._closed:
                raise OSError("the S3 reader is closed")  # its client left
            if self._body is not None and self._at == offset:
                try:
                    data = _read_exactly(self._body, end - offset)
                except Exception as e:
                    # An idle connection may have been dropped under a slow
                    # client: start again from here, once.
                    log.info("S3 body of {key} failed ({error}); reopening", key=self._key, error=repr(e))
                    self._drop_body()
                else:
                    self._at = end
                    return data
            sequential = offset == self._at
            self._drop_body()
            last = self.size - 1 if sequential else end - 1
            body, whole = self._store.get_body(self._key, offset, last)
            try:
                data = _read_exactly(body, end - offset)
            except BaseException:
                body.close()
                raise
            # A whole object (a server that ignores Range answers a read from
            # 0 so) is a body from here to the end, as a sequential one is.
            if (sequential or whole) and end < self.size:
                self._body = body
            else:
                body.close()
            self._at = end
            return data

    def _drop_body(self) -> None:
        if self._body is not None:
            self._body.close()
            self._body = None

    def url(self, ttl: float) -> Deferred[str]:
        return self._store.run(self._store.presign, self._key, ttl)

    def _close(self) -> None:
        with self._lock:
            self._closed = True
            self._drop_body()

    def close(self) -> None:
        # On the pool: a read may hold the lock, and closing a body is I/O.
        self._store.run(self._close).addErrback(
            lambda f: log.failure("closing an S3 body of {key} failed", f, key=self._key)
        )


def _read_exactly(body: Any, length: int) -> bytes:
    """
    C{length} bytes from a streaming body.

    @raise OSError: if it ends first.
    """
    chunks = []
    got = 0
    while got < length:
        chunk = body.read(length - got)
        if not chunk:
            raise OSError(f"the S3 body ended {length - got} bytes short")
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


#: The object the store's health probe reads (and writes, once).
PROBE_KEY = "txpypi-probe/ok"
PROBE_BODY = b"txpypi can read this store\n"


def check_range(answer: dict[str, Any], first: int, last: int) -> None:
    """
    Check that a GET answer holds bytes C{first} to C{last}: a C{206} whose
    C{Content-Range} says so, or a whole-object C{200} for a range from 0.

    @raise OSError: if it does not.
    """
    status = answer.get("ResponseMetadata", {}).get("HTTPStatusCode")
    content_range = answer.get("ContentRange")
    if status == 206 and isinstance(content_range, str):
        unit, _, spec = content_range.partition(" ")
        got, _, _total = spec.partition("/")
        if unit == "bytes" and got == f"{first}-{last}":
            return
    elif status == 200 and first == 0 and content_range is None:
        return  # the whole object: its first bytes are the ones asked for
    raise OSError(f"S3 answered {status} ({content_range or 'no Content-Range'}) for bytes {first}-{last}")


@implementer(IUpload)
@attrs.define(eq=False)
class S3Upload:
    """
    One object uploaded while its spool file grows.  The multipart upload is
    created once a whole part is spooled (a file smaller than a part is one
    PUT at the end); parts go one at a time, each read from the spool with
    C{pread} on the S3 pool.  All state lives on the reactor thread.
    """

    _store: S3Store
    _spool_path: str
    _key: str
    _sha256: str
    _fd: int
    part_size: int = PART_SIZE
    #: Bytes in parts that S3 has acknowledged.
    _spooled: int = 0
    _final: bool = False
    _state: str = "open"  # then "completed" or "aborted"
    _upload_id: str | None = None
    _parts: list[dict[str, Any]] = attrs.field(factory=list)
    #: The part sender at work, if it is.
    _pump: Once[None] | None = None
    _error: Exception | None = None
    #: sha256 of the bytes read back so far; only touched by the one pool
    #: thread that runs this upload's current step.
    _hash: Any = attrs.field(factory=hashlib.sha256)
    _progress: Progress = attrs.field(factory=Progress)

    # -- IUpload

    def spooled(self, length: int) -> None:
        self._spooled = max(self._spooled, length)
        self._kick()

    def complete(self, length: int) -> Deferred[None]:
        return Deferred.fromCoroutine(self._complete(length))

    def abort(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._abort())

    # -- progress, for whoever wants to watch

    @property
    def upload_id(self) -> str | None:
        return self._upload_id

    def wait_sent(self, length: int) -> Deferred[None]:
        """
        Fire once at least C{length} bytes are in acknowledged parts.
        """
        return self._progress.wait(length)

    @property
    def sent(self) -> int:
        """
        Bytes in parts that S3 has acknowledged.
        """
        return self._progress.value

    # -- the work

    def _ready(self) -> bool:
        waiting = self._spooled - self.sent
        return waiting >= self.part_size or (self._final and waiting > 0)

    def _kick(self) -> None:
        if self._pump is None and self._state == "open" and self._error is None and self._ready():
            pumping = self._pump = Once()  # _send_parts clears it when it ends

            def over(result: object) -> object:
                pumping.happen(None)
                return result

            Deferred.fromCoroutine(self._send_parts()).addBoth(over)

    async def _send_parts(self) -> None:
        store = self._store
        try:
            while self._state == "open" and self._ready():
                if self._upload_id is None:
                    self._upload_id = await store.run(store.create_multipart, self._key)
                length = min(self.part_size, self._spooled - self.sent)
                number = len(self._parts) + 1
                etag = await store.run(
                    store.upload_part,
                    self._key,
                    self._upload_id,
                    number,
                    self._fd,
                    self.sent,
                    length,
                    self._hash,
                )
                self._parts.append({"PartNumber": number, "ETag": etag})
                self._progress.advance(self.sent + length)
        except Exception as e:
            # Kept for complete() to report; the parts sent so far go with
            # the abort that follows.
            self._error = e
            log.error("uploading {key} to S3 failed: {error}", key=self._key, error=repr(e))
        finally:
            self._pump = None

    def _pump_over(self) -> Deferred[None]:
        return succeed(None) if self._pump is None else self._pump.wait()

    async def _complete(self, length: int) -> None:
        if self._state != "open":
            raise UploadFailed(f"the upload of {self._key} is already {self._state}")
        store = self._store
        self._final = True
        self._spooled = length
        try:
            await self._pump_over()
            if self._error is None and self._upload_id is None and length <= self.part_size:
                await store.run(
                    store.put_small, self._key, self._fd, length, self._hash, self._sha256, self._spool_path
                )
            else:
                self._kick()
                await self._pump_over()
                if self._error is not None:
                    raise UploadFailed(f"uploading {self._key} failed: {self._error!r}")
                if self.sent != length:
                    raise UploadFailed(f"sent {self.sent} of {length} bytes of {self._key}")
                assert self._upload_id is not None
                await store.run(
                    store.complete_multipart,
                    self._key,
                    self._upload_id,
                    self._parts,
                    self._hash,
                    self._sha256,
                    self._spool_path,
                )
        except BaseException:
            await self._abort()
            raise
        self._state = "completed"
        self._close()

    async def _abort(self) -> None:
        if self._state != "open":
            return
        self._state = "aborted"
        await self._pump_over()
        self._close()
        if self._upload_id is not None:
            try:
                await self._store.run(self._store.abort_multipart, self._key, self._upload_id)
            except Exception as e:
                log.error(
                    "could not abort the S3 upload of {key} ({upload_id}): {error}",
                    key=self._key,
                    upload_id=self._upload_id,
                    error=repr(e),
                )
        self._progress.fail(UploadFailed(f"the upload of {self._key} was aborted"))

    def _close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


@implementer(IFileStore, IStreamingUpload, IProbed)
@attrs.define
class S3Store:
    """
    Files as objects under C{prefix} in C{bucket}.
    """

    client: Any
    bucket: str
    prefix: str
    spool_dir: str
    _pool: ThreadPool
    _reactor: IReactorFromThreads
    _presigner: Any = None
    _presigner_lock: threading.Lock = attrs.field(factory=threading.Lock)
    part_size: int = PART_SIZE

    def _object(self, key: str) -> str:
        return f"{self.prefix.strip('/')}/{key}" if self.prefix.strip("/") else key

    def run(self, f: Any, *args: Any) -> Deferred[Any]:
        """
        Run a blocking call on the S3 pool.  The store's blocking methods
        (L{get_body}, L{create_multipart}, L{upload_part},
        L{complete_multipart}, L{put_small}, L{abort_multipart},
        L{presign}) are public so that its reader and upload can run them
        here; nothing may call them on the reactor thread.
        """
        return deferToThreadPool(self._reactor, self._pool, f, *args)

    def _upload(self, spool_path: str, key: str) -> None:
        import os

        self.client.upload_file(spool_path, self.bucket, self._object(key))
        os.unlink(spool_path)

    def commit(self, spool_path: str, key: str) -> Deferred[None]:
        return self.run(self._upload, spool_path, key)

    def start_upload(self, spool_path: str, key: str, sha256: str) -> IUpload:
        fd = os.open(spool_path, os.O_RDONLY)  # local, like the flight's own
        return S3Upload(self, spool_path, self._object(key), sha256, fd, self.part_size)

    # The steps of an S3Upload, each on the S3 pool.  Keys are object names.

    def create_multipart(self, name: str) -> str:
        answer = self.client.create_multipart_upload(Bucket=self.bucket, Key=name)
        upload_id: str = answer["UploadId"]
        return upload_id

    @staticmethod
    def _read_back(fd: int, offset: int, length: int, hash: Any) -> bytes:
        data = os.pread(fd, length, offset)
        if len(data) != length:
            raise UploadFailed(f"the spool file has {len(data)} bytes at {offset}, not {length}")
        hash.update(data)
        return data

    @staticmethod
    def _check(hash: Any, sha256: str) -> None:
        if hash.hexdigest() != sha256:
            raise UploadFailed(f"the spool file's sha256 is {hash.hexdigest()}, not {sha256}")

    def upload_part(
        self, name: str, upload_id: str, number: int, fd: int, offset: int, length: int, hash: Any
    ) -> str:
        data = self._read_back(fd, offset, length, hash)
        answer = self.client.upload_part(
            Bucket=self.bucket, Key=name, UploadId=upload_id, PartNumber=number, Body=data
        )
        etag: str = answer["ETag"]
        return etag

    @staticmethod
    def _consume(spool_path: str) -> None:
        try:
            os.unlink(spool_path)
        except FileNotFoundError:
            pass

    def complete_multipart(
        self, name: str, upload_id: str, parts: list[dict[str, Any]], hash: Any, sha256: str, spool_path: str
    ) -> None:
        self._check(hash, sha256)
        self.client.complete_multipart_upload(
            Bucket=self.bucket, Key=name, UploadId=upload_id, MultipartUpload={"Parts": parts}
        )
        self._consume(spool_path)

    def put_small(self, name: str, fd: int, length: int, hash: Any, sha256: str, spool_path: str) -> None:
        data = self._read_back(fd, 0, length, hash)
        self._check(hash, sha256)
        self.client.put_object(Bucket=self.bucket, Key=name, Body=data)
        self._consume(spool_path)

    def abort_multipart(self, name: str, upload_id: str) -> None:
        self.client.abort_multipart_upload(Bucket=self.bucket, Key=name, UploadId=upload_id)

    def _head(self, key: str) -> int | None:
        from botocore.exceptions import ClientError

        try:
            answer = self.client.head_object(Bucket=self.bucket, Key=self._object(key))
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise
        return int(answer["ContentLength"])

    async def _open(self, key: str) -> IFileReader | None:
        size = await self.run(self._head, key)
        return None if size is None else S3Reader(self, key, size)

    def open(self, key: str) -> Deferred[IFileReader | None]:
        return Deferred.fromCoroutine(self._open(key))

    def get_body(self, key: str, first: int, last: int) -> tuple[Any, bool]:
        """
        The body of a ranged GET of bytes C{first} to C{last}, once the
        answer says it is that range (a server that ignored C{Range} would
        otherwise have bytes from offset 0 taken for bytes from C{first}),
        and whether it is the whole object instead (a C{200} from 0).
        """
        answer = self.client.get_object(
            Bucket=self.bucket, Key=self._object(key), Range=f"bytes={first}-{last}"
        )
        body = answer["Body"]
        try:
            check_range(answer, first, last)
        except BaseException:
            body.close()
            raise
        return body, answer.get("ResponseMetadata", {}).get("HTTPStatusCode") == 200

    def probe(self) -> Deferred[None]:
        return self.run(self._probe)

    def _probe(self) -> None:
        """
        Fail unless the store can serve: a ranged read of a known object
        (written once if it is not there), checked as every read is.  A miss
        is not enough: a gateway whose volume servers are down still answers
        "no such key" while every read fails; and a server that ignores
        C{Range} fails the probe as it fails ranged reads, rather than
        coming "back" after each of them.
        """
        from botocore.exceptions import ClientError

        name = self._object(PROBE_KEY)
        try:
            body, _ = self.get_body(PROBE_KEY, 1, 4)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") not in ("404", "NoSuchKey", "NotFound"):
                raise
            self.client.put_object(Bucket=self.bucket, Key=name, Body=PROBE_BODY)
            body, _ = self.get_body(PROBE_KEY, 1, 4)
        try:
            data = body.read()
        finally:
            body.close()
        if data != PROBE_BODY[1:5]:
            raise OSError(f"the probe object {name} reads back {data!r}, not {PROBE_BODY[1:5]!r}")

    def _presign_client(self) -> Any:
        """
        A client like ours that signs URLs with SigV4 (botocore would sign
        some with SigV2, which AWS no longer accepts everywhere), made once.
        """
        with self._presigner_lock:
            if self._presigner is None:
                import boto3
                from botocore.config import Config

                meta = self.client.meta
                self._presigner = boto3.session.Session().client(
                    "s3",
                    endpoint_url=meta.endpoint_url,
                    region_name=meta.region_name,
                    config=meta.config.merge(Config(signature_version="s3v4")),
                )
            return self._presigner

    def presign(self, key: str, ttl: float) -> str:
        # Signing is local, but resolving credentials may block (an instance
        # role is fetched over HTTP): this runs on the S3 pool too.
        url: str = self._presign_client().generate_presigned_url(
            "get_object",
            Params={"Bucket": self.bucket, "Key": self._object(key)},
            ExpiresIn=max(1, int(ttl)),
        )
        return url

    def _delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._object(key))

    def delete(self, key: str) -> Deferred[None]:
        return self.run(self._delete, key)

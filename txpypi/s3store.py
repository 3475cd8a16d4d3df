"""
A file store in S3 (or an S3-compatible server), on boto3.

boto3 blocks, so every call runs on a dedicated, bounded thread pool that a
service starts and stops, never on the reactor thread and never on a pool
shared with other blocking work.  One client, made from an explicit
Session, is shared by those threads (boto3 clients are thread-safe).
Credentials come from boto3's standard chain (environment, profile,
instance role), never from the command line.

A file becomes visible in S3 only once it is verified: it is uploaded from
the verified spool file (multipart for large files) under its final key.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from zope.interface import implementer

from txpypi.stores import IFileReader, IFileStore


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
            max_pool_connections=32,
        ),
    )


@implementer(IFileReader)
@attrs.define
class S3Reader:
    """
    Ranged GETs of one object, each on the S3 pool.
    """

    _store: S3Store
    _key: str
    size: int

    def read(self, offset: int, length: int) -> Deferred[bytes]:
        if offset >= self.size or length <= 0:
            from twisted.internet.defer import succeed

            return succeed(b"")
        end = min(self.size, offset + length) - 1
        return self._store._run(self._store._get_range, self._key, offset, end)

    def close(self) -> None:
        pass


@implementer(IFileStore)
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
    _reactor: Any

    def _object(self, key: str) -> str:
        return f"{self.prefix.strip('/')}/{key}" if self.prefix.strip("/") else key

    def _run(self, f: Any, *args: Any) -> Deferred[Any]:
        return deferToThreadPool(self._reactor, self._pool, f, *args)

    def _upload(self, spool_path: str, key: str) -> None:
        import os

        self.client.upload_file(spool_path, self.bucket, self._object(key))
        os.unlink(spool_path)

    def commit(self, spool_path: str, key: str) -> Deferred[None]:
        return self._run(self._upload, spool_path, key)

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
        size = await self._run(self._head, key)
        return None if size is None else S3Reader(self, key, size)

    def open(self, key: str) -> Deferred[IFileReader | None]:
        return Deferred.fromCoroutine(self._open(key))

    def _get_range(self, key: str, first: int, last: int) -> bytes:
        answer = self.client.get_object(
            Bucket=self.bucket, Key=self._object(key), Range=f"bytes={first}-{last}"
        )
        data: bytes = answer["Body"].read()
        return data

    def _delete(self, key: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self._object(key))

    def delete(self, key: str) -> Deferred[None]:
        return self._run(self._delete, key)

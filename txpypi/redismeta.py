"""
Metadata in Redis (txredisapi), shared by every instance that points at the
same server: pages, file records, access times and download counts.

Records are JSON strings; the cache's size and file count are kept next to
them by Lua scripts, so that replacing or deleting a record keeps them
exact even with several instances writing at once.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import unquote, urlsplit

import attrs
from twisted.internet.defer import Deferred
from zope.interface import implementer

from txpypi.metadata import FileRecord, IMetadata, PageRecord

_PUT_FILE = """
local old = redis.call('GET', KEYS[1])
if old then
  redis.call('INCRBY', KEYS[2], -cjson.decode(old).size)
  redis.call('DECR', KEYS[3])
end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('INCRBY', KEYS[2], ARGV[2])
redis.call('INCR', KEYS[3])
redis.call('ZADD', KEYS[4], ARGV[3], ARGV[4])
return 1
"""

_DELETE_FILE = """
local old = redis.call('GET', KEYS[1])
if old then
  redis.call('INCRBY', KEYS[2], -cjson.decode(old).size)
  redis.call('DECR', KEYS[3])
  redis.call('DEL', KEYS[1])
end
redis.call('ZREM', KEYS[4], ARGV[1])
return 1
"""


@attrs.frozen
class RedisURL:
    host: str
    port: int
    db: int
    password: str | None
    tls: bool


def parse_redis_url(url: str) -> RedisURL:
    """
    C{redis://[:password@]host[:port][/db]}, or C{rediss://} for TLS.

    @raise ValueError: if it is not one.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        # Never repeat the URL: it may hold a password.
        raise ValueError("expected redis://[:password@]host[:port][/db] or rediss://…")
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise ValueError(f"the database must be a number, got {path!r}")
    password = unquote(parts.password) if parts.password else None
    return RedisURL(parts.hostname, parts.port or 6379, int(path or 0), password, parts.scheme == "rediss")


def connect(url: str) -> Any:
    """
    A lazy, reconnecting txredisapi pool for C{url}.
    """
    import txredisapi

    where = parse_redis_url(url)
    context: Any = False
    if where.tls:
        from twisted.internet import ssl

        context = ssl.ClientContextFactory()
    return txredisapi.lazyConnectionPool(
        host=where.host,
        port=where.port,
        dbid=where.db,
        poolsize=8,
        reconnect=True,
        password=where.password,
        ssl_context_factory=context,
        convertNumbers=False,
        connectTimeout=5,
        replyTimeout=10,
    )


@implementer(IMetadata)
@attrs.define
class RedisMetadata:
    """
    Records in Redis under C{namespace}.
    """

    redis: Any
    namespace: str = "txpypi"

    def _k(self, *parts: str) -> str:
        return ":".join((self.namespace, *parts))

    def close(self, timeout: float = 3.0) -> Deferred[None]:
        """
        Disconnect; give up after C{timeout} seconds (a pool whose server is
        gone keeps reconnecting, and must not hold up a shutdown).
        """
        from twisted.internet import reactor

        d: Deferred[None] = self.redis.disconnect()
        d.addTimeout(timeout, reactor)
        d.addErrback(lambda _: None)
        return d

    async def _ping(self) -> None:
        await self.redis.ping()

    def ping(self) -> Deferred[None]:
        return Deferred.fromCoroutine(self._ping())

    # -- pages

    async def _get_page(self, key: str) -> PageRecord | None:
        raw = await self.redis.get(self._k("page", key))
        if raw is None:
            return None
        data = json.loads(raw)
        data["body"] = data["body"].encode("utf-8")
        return PageRecord(**data)

    def get_page(self, key: str) -> Deferred[PageRecord | None]:
        return Deferred.fromCoroutine(self._get_page(key))

    async def _put_page(self, record: PageRecord) -> None:
        data = attrs.asdict(record)
        data["body"] = record.body.decode("utf-8")
        await self.redis.set(self._k("page", record.key), json.dumps(data))

    def put_page(self, record: PageRecord) -> Deferred[None]:
        return Deferred.fromCoroutine(self._put_page(record))

    async def _touch_page(self, key: str, fetched_at: float) -> None:
        record = await self._get_page(key)
        if record is not None:
            await self._put_page(attrs.evolve(record, fetched_at=fetched_at))

    def touch_page(self, key: str, fetched_at: float) -> Deferred[None]:
        return Deferred.fromCoroutine(self._touch_page(key, fetched_at))

    async def _delete_page(self, key: str) -> None:
        await self.redis.delete(self._k("page", key))

    def delete_page(self, key: str) -> Deferred[None]:
        return Deferred.fromCoroutine(self._delete_page(key))

    # -- files

    def _file_keys(self, key: str) -> list[str]:
        return [
            self._k("file", key),
            self._k("files", "size"),
            self._k("files", "count"),
            self._k("files", "access"),
        ]

    async def _get_file(self, key: str) -> FileRecord | None:
        raw = await self.redis.get(self._k("file", key))
        return None if raw is None else FileRecord(**json.loads(raw))

    def get_file(self, key: str) -> Deferred[FileRecord | None]:
        return Deferred.fromCoroutine(self._get_file(key))

    async def _put_file(self, r: FileRecord) -> None:
        await self.redis.eval(
            _PUT_FILE,
            keys=self._file_keys(r.key),
            args=[json.dumps(attrs.asdict(r)), str(r.size), repr(r.cached_at), r.key],
        )

    def put_file(self, record: FileRecord) -> Deferred[None]:
        return Deferred.fromCoroutine(self._put_file(record))

    async def _delete_file(self, key: str) -> None:
        await self.redis.eval(_DELETE_FILE, keys=self._file_keys(key), args=[key])

    def delete_file(self, key: str) -> Deferred[None]:
        return Deferred.fromCoroutine(self._delete_file(key))

    async def _touch_files(self, accessed: dict[str, float]) -> None:
        if not accessed:
            return
        args: list[Any] = []
        for key, when in accessed.items():
            args += [repr(when), key]
        await self.redis.execute_command("ZADD", self._k("files", "access"), "XX", *args)

    def touch_files(self, accessed: dict[str, float]) -> Deferred[None]:
        return Deferred.fromCoroutine(self._touch_files(dict(accessed)))

    async def _usage(self) -> tuple[int, int]:
        size = await self.redis.get(self._k("files", "size"))
        count = await self.redis.get(self._k("files", "count"))
        return int(size or 0), int(count or 0)

    def usage(self) -> Deferred[tuple[int, int]]:
        return Deferred.fromCoroutine(self._usage())

    async def _least_recent(self, limit: int) -> list[FileRecord]:
        keys = await self.redis.zrange(self._k("files", "access"), 0, limit - 1)
        records = []
        for key in keys or []:
            record = await self._get_file(key)
            if record is not None:
                records.append(record)
        return records

    def least_recent(self, limit: int) -> Deferred[list[FileRecord]]:
        return Deferred.fromCoroutine(self._least_recent(limit))

    # -- download counts

    async def _add_downloads(self, counts: dict[tuple[str, str, str], int]) -> None:
        for (project, version, filename), n in counts.items():
            await self.redis.hincrby(self._k("downloads", project), f"{version}\t{filename}", n)
            await self.redis.zincrby(self._k("downloads"), n, project)

    def add_downloads(self, counts: dict[tuple[str, str, str], int]) -> Deferred[None]:
        return Deferred.fromCoroutine(self._add_downloads(dict(counts)))

    async def _top_projects(self, limit: int) -> list[tuple[str, int]]:
        pairs = await self.redis.zrevrange(self._k("downloads"), 0, limit - 1, withscores=True)
        return sorted(((str(p), int(float(n))) for p, n in pairs), key=lambda t: (-t[1], t[0]))

    def top_projects(self, limit: int) -> Deferred[list[tuple[str, int]]]:
        return Deferred.fromCoroutine(self._top_projects(limit))

    async def _project_downloads(self, project: str) -> list[tuple[str, str, int]]:
        fields = await self.redis.hgetall(self._k("downloads", project))
        rows = []
        for field, n in (fields or {}).items():
            version, _, filename = str(field).partition("\t")
            rows.append((version, filename, int(n)))
        return sorted(rows)

    def project_downloads(self, project: str) -> Deferred[list[tuple[str, str, int]]]:
        return Deferred.fromCoroutine(self._project_downloads(project))


_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""


@attrs.define
class RedisLocks:
    """
    Cluster-wide locks: C{SET NX PX} with this instance as the owner, renewed
    and released only by their owner (Lua compare-and-set).  A lock whose
    owner died expires after its TTL.
    """

    redis: Any
    owner: str
    namespace: str = "txpypi"

    def _k(self, name: str) -> str:
        return f"{self.namespace}:lock:{name}"

    async def _acquire(self, name: str, ttl: float) -> bool:
        answer = await self.redis.execute_command(
            "SET", self._k(name), self.owner, "NX", "PX", str(int(ttl * 1000))
        )
        return answer is not None and str(answer).upper() == "OK"

    def acquire(self, name: str, ttl: float) -> Deferred[bool]:
        return Deferred.fromCoroutine(self._acquire(name, ttl))

    async def _renew(self, name: str, ttl: float) -> bool:
        answer = await self.redis.eval(_RENEW, keys=[self._k(name)], args=[self.owner, str(int(ttl * 1000))])
        return bool(int(answer or 0))

    def renew(self, name: str, ttl: float) -> Deferred[bool]:
        return Deferred.fromCoroutine(self._renew(name, ttl))

    async def _release(self, name: str) -> None:
        await self.redis.eval(_RELEASE, keys=[self._k(name)], args=[self.owner])

    def release(self, name: str) -> Deferred[None]:
        return Deferred.fromCoroutine(self._release(name))

    async def _holder(self, name: str) -> str | None:
        answer = await self.redis.execute_command("GET", self._k(name))
        if answer is None:
            return None
        return answer.decode() if isinstance(answer, bytes) else str(answer)

    def holder(self, name: str) -> Deferred[str | None]:
        """
        The owner of the lock on C{name}, if it is held.
        """
        return Deferred.fromCoroutine(self._holder(name))

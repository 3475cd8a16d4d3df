"""
Metadata in Redis (txredisapi), shared by every instance that points at the
same server: pages, file records, access times and download counts.

Records are JSON strings; the cache's size and file count are kept next to
them by Lua scripts, so that replacing or deleting a record keeps them
exact even with several instances writing at once.

Every call is bounded (L{Link}): txredisapi queues a command until a
connection is up, which while Redis is down means forever.  A call that
gets no answer in time, or whose connection is lost, fails with
L{txpypi.storage.outages.Unavailable}; after that, calls fail at once instead of
waiting, until a probe (L{RedisMetadata.ping}, or one call let through
every few seconds) gets an answer.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import attrs
from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from zope.interface import implementer

from txpypi.storage.metadata import FileRecord, IMetadata, PageRecord
from txpypi.storage.outages import Unavailable

log = Logger(namespace="txpypi.redismeta")

#: Replace a record, keeping the size and count exact; answers the record
#: replaced (or false).
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
return old
"""

#: Delete a record -- with ARGV[2] and ARGV[3], only if it still has that
#: sha256 and time of caching -- keeping the size and count exact; answers
#: the record deleted (or false).
_DELETE_FILE = """
local old = redis.call('GET', KEYS[1])
if not old then
  redis.call('ZREM', KEYS[4], ARGV[1])
  return false
end
if ARGV[2] ~= '' then
  local record = cjson.decode(old)
  if record.sha256 ~= ARGV[2] or string.format('%.17g', record.cached_at) ~= ARGV[3] then
    return false
  end
end
redis.call('INCRBY', KEYS[2], -cjson.decode(old).size)
redis.call('DECR', KEYS[3])
redis.call('DEL', KEYS[1])
redis.call('ZREM', KEYS[4], ARGV[1])
return old
"""


_ADD_DOWNLOADS = """
for i = 2, #KEYS do
  local field, n, project = ARGV[3 * i - 5], ARGV[3 * i - 4], ARGV[3 * i - 3]
  redis.call('HINCRBY', KEYS[i], field, n)
  redis.call('ZINCRBY', KEYS[1], n, project)
end
return 1
"""


def _record(raw: Any) -> FileRecord | None:
    """
    The record a script answered (Lua's false arrives as None), if any.
    """
    if not raw:
        return None
    if isinstance(raw, bytes):
        raw = raw.decode()
    return FileRecord(**json.loads(raw))


@attrs.frozen
class RedisURL:
    host: str
    port: int
    db: int
    password: str | None
    tls: bool
    #: With TLS: a PEM file of the CA that signed the server's certificate
    #: (default: the system's trusted CAs).
    ca_file: str | None = None


def parse_redis_url(url: str) -> RedisURL:
    """
    C{redis://[:password@]host[:port][/db]}, or C{rediss://} for TLS (the
    server's certificate is checked for C{host}, against the system's CAs or
    the one named by C{?ssl_ca_certs=/path/to/ca.pem}).

    @raise ValueError: if it is not one.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss") or not parts.hostname:
        # Never repeat the URL: it may hold a password.
        raise ValueError("expected redis://[:password@]host[:port][/db] or rediss://…")
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise ValueError(f"the database must be a number, got {path!r}")
    query = parse_qs(parts.query, keep_blank_values=True)
    unknown = set(query) - {"ssl_ca_certs"}
    if unknown:
        raise ValueError(f"unknown parameter {sorted(unknown)[0]!r} (only ssl_ca_certs, with rediss://)")
    ca_file = query["ssl_ca_certs"][-1] if "ssl_ca_certs" in query else None
    if ca_file is not None and parts.scheme != "rediss":
        raise ValueError("ssl_ca_certs needs rediss://")
    password = unquote(parts.password) if parts.password else None
    tls = parts.scheme == "rediss"
    return RedisURL(parts.hostname, parts.port or 6379, int(path or 0), password, tls, ca_file)


def connect(url: str, timeout: float = 3.0) -> Any:
    """
    A lazy, reconnecting txredisapi pool for C{url}: connections and replies
    time out after C{timeout} seconds, and a lost connection is tried again
    at growing intervals up to C{timeout} (at least 1 s) apart.

    Database 0 is not selected: every connection starts there, and a
    SELECT that fails (a Redis that hangs) makes txredisapi give up
    reconnecting for good (L{Link} then starts a new pool).
    """
    import txredisapi

    where = parse_redis_url(url)
    context: Any = False
    if where.tls:
        from twisted.internet import ssl

        # The server's certificate is verified, for its host name.
        trust: Any = ssl.platformTrust()
        if where.ca_file is not None:
            with open(where.ca_file, "rb") as f:  # once, at start-up
                trust = ssl.Certificate.loadPEM(f.read())
        context = ssl.optionsForClientTLS(where.host, trustRoot=trust)
    pool = txredisapi.lazyConnectionPool(
        host=where.host,
        port=where.port,
        dbid=where.db or None,
        poolsize=8,
        reconnect=True,
        password=where.password,
        ssl_context_factory=context,
        convertNumbers=False,
        connectTimeout=timeout,
        replyTimeout=timeout,
    )
    # txredisapi backs off up to 10 s between attempts by default: rejoin
    # sooner once Redis is back.
    factory = getattr(pool, "_factory", None)
    if factory is not None:
        factory.maxDelay = max(1.0, timeout)
        if getattr(factory, "deferred", None) is not None:
            # A failed AUTH or SELECT fails this (nobody waits on it in a
            # lazy pool): the outage is told by txpypi.storage.outages instead.
            factory.deferred.addErrback(lambda _: None)
    return pool


@attrs.define
class Link:
    """
    Calls to one txredisapi pool, each bounded by C{timeout} seconds.  Once
    a call failed for want of Redis, calls fail at once (a Redis that hangs
    keeps its connections open: each call would wait C{timeout}) until a
    probe gets an answer; one call is let through as a probe every
    C{timeout} seconds (at least 1) in any case.
    """

    redis: Any
    timeout: float = 3.0
    #: Times the calls and the probes.
    clock: IReactorTime = attrs.field(kw_only=True)
    #: Makes a new pool, for when txredisapi gave up on this one.
    reconnect: Callable[[], Any] | None = None
    #: While Redis is down: when the next call may try it.
    _retry_at: float | None = None

    @property
    def down(self) -> bool:
        return self._retry_at is not None

    def _given_up(self) -> bool:
        """
        Whether txredisapi stopped reconnecting this pool and has no live
        connection left: it does so for good when a new connection's AUTH
        or SELECT fails, as it does against a Redis that hangs.
        """
        factory = getattr(self.redis, "_factory", None)
        if factory is None or getattr(factory, "disconnectCalled", False):
            return False
        return bool(getattr(factory, "stopped", False)) and not getattr(factory, "size", 1)

    async def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """
        C{redis.method(*args, **kwargs)}, bounded.

        @raise Unavailable: no answer in time, a lost connection, no
            connection, or Redis known down.
        """
        now = self.clock.seconds()
        if self._retry_at is not None and now < self._retry_at:
            raise Unavailable("Redis is down")
        return await self._send(method, *args, **kwargs)

    async def probe(self) -> None:
        """
        Ask Redis whether it answers, even while it is known down.

        @raise Unavailable: it does not.
        """
        await self._send("ping")

    async def _send(self, method: str, *args: Any, **kwargs: Any) -> Any:
        import txredisapi

        clock = self.clock
        if self.reconnect is not None and self._given_up():
            old, self.redis = self.redis, self.reconnect()
            old.disconnect().addErrback(lambda _: None)
            log.info("txredisapi gave up reconnecting to Redis; started a new connection pool")
        if self._retry_at is not None:
            self._retry_at = clock.seconds() + max(1.0, self.timeout)
        d: Deferred[Any] = getattr(self.redis, method)(*args, **kwargs)
        # Cancelling is safe: a command waiting for a connection is dropped,
        # and the reply of one already sent is read and ignored.
        d.addTimeout(self.timeout, clock)
        try:
            result = await d
        except defer.TimeoutError:
            self._failed(clock)
            raise Unavailable(f"Redis did not answer within {self.timeout:g} s") from None
        except txredisapi.ConnectionError as e:
            self._failed(clock)
            raise Unavailable(f"Redis connection: {e}") from None
        self._retry_at = None
        return result

    def _failed(self, clock: IReactorTime) -> None:
        self._retry_at = clock.seconds() + max(1.0, self.timeout)


@implementer(IMetadata)
@attrs.define
class RedisMetadata:
    """
    Records in Redis under C{namespace}; every call bounded by C{timeout}
    seconds (see L{Link}).
    """

    redis: Any
    namespace: str = "txpypi"
    timeout: float = 3.0
    #: Makes a new pool when txredisapi gave up on one (see L{Link}).
    reconnect: Callable[[], Any] | None = None
    clock: IReactorTime = attrs.field(kw_only=True)
    link: Link = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.link = Link(self.redis, self.timeout, self.reconnect, clock=self.clock)

    async def _r(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return await self.link.call(method, *args, **kwargs)

    def _k(self, *parts: str) -> str:
        return ":".join((self.namespace, *parts))

    def close(self, timeout: float = 3.0) -> Deferred[None]:
        """
        Disconnect; give up after C{timeout} seconds (a pool whose server is
        gone keeps reconnecting, and must not hold up a shutdown).
        """
        d: Deferred[None] = self.link.redis.disconnect()
        d.addTimeout(timeout, self.clock)
        d.addErrback(lambda _: None)
        return d

    def ping(self) -> Deferred[None]:
        """
        Ask Redis, even while it is known down (this is the probe).
        """
        return Deferred.fromCoroutine(self.link.probe())

    # -- pages

    async def _get_page(self, key: str) -> PageRecord | None:
        raw = await self._r("get", self._k("page", key))
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
        await self._r("set", self._k("page", record.key), json.dumps(data))

    def put_page(self, record: PageRecord) -> Deferred[None]:
        return Deferred.fromCoroutine(self._put_page(record))

    async def _touch_page(self, key: str, fetched_at: float) -> None:
        record = await self._get_page(key)
        if record is not None:
            await self._put_page(attrs.evolve(record, fetched_at=fetched_at))

    def touch_page(self, key: str, fetched_at: float) -> Deferred[None]:
        return Deferred.fromCoroutine(self._touch_page(key, fetched_at))

    async def _delete_page(self, key: str) -> None:
        await self._r("delete", self._k("page", key))

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
        raw = await self._r("get", self._k("file", key))
        return None if raw is None else FileRecord(**json.loads(raw))

    def get_file(self, key: str) -> Deferred[FileRecord | None]:
        return Deferred.fromCoroutine(self._get_file(key))

    async def _put_file(self, r: FileRecord) -> FileRecord | None:
        old = await self._r(
            "eval",
            _PUT_FILE,
            keys=self._file_keys(r.key),
            args=[json.dumps(attrs.asdict(r)), str(r.size), repr(r.cached_at), r.key],
        )
        return _record(old)

    def put_file(self, record: FileRecord) -> Deferred[FileRecord | None]:
        return Deferred.fromCoroutine(self._put_file(record))

    async def _delete_file(self, key: str, expected: FileRecord | None) -> FileRecord | None:
        args = [key, "", ""]
        if expected is not None:
            args = [key, expected.sha256, f"{expected.cached_at:.17g}"]
        old = await self._r("eval", _DELETE_FILE, keys=self._file_keys(key), args=args)
        return _record(old)

    def delete_file(self, key: str, expected: FileRecord | None = None) -> Deferred[FileRecord | None]:
        return Deferred.fromCoroutine(self._delete_file(key, expected))

    async def _touch_files(self, accessed: dict[str, float]) -> None:
        if not accessed:
            return
        args: list[Any] = []
        for key, when in accessed.items():
            args += [repr(when), key]
        await self._r("execute_command", "ZADD", self._k("files", "access"), "XX", *args)

    def touch_files(self, accessed: dict[str, float]) -> Deferred[None]:
        return Deferred.fromCoroutine(self._touch_files(dict(accessed)))

    async def _usage(self) -> tuple[int, int]:
        size = await self._r("get", self._k("files", "size"))
        count = await self._r("get", self._k("files", "count"))
        return int(size or 0), int(count or 0)

    def usage(self) -> Deferred[tuple[int, int]]:
        return Deferred.fromCoroutine(self._usage())

    async def _least_recent(self, limit: int) -> list[FileRecord]:
        keys = await self._r("zrange", self._k("files", "access"), 0, limit - 1)
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
        if not counts:
            return
        # One script, so that a call that fails has added nothing (it is
        # kept and added again once Redis is back).
        keys = [self._k("downloads")]
        args: list[Any] = []
        for (project, version, filename), n in counts.items():
            keys.append(self._k("downloads", project))
            args += [f"{version}\t{filename}", str(n), project]
        await self._r("eval", _ADD_DOWNLOADS, keys=keys, args=args)

    def add_downloads(self, counts: dict[tuple[str, str, str], int]) -> Deferred[None]:
        return Deferred.fromCoroutine(self._add_downloads(dict(counts)))

    async def _top_projects(self, limit: int) -> list[tuple[str, int]]:
        pairs = await self._r("zrevrange", self._k("downloads"), 0, limit - 1, withscores=True)
        return sorted(((str(p), int(float(n))) for p, n in pairs), key=lambda t: (-t[1], t[0]))

    def top_projects(self, limit: int) -> Deferred[list[tuple[str, int]]]:
        return Deferred.fromCoroutine(self._top_projects(limit))

    async def _project_downloads(self, project: str) -> list[tuple[str, str, int]]:
        fields = await self._r("hgetall", self._k("downloads", project))
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
    #: Shared with the metadata store on the same pool, so that both know
    #: when Redis is down.
    link: Link | None = None
    clock: IReactorTime = attrs.field(kw_only=True)

    def __attrs_post_init__(self) -> None:
        if self.link is None:
            self.link = Link(self.redis, clock=self.clock)

    def _k(self, name: str) -> str:
        return f"{self.namespace}:lock:{name}"

    async def _acquire(self, name: str, ttl: float) -> bool:
        assert self.link is not None
        answer = await self.link.call(
            "execute_command", "SET", self._k(name), self.owner, "NX", "PX", str(int(ttl * 1000))
        )
        return answer is not None and str(answer).upper() == "OK"

    def acquire(self, name: str, ttl: float) -> Deferred[bool]:
        """
        Take the lock for C{ttl} seconds; C{False} if another owner has it.

        @raise Unavailable: Redis is unavailable (fetch without the lock).
        """
        return Deferred.fromCoroutine(self._acquire(name, ttl))

    async def _renew(self, name: str, ttl: float) -> bool:
        assert self.link is not None
        try:
            answer = await self.link.call(
                "eval", _RENEW, keys=[self._k(name)], args=[self.owner, str(int(ttl * 1000))]
            )
        except Unavailable:
            return False  # the lock lapses; at worst another instance fetches too
        return bool(int(answer or 0))

    def renew(self, name: str, ttl: float) -> Deferred[bool]:
        """
        Extend our lock; C{False} if it is not ours any more, or Redis is
        unavailable (the outage is told by the metadata store).
        """
        return Deferred.fromCoroutine(self._renew(name, ttl))

    async def _release(self, name: str) -> None:
        assert self.link is not None
        try:
            await self.link.call("eval", _RELEASE, keys=[self._k(name)], args=[self.owner])
        except Unavailable:
            pass  # it expires by itself

    def release(self, name: str) -> Deferred[None]:
        """
        Release our lock; while Redis is unavailable it expires by itself.
        """
        return Deferred.fromCoroutine(self._release(name))

    async def _holder(self, name: str) -> str | None:
        assert self.link is not None
        answer = await self.link.call("execute_command", "GET", self._k(name))
        if answer is None:
            return None
        return answer.decode() if isinstance(answer, bytes) else str(answer)

    def holder(self, name: str) -> Deferred[str | None]:
        """
        The owner of the lock on C{name}, if it is held.
        """
        return Deferred.fromCoroutine(self._holder(name))

"""
The twistd plugin's options and service: C{twistd -n txpypi [options]}.
"""

from __future__ import annotations

import os
import shutil
import signal
from functools import partial
from pathlib import Path
from typing import Any

import attrs
from twisted.application import strports
from twisted.application.service import IService, MultiService, Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.threadpool import ThreadPool

from txpypi import config
from txpypi.cache.files import FileCache
from txpypi.cache.pages import PageCache
from txpypi.core.fetchpolicy import FileHost
from txpypi.fetch.commit import CommitJournal
from txpypi.fetch.upstream import Upstream, UpstreamClient
from txpypi.storage.metadata import SqliteMetadata
from txpypi.storage.outages import Outage, WatchedMetadata, WatchedStore
from txpypi.storage.stores import DiskStore
from txpypi.web.app import ConnectionLimits, Proxy
from txpypi.web.metrics import Metrics

log = Logger()


class Options(usage.Options):
    """
    Command-line options; each may also be set in the C{--config} file under
    the same name.  The command line wins.
    """

    synopsis = "[options]"
    longdesc = "A pull-through caching proxy for the Python package index."

    def __init__(self) -> None:
        super().__init__()
        self.given: dict[str, Any] = {}
        self.config_path: str | None = None
        self.settings = config.Settings()

    def opt_listen(self, endpoint: str) -> None:
        """
        A Twisted server endpoint string to listen on; repeat it to listen on
        several (default: tcp:5000:interface=127.0.0.1).
        """
        self.given.setdefault("listen", []).append(endpoint)

    def opt_upstream(self, url: str) -> None:
        """
        The upstream simple index URL (default: https://pypi.org/simple/).
        """
        self.given["upstream"] = url

    def opt_cache_dir(self, path: str) -> None:
        """
        Where cached files and metadata live (default: ~/.cache/txpypi).
        """
        self.given["cache-dir"] = path

    def opt_index_ttl(self, seconds: str) -> None:
        """
        Seconds an index page stays fresh (default: 600).
        """
        self.given["index-ttl"] = seconds

    def opt_connect_timeout(self, seconds: str) -> None:
        """
        Seconds to wait for a connection to the upstream (default: 10).
        """
        self.given["connect-timeout"] = seconds

    def opt_response_timeout(self, seconds: str) -> None:
        """
        Seconds to wait for the upstream's response headers (default: 30).
        """
        self.given["response-timeout"] = seconds

    def opt_read_timeout(self, seconds: str) -> None:
        """
        Seconds the upstream may send nothing in the middle of a page or file
        before the fetch fails (default: 60).
        """
        self.given["read-timeout"] = seconds

    def opt_stale_ttl(self, seconds: str) -> None:
        """
        Seconds past its TTL an index page may still be served (X-Cache:
        STALE) while the upstream is down or failing; 0 turns it off
        (default: 604800, a week).
        """
        self.given["stale-ttl"] = seconds

    def opt_offline(self) -> None:
        """
        Never contact the upstream: serve what is cached, 404 for the rest.
        """
        self.given["offline"] = True

    def opt_max_cache_size(self, size: str) -> None:
        """
        Keep cached files under this size (500M, 20G, ...: powers of 1024),
        evicting the least recently served (default: no limit).
        """
        self.given["max-cache-size"] = size

    def opt_log_format(self, name: str) -> None:
        """
        The access log: combined, json or none (default: combined).
        """
        self.given["log-format"] = name

    def opt_trusted_proxy(self, address: str) -> None:
        """
        A reverse proxy's address whose X-Forwarded-For is believed in the
        access log; repeat it for several.
        """
        self.given.setdefault("trusted-proxy", []).append(address)

    def opt_admin_token_file(self, path: str) -> None:
        """
        A file whose first line is the bearer token for the admin routes
        (without one, they answer 404).
        """
        self.given["admin-token-file"] = path

    def opt_shutdown_grace(self, seconds: str) -> None:
        """
        On SIGTERM, seconds to let downloads in progress finish before their
        clients are cut off (default: 30).
        """
        self.given["shutdown-grace"] = seconds

    def opt_store(self, kind: str) -> None:
        """
        Where cached files live: disk (under --cache-dir) or s3 (default:
        disk).
        """
        self.given["store"] = kind

    def opt_s3_bucket(self, name: str) -> None:
        """
        The S3 bucket (required with --store s3).
        """
        self.given["s3-bucket"] = name

    def opt_s3_prefix(self, prefix: str) -> None:
        """
        A key prefix in the bucket (default: txpypi/).
        """
        self.given["s3-prefix"] = prefix

    def opt_s3_endpoint_url(self, url: str) -> None:
        """
        The S3 endpoint, for S3-compatible servers (default: AWS).
        """
        self.given["s3-endpoint-url"] = url

    def opt_s3_region(self, region: str) -> None:
        """
        The S3 region (default: boto3's).
        """
        self.given["s3-region"] = region

    def opt_s3_threads(self, n: str) -> None:
        """
        Threads of the pool that runs boto3 calls (default: 8).
        """
        self.given["s3-threads"] = n

    def opt_s3_redirect(self) -> None:
        """
        Answer a cached file's GET with a 302 to a short-lived presigned S3
        URL instead of sending the bytes (default: off).
        """
        self.given["s3-redirect"] = True

    def opt_s3_redirect_ttl(self, seconds: str) -> None:
        """
        With --s3-redirect: how long the presigned URLs live (default: 300).
        """
        self.given["s3-redirect-ttl"] = seconds

    def opt_redis(self, url: str) -> None:
        """
        Share metadata through Redis: redis://[:password@]host:port/db, or
        rediss:// for TLS (default: the embedded SQLite database).
        """
        self.given["redis"] = url

    def opt_lock_ttl(self, seconds: str) -> None:
        """
        With --redis: how long a dead instance's download lock outlives it
        before another instance takes over the fetch (default: 30).
        """
        self.given["lock-ttl"] = seconds

    def opt_peer_url(self, url: str) -> None:
        """
        With --redis: the URL where the other instances reach this one, so
        that their clients receive a download in progress here as it
        arrives (needs --peer-secret-file).
        """
        self.given["peer-url"] = url

    def opt_peer_secret_file(self, path: str) -> None:
        """
        A file whose first line is the secret shared by the instances that
        stream downloads to each other (16 characters or more).
        """
        self.given["peer-secret-file"] = path

    def opt_redis_timeout(self, seconds: str) -> None:
        """
        With --redis: seconds Redis may take to connect or answer before the
        instance goes on without it; while it is down, it is tried again
        this often (default: 3).
        """
        self.given["redis-timeout"] = seconds

    def opt_s3_timeout(self, seconds: str) -> None:
        """
        With --store s3: seconds S3 may take to connect or answer (a failed
        call is tried once more); while it is down, it is tried again this
        often (default: 10).
        """
        self.given["s3-timeout"] = seconds

    def opt_max_downloads(self, n: str) -> None:
        """
        Downloads from the upstream at a time; a client asking for one more
        waits up to --response-timeout for one to end, then gets 503
        (default: 16).
        """
        self.given["max-downloads"] = n

    def opt_min_download_rate(self, rate: str) -> None:
        """
        The slowest an upstream may send a page or a file, in bytes per
        second over each --read-timeout (1K, 100K, ...; 0: no minimum;
        default: 1K).
        """
        self.given["min-download-rate"] = rate

    def opt_file_host(self, host: str) -> None:
        """
        A host files may come from besides the upstream's own: host or
        host:port (https), or http://host[:port]; repeat it for several.
        Once given, files come only from these and the upstream (default:
        any public host over https).
        """
        self.given.setdefault("file-host", []).append(host)

    def opt_send_timeout(self, seconds: str) -> None:
        """
        Seconds a client may take no bytes of a response before it is cut
        off; also the time a request may take to arrive, and the idle
        timeout of a keep-alive connection (default: 60).
        """
        self.given["send-timeout"] = seconds

    def opt_max_connections(self, n: str) -> None:
        """
        The most client connections open at once, on all listeners
        together; past it, new ones are closed at once (default: 1024).
        """
        self.given["max-connections"] = n

    def opt_page_cache_size(self, size: str) -> None:
        """
        Keep index pages in memory up to this size (bodies and parsed
        pages; 64M, 1G, ...: powers of 1024), the least recently used out
        first (default: 256M).
        """
        self.given["page-cache-size"] = size

    def opt_negative_ttl(self, seconds: str) -> None:
        """
        Seconds a project the upstream does not know is remembered as
        unknown, answered 404 without asking again; 0 turns it off
        (default: 60).
        """
        self.given["negative-ttl"] = seconds

    def opt_max_upstream_requests(self, n: str) -> None:
        """
        Index page requests to the upstream in progress at once; the others
        wait their turn, each at most --response-timeout, then 504
        (default: 32).
        """
        self.given["max-upstream-requests"] = n

    def opt_config(self, path: str) -> None:
        """
        A YAML file with the same settings as these options.
        """
        self.config_path = path

    def postOptions(self) -> None:
        self.settings = self.reread()

    def reread(self) -> config.Settings:
        """
        The settings from the config file (read again) and the command line.

        @raise usage.UsageError: for a bad setting.
        """
        try:
            settings = config.Settings()
            if self.config_path is not None:
                settings = config.apply(settings, config.load_file(self.config_path))
            return config.check(config.apply(settings, self.given))
        except config.ConfigError as e:
            raise usage.UsageError(str(e)) from None


class OrderedMultiService(MultiService):
    """
    Stops its children one at a time, in reverse order, each after the one
    before it finished stopping: the listeners close, then the downloads in
    progress drain, then the stores close, and only then the thread pools
    that those stores use.  (MultiService stops them all at once.)
    """

    def stopService(self) -> Deferred[None]:
        Service.stopService(self)
        return Deferred.fromCoroutine(self._stop_in_order())

    async def _stop_in_order(self) -> None:
        for child in reversed(list(self)):
            try:
                await maybeDeferred(child.stopService)
            except Exception:
                log.failure("error while stopping {service}", service=child)


class ThreadPoolService(Service):
    """
    Starts and stops a thread pool with the application.
    """

    def __init__(self, pool: ThreadPool) -> None:
        self.pool = pool

    def startService(self) -> None:
        super().startService()
        self.pool.start()

    def stopService(self) -> None:
        super().stopService()
        self.pool.stop()


class CacheUpkeepService(Service):
    """
    Learns the cache's size at start-up (off the reactor thread), writes
    access times to the metadata store every C{interval} seconds and on
    stop.  Its timer logs its own errors.
    """

    def __init__(self, files: FileCache, reactor: Any, interval: float = 60.0) -> None:
        self._files = files
        self._loop = LoopingCall(self._upkeep)
        self._loop.clock = reactor
        self._interval = interval

    def _flush(self) -> Deferred[None]:
        d = Deferred.fromCoroutine(self._files.flush_accesses())
        d.addErrback(lambda f: log.failure("could not record access times", f))
        return d

    def _upkeep(self) -> Deferred[None]:
        d = Deferred.fromCoroutine(self._files.upkeep())
        d.addErrback(lambda f: log.failure("cache upkeep failed", f))
        return d

    def startService(self) -> None:
        super().startService()
        d = Deferred.fromCoroutine(self._files.load_usage())
        d.addErrback(lambda f: log.failure("could not read the cache's size", f))
        recovered = Deferred.fromCoroutine(self._files.recover_commits())
        recovered.addErrback(lambda f: log.failure("could not check the unfinished commits", f))
        self._loop.start(self._interval, now=False)

    def stopService(self) -> Deferred[None]:
        super().stopService()
        if self._loop.running:
            self._loop.stop()
        return self._flush()


class DrainService(Service):
    """
    Stops right after the listeners (so no new request comes in) and lets
    the downloads in progress finish, up to the grace period.
    """

    def __init__(self, files: FileCache, grace: float) -> None:
        self._files = files
        self.grace = grace

    def stopService(self) -> Deferred[None]:
        super().stopService()
        return Deferred.fromCoroutine(self._files.drain(self.grace))


class ReloadService(Service):
    """
    On SIGHUP, reads the config file again and applies what can change in a
    running process: TTLs, timeouts, limits, the admin token, the access
    log.  A bad file is refused with a log line and the old settings kept.
    """

    #: Settings that only a restart can change.
    FIXED = (
        "listen",
        "upstream",
        "cache_dir",
        "connect_timeout",
        "store",
        "s3_bucket",
        "s3_prefix",
        "s3_endpoint_url",
        "s3_region",
        "s3_threads",
        "redis",
        "lock_ttl",
        "peer_url",
        "peer_secret",
        "redis_timeout",
        "s3_timeout",
        "file_hosts",
    )

    def __init__(self, options: Options, proxy: Proxy, drain: DrainService, reactor: Any) -> None:
        self._options = options
        self._proxy = proxy
        self._drain = drain
        self._reactor = reactor
        self._previous: Any = None

    def startService(self) -> None:
        super().startService()
        if hasattr(signal, "SIGHUP"):
            self._previous = signal.signal(signal.SIGHUP, self._on_signal)

    def stopService(self) -> None:
        super().stopService()
        if self._previous is not None:
            signal.signal(signal.SIGHUP, self._previous)
            self._previous = None

    def _on_signal(self, signum: int, frame: Any) -> None:
        self._reactor.callFromThread(self.reload)

    def reload(self) -> None:
        old = self._options.settings
        try:
            new = self._options.reread()
        except usage.UsageError as e:
            log.error("SIGHUP: configuration refused, keeping the running one: {error}", error=str(e))
            return
        for name in self.FIXED:
            if getattr(new, name) != getattr(old, name):
                log.warn("SIGHUP: {name} changes only with a restart; keeping the running value", name=name)
        apply_live(new, self._proxy, self._drain)
        self._options.settings = attrs.evolve(new, **{name: getattr(old, name) for name in self.FIXED})
        log.info("SIGHUP: configuration reloaded")


def apply_live(settings: config.Settings, proxy: Proxy, drain: DrainService) -> None:
    """
    Apply the settings that can change while running.
    """
    pages, files = proxy.pages, proxy.files
    pages.ttl = settings.index_ttl
    pages.stale_ttl = settings.stale_ttl
    pages.offline = settings.offline
    pages.negative_ttl = settings.negative_ttl
    pages.limiter.limit = settings.max_upstream_requests
    pages.max_bytes = settings.page_cache_size
    pages.trim()
    client = files._client
    client.response_timeout = settings.response_timeout
    client.read_timeout = settings.read_timeout
    client.min_rate = settings.min_download_rate
    files.max_size = settings.max_cache_size
    files.slots.limit = settings.max_downloads
    proxy.admin_token = settings.admin_token
    proxy.s3_redirect_ttl = settings.s3_redirect_ttl if settings.s3_redirect else None
    proxy.log_format = settings.log_format
    proxy.trusted_proxies = frozenset(settings.trusted_proxies)
    for site in proxy.sites:
        site.log_format = settings.log_format
        site.trusted_proxies = frozenset(settings.trusted_proxies)
    drain.grace = settings.shutdown_grace
    proxy.connections.max_connections = settings.max_connections
    proxy.connections.send_timeout = settings.send_timeout
    files.maybe_evict()


class OutageService(Service):
    """
    Stops probing the stores that are down, on stop.
    """

    def __init__(self, outages: list[Outage]) -> None:
        self._outages = outages

    def stopService(self) -> None:
        super().stopService()
        for outage in self._outages:
            outage.stop()


class TimerLoopService(Service):
    """
    Runs a L{LoopingCall} while the service runs.
    """

    def __init__(self, loop: LoopingCall, interval: float) -> None:
        self._loop = loop
        self._interval = interval

    def startService(self) -> None:
        super().startService()
        self._loop.start(self._interval, now=False)

    def stopService(self) -> None:
        super().stopService()
        if self._loop.running:
            self._loop.stop()


class CleanupService(Service):
    """
    Closes the upstream connection pool and the metadata store on stop.
    """

    def __init__(self, client: UpstreamClient, metadata: Any) -> None:
        self._client = client
        self._metadata = metadata

    def stopService(self) -> Deferred[Any]:
        super().stopService()
        from twisted.internet.defer import gatherResults

        return gatherResults([self._client.close(), self._metadata.close()], consumeErrors=True)


def build(settings: config.Settings, reactor: Any) -> tuple[MultiService, Proxy]:
    """
    Build the whole proxy for C{settings}: its services (thread pools first,
    so that they stop last) and the L{Proxy}.
    """
    service = OrderedMultiService()
    cache_dir = Path(settings.cache_dir)
    db_pool = ThreadPool(1, 1, "txpypi-sqlite")
    io_pool = ThreadPool(1, 4, "txpypi-io")
    ThreadPoolService(db_pool).setServiceParent(service)
    ThreadPoolService(io_pool).setServiceParent(service)
    # Hashing and spool writes of downloads in progress: one batch per
    # download at a time, never queued behind slow file-system work.
    spool_pool = ThreadPool(1, 4, "txpypi-spool")
    ThreadPoolService(spool_pool).setServiceParent(service)
    metrics = Metrics.create()
    outages: list[Outage] = []
    store: Any
    if settings.store == "s3":
        from txpypi.storage.s3 import S3Store, make_client

        s3_pool = ThreadPool(1, settings.s3_threads, "txpypi-s3")
        ThreadPoolService(s3_pool).setServiceParent(service)
        spool = cache_dir / "tmp"
        shutil.rmtree(spool, ignore_errors=True)
        spool.mkdir(parents=True, exist_ok=True)
        client_s3 = make_client(settings.s3_endpoint_url, settings.s3_region, settings.s3_timeout)
        assert settings.s3_bucket is not None
        s3_store = S3Store(client_s3, settings.s3_bucket, settings.s3_prefix, str(spool), s3_pool, reactor)
        store = WatchedStore(
            s3_store,
            Outage(
                "files",
                "the file store (S3)",
                reactor,
                consequence="files are served from the upstream and not cached",
                retry=settings.s3_timeout,
                metrics=metrics,
            ),
        )
        outages.append(store.outage)
    else:
        store = DiskStore(cache_dir, io_pool, reactor)
        store.prepare()
    stored: Any
    redis_metadata: Any = None
    if settings.redis is not None:
        from txpypi.storage.redismeta import RedisMetadata, connect

        redis_url, redis_timeout = settings.redis, settings.redis_timeout
        redis_metadata = RedisMetadata(
            connect(redis_url, redis_timeout),
            timeout=redis_timeout,
            clock=reactor,
            reconnect=lambda: connect(redis_url, redis_timeout),
        )
        stored, kind, retry = redis_metadata, "Redis", settings.redis_timeout
    else:
        stored, kind, retry = SqliteMetadata(cache_dir / "metadata.sqlite", db_pool, reactor), "SQLite", 5.0
    metadata = WatchedMetadata(
        stored,
        Outage(
            "metadata",
            f"the metadata store ({kind})",
            reactor,
            consequence="pages and files are served from memory and the upstream, and new ones not recorded",
            retry=max(1.0, retry),
            # Without its own database an instance should leave the load
            # balancer; without the Redis all instances share, none should.
            fatal=redis_metadata is None,
            metrics=metrics,
        ),
    )
    outages.append(metadata.outage)
    file_hosts = None if settings.file_hosts is None else tuple(map(FileHost.parse, settings.file_hosts))
    upstream = Upstream("upstream", settings.upstream, file_hosts=file_hosts)
    client = UpstreamClient(
        reactor,
        upstreams=(upstream,),
        metrics=metrics,
        connect_timeout=settings.connect_timeout,
        response_timeout=settings.response_timeout,
        read_timeout=settings.read_timeout,
        min_rate=settings.min_download_rate,
    )
    CleanupService(client, metadata).setServiceParent(service)
    OutageService(outages).setServiceParent(service)
    pages = PageCache(
        reactor,
        client,
        metadata,
        upstream,
        settings.index_ttl,
        stale_ttl=settings.stale_ttl,
        offline=settings.offline,
        blocking=partial(deferToThreadPool, reactor, io_pool),
        max_bytes=settings.page_cache_size,
        negative_ttl=settings.negative_ttl,
    )
    pages.limiter.limit = settings.max_upstream_requests
    files = FileCache(
        reactor,
        client,
        store,
        metadata,
        pages,
        max_size=settings.max_cache_size,
        metrics=metrics,
        run_spooling=partial(deferToThreadPool, reactor, spool_pool),
        journal=CommitJournal(str(cache_dir / "commits")),
    )
    files.slots.limit = settings.max_downloads
    CacheUpkeepService(files, reactor).setServiceParent(service)
    # Back from an outage: learn the cache's size again (it may have been
    # unknown since start-up, or changed meanwhile).
    metadata.outage.on_recovery(lambda: Deferred.fromCoroutine(files.load_usage()))
    if settings.redis is not None:
        import socket
        import uuid

        from txpypi.core.peer import owner_id
        from txpypi.storage.redismeta import RedisLocks

        files.lock_ttl = settings.lock_ttl
        files.shared_usage = True
        files.peer_url, files.peer_secret = settings.peer_url, settings.peer_secret
        instance = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}"
        files.locks = RedisLocks(
            redis_metadata.redis, owner=owner_id(instance, settings.peer_url), link=redis_metadata.link
        )
        renew = LoopingCall(files.renew_locks)
        renew.clock = reactor
        TimerLoopService(renew, files.lock_ttl / 3).setServiceParent(service)
    proxy = Proxy(
        pages,
        files,
        reactor,
        metrics,
        admin_token=settings.admin_token,
        log_format=settings.log_format,
        trusted_proxies=frozenset(settings.trusted_proxies),
        s3_redirect_ttl=settings.s3_redirect_ttl if settings.s3_redirect else None,
        outages=tuple(outages),
        connections=ConnectionLimits(settings.max_connections, settings.send_timeout),
    )
    site = proxy.site()
    drain = DrainService(files, settings.shutdown_grace)
    drain.setServiceParent(service)
    for endpoint in settings.listen:
        strports.service(endpoint, site, reactor=reactor).setServiceParent(service)
    return service, proxy


def makeService(options: Options, reactor: Any = None) -> IService:
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = default_reactor
    service, proxy = build(options.settings, reactor)
    drain = next(s for s in service if isinstance(s, DrainService))
    ReloadService(options, proxy, drain, reactor).setServiceParent(service)
    return service

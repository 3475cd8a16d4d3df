"""
The twistd plugin's options and service: C{twistd -n txpypi [options]}.

L{Options} is generated from the table of options (L{txpypi.options});
L{build} puts the proxy together, one small function per part, each part
built with its final values.
"""

from __future__ import annotations

import os
import shutil
import socket
import uuid
from functools import partial
from pathlib import Path
from typing import Any, cast

import attrs
from twisted.application import strports
from twisted.application.service import IService, MultiService
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorCore, IReactorFromThreads
from twisted.internet.task import LoopingCall
from twisted.internet.threads import deferToThreadPool
from twisted.logger import Logger
from twisted.python import usage
from twisted.python.threadpool import ThreadPool

from txpypi import options, upstreams
from txpypi.cache.coordinator import Locks, SharedCoordinator
from txpypi.cache.files import FileCache
from txpypi.cache.groupfiles import Groups
from txpypi.cache.groups import Group
from txpypi.cache.legacy import LegacyAPI
from txpypi.cache.owners import Owners
from txpypi.cache.pages import PageCache, PageMemory
from txpypi.cache.policy import PolicedGroup
from txpypi.cache.provenance import Provenances
from txpypi.concurrency.stalls import StallMeter
from txpypi.config import ConfigError, Settings
from txpypi.core.fetchpolicy import FileHost
from txpypi.core.groups import Topology
from txpypi.core.live import Live
from txpypi.core.peer import owner_id
from txpypi.core.policy import Refusal
from txpypi.core.simple.merge import Conflict
from txpypi.fetch.clients import UpstreamClients
from txpypi.fetch.commit import CommitJournal
from txpypi.fetch.guarded import IConnectingReactor
from txpypi.fetch.tls import upstream_tls
from txpypi.fetch.upstream import Upstream, UpstreamClient
from txpypi.services import (
    AccessLogService,
    AdoptedService,
    CacheUpkeepService,
    CarriedCountersService,
    CleanupService,
    DrainService,
    HeapFreezeService,
    OrderedMultiService,
    OutageService,
    ReloadService,
    StallMeterService,
    ThreadPoolService,
    TimerLoopService,
)
from txpypi.storage.filelocks import FileLocks
from txpypi.storage.metadata import SqliteMetadata
from txpypi.storage.outages import Outage, WatchedMetadata, WatchedStore
from txpypi.storage.redismeta import RedisLocks, RedisMetadata
from txpypi.storage.stores import DiskStore, IFileStore
from txpypi.web.accesslog import AccessLogWriter
from txpypi.web.app import Proxy
from txpypi.web.carried import CarriedCounters, carried_path
from txpypi.web.metrics import Metrics
from txpypi.web.siblings import Siblings
from txpypi.workers import Role, Supervisor

log = Logger(namespace="txpypi.tap")


class Options(options.CommandLine):
    """
    Command-line options, one per row of L{txpypi.options.OPTIONS}; each may
    also be set in the C{--config} file under the same name.  The command
    line wins.
    """

    synopsis = "[options]"
    longdesc = "A pull-through caching proxy for the Python package index."

    def __init__(self) -> None:
        super().__init__()
        self.config_path: str | None = None
        self.settings = Settings()

    def opt_config(self, path: str) -> None:
        """
        A YAML file with the same settings as these options.
        """
        self.config_path = path

    def postOptions(self) -> None:
        self.settings = self.reread()

    def reread(self) -> Settings:
        """
        The settings from the config file (read again) and the command line.

        @raise usage.UsageError: for a bad setting.
        """
        try:
            return options.read(self.config_path, self.given)
        except ConfigError as e:
            raise usage.UsageError(str(e)) from None


class IProxyReactor(IConnectingReactor, IReactorCore, IReactorFromThreads):
    """
    What the proxy needs of its reactor: to connect, to keep time, to run
    and listen, and to take results from threads.  A type for annotations,
    as L{IConnectingReactor} is.
    """


def makeService(config: Options, reactor: IProxyReactor | None = None) -> IService:
    if reactor is None:
        from twisted.internet import reactor as default_reactor

        reactor = cast(IProxyReactor, default_reactor)
    if config.settings.workers > 1:
        # The parent of the workers: it serves nothing itself.
        return Supervisor(config.settings, config.config_path, config.given, reactor, reactor)  # type: ignore[arg-type]
    running = options.Running(config.settings)
    built = assemble(config.settings, reactor, running.live)
    ReloadService(config, running, reactor).setServiceParent(built.service)
    # The process's own (twistd's), not one that builds the proxy in it (the tests).
    HeapFreezeService().setServiceParent(built.service)
    return built.service


def worker_service(config: Options, role: Role, reactor: IProxyReactor) -> IService:
    """
    The service of one of the workers (see L{txpypi.worker}).
    """
    running = options.Running(config.settings)
    built = assemble(config.settings, reactor, running.live, role)
    ReloadService(config, running, reactor).setServiceParent(built.service)
    HeapFreezeService().setServiceParent(built.service)
    return built.service


@attrs.frozen
class Built:
    """
    The proxy put together: its services, and the parts SIGHUP reconfigures.
    """

    service: MultiService
    proxy: Proxy
    client: UpstreamClient
    drain: DrainService
    #: The live settings every part holds: SIGHUP changes them here.
    live: Live


def build(settings: Settings, reactor: IProxyReactor) -> tuple[MultiService, Proxy]:
    """
    Build the whole proxy for C{settings}: its services and the L{Proxy}.
    """
    built = assemble(settings, reactor)
    return built.service, built.proxy


def assemble(
    settings: Settings, reactor: IProxyReactor, live: Live | None = None, role: Role | None = None
) -> Built:
    """
    Build the whole proxy for C{settings}, its parts holding C{live} (the
    live rows of C{settings} when L{None}); as one of the workers when
    given its C{role}: serving on the sockets it inherited, with a spool and
    a commit journal of its own, and sharing each file's download with the
    other workers.  The services start in the order
    they are added and stop in the reverse one: the thread pools first (so
    that they stop last), the listeners last (so that they stop first, and
    the downloads in progress drain right after).
    """
    live = options.live_of(settings) if live is None else live
    service = OrderedMultiService()
    metrics = Metrics.create()
    pools = thread_pools(settings)
    for pool in pools.all():
        ThreadPoolService(pool).setServiceParent(service)
    # The access log stops after the listeners and the drain: every line of
    # the last requests is written.
    access = AccessLogWriter(reactor, partial(deferToThreadPool, reactor, pools.io), live.access_log)
    AccessLogService(access, live).setServiceParent(service)
    carried = None
    if role is not None:
        # Written at stop after the last requests, as the access log is.
        path = carried_path(settings.cache_dir, role.index)
        others = tuple(carried_path(settings.cache_dir, i) for i in role.others)
        carried = CarriedCounters.load(path, partial(deferToThreadPool, reactor, pools.io), others)
        CarriedCountersService(carried, metrics.render).setServiceParent(service)
    store = file_store(settings, reactor, pools, metrics, spool_dir(settings, role))
    metadata, redis = metadata_store(settings, reactor, pools, metrics)
    outages = ([store.outage] if isinstance(store, WatchedStore) else []) + [metadata.outage]
    found = indexes(settings, reactor, pools, metrics, live, metadata)
    client = found.file_client()
    CleanupService(client, metadata).setServiceParent(service)
    OutageService(outages).setServiceParent(service)
    files = file_cache(
        settings, live, reactor, pools, metrics, client, store, metadata, redis, found.first, role
    )
    if role is not None:
        # One fetch of a page however many workers' clients ask for it.
        for pages in found.pages.values():
            pages.shared = files.coordinator
    CacheUpkeepService(files, reactor).setServiceParent(service)
    if settings.stall_meter:
        stalls = StallMeter(reactor)
        metrics.watch_stalls(stalls)
        StallMeterService(stalls).setServiceParent(service)
    # Back from an outage: learn the cache's size again (it may have been
    # unknown since start-up, or changed meanwhile).
    metadata.outage.on_recovery(lambda: Deferred.fromCoroutine(files.load_usage()))
    if redis is not None:
        renew = LoopingCall(files.coordinator.renew)
        renew.clock = reactor
        TimerLoopService(renew, settings.lock_ttl / 3).setServiceParent(service)
    groups = found.groups(metadata, files, reactor, pools, metrics, live)
    first_client = found.clients[found.first_name]
    proxy = Proxy(
        found.first,
        files,
        reactor,
        metrics,
        outages=tuple(outages),
        client=first_client,
        live=live,
        groups=groups,
        clients=found.clients,
        access=access,
        carried=carried,
    )
    drain = DrainService(files, live, proxy.senders)
    drain.setServiceParent(service)
    site = proxy.site()
    if role is None:
        for endpoint in settings.listen:
            strports.service(endpoint, site, reactor=reactor).setServiceParent(service)
    else:
        proxy.siblings = Siblings(reactor, role.siblings, role.secret)
        for inherited in role.listen:
            AdoptedService(reactor, inherited, site).setServiceParent(service)
        AdoptedService(reactor, role.own, proxy.own_site()).setServiceParent(service)
    return Built(service, proxy, first_client, drain, live)


def spool_dir(settings: Settings, role: Role | None) -> Path:
    """
    Where spool files are written: C{tmp/}, or a worker's own C{tmp/w<N>/}
    (cleaned when it starts, while the others' are in use).
    """
    spool = Path(settings.cache_dir) / "tmp"
    return spool if role is None else spool / f"w{role.index}"


def journal_dir(settings: Settings, role: Role | None) -> Path:
    """
    Where the commits in progress are written down: C{commits/}, or a
    worker's own C{commits-w<N>/}, whose markers only a successor of that
    worker recovers (never those of a worker committing right now).
    Worker 0 takes the single process's over, as after a switch from one
    process to several.
    """
    name = "commits" if role is None or role.index == 0 else f"commits-w{role.index}"
    return Path(settings.cache_dir) / name


@attrs.frozen
class Pools:
    """
    The thread pools, each for one kind of blocking work.
    """

    #: SQLite: one thread.
    db: ThreadPool
    #: File-system work.
    io: ThreadPool
    #: Hashing and spool writes of downloads in progress: one batch per
    #: download at a time, never queued behind slow file-system work.
    spool: ThreadPool
    #: boto3 calls, with C{--store s3}.
    s3: ThreadPool | None

    def all(self) -> list[ThreadPool]:
        return [pool for pool in (self.db, self.io, self.spool, self.s3) if pool is not None]


def thread_pools(settings: Settings) -> Pools:
    return Pools(
        db=ThreadPool(1, 1, "txpypi-sqlite"),
        io=ThreadPool(1, 4, "txpypi-io"),
        spool=ThreadPool(1, 4, "txpypi-spool"),
        s3=ThreadPool(1, settings.s3_threads, "txpypi-s3") if settings.store == "s3" else None,
    )


def file_store(
    settings: Settings, reactor: IProxyReactor, pools: Pools, metrics: Metrics, spool: Path | None = None
) -> IFileStore:
    """
    The disk store under the cache directory, or the S3 store (watched for
    outages), with their spool files in C{spool} (C{tmp/} by default).
    """
    cache_dir = Path(settings.cache_dir)
    spool = cache_dir / "tmp" if spool is None else spool
    if pools.s3 is None:
        disk = DiskStore(cache_dir, pools.io, reactor, spool=str(spool))
        disk.prepare()
        return disk
    from txpypi.storage.s3 import S3Store, make_client

    shutil.rmtree(spool, ignore_errors=True)
    spool.mkdir(parents=True, exist_ok=True)
    s3 = make_client(settings.s3_endpoint_url, settings.s3_region, settings.s3_timeout)
    assert settings.s3_bucket is not None
    outage = Outage(
        "files",
        "the file store (S3)",
        reactor,
        consequence="files are served from the upstream and not cached",
        retry=settings.s3_timeout,
        metrics=metrics,
    )
    store = S3Store(s3, settings.s3_bucket, settings.s3_prefix, str(spool), pools.s3, reactor)
    return WatchedStore(store, outage)


def metadata_store(
    settings: Settings, reactor: IProxyReactor, pools: Pools, metrics: Metrics
) -> tuple[WatchedMetadata, RedisMetadata | None]:
    """
    The metadata store, watched for outages: the embedded SQLite database,
    or Redis (then also returned on its own, for the cluster's locks).
    """
    stored: Any
    redis: RedisMetadata | None = None
    if settings.redis is not None:
        from txpypi.storage.redismeta import connect

        url, timeout = settings.redis, settings.redis_timeout
        redis = RedisMetadata(
            connect(url, timeout), timeout=timeout, clock=reactor, reconnect=lambda: connect(url, timeout)
        )
        stored, kind, retry = redis, "Redis", timeout
    else:
        sqlite = SqliteMetadata(Path(settings.cache_dir) / "metadata.sqlite", pools.db, reactor)
        stored, kind, retry = sqlite, "SQLite", 5.0
    outage = Outage(
        "metadata",
        f"the metadata store ({kind})",
        reactor,
        consequence="pages and files are served from memory and the upstream, and new ones not recorded",
        retry=max(1.0, retry),
        # Without its own database an instance should leave the load
        # balancer; without the Redis all instances share, none should.
        fatal=redis is None,
        metrics=metrics,
    )
    return WatchedMetadata(stored, outage), redis


@attrs.frozen
class Indexes:
    """
    Every upstream's client and page cache, by upstream name, and the
    groups of them (C{files} is the one file cache they share).
    """

    topology: Topology
    clients: dict[str, UpstreamClient]
    pages: dict[str, PageCache]

    @property
    def first_name(self) -> str:
        """
        The first member of the default group: the upstream C{/health}
        and the status page show first.
        """
        return self.topology.group(self.topology.default_group).members[0]

    @property
    def first(self) -> PageCache:
        return self.pages[self.first_name]

    @property
    def by_url(self) -> dict[str, UpstreamClient]:
        """
        Every upstream's client, by upstream URL (as files and provenance
        objects name their upstream).
        """
        return {self.pages[name].upstream.url: client for name, client in self.clients.items()}

    def file_client(self) -> UpstreamClient | UpstreamClients:
        """
        What fetches the files: each from its upstream's client.
        """
        if len(self.clients) == 1:
            return next(iter(self.clients.values()))
        return UpstreamClients(self.by_url)

    def groups(
        self,
        metadata: WatchedMetadata,
        files: FileCache,
        reactor: IProxyReactor,
        pools: Pools,
        metrics: Metrics,
        live: Live,
    ) -> Groups:
        files.sources.update({p.group: p for p in self.pages.values()})
        found = {}
        for spec in self.topology.groups:
            members = {name: self.pages[name] for name in spec.members}
            owners = Owners(metadata, spec.name, reactor) if len(members) > 1 else None
            found[spec.name] = Group(
                spec,
                self.topology,
                members,
                owners,
                reactor,
                on_conflict=partial(_conflict, metrics, spec.name),
                blocking=partial(deferToThreadPool, reactor, pools.io),
            )
        policed = {
            name: PolicedGroup(
                group,
                live,
                reactor,
                on_refusal=partial(_refusal, metrics),
                blocking=partial(deferToThreadPool, reactor, pools.io),
            )
            for name, group in found.items()
        }
        clients = self.by_url
        provenances = Provenances(metadata, reactor, clients)
        bases = {u.name: u.json_api for u in self.topology.upstreams if u.json_api is not None}
        legacy = LegacyAPI(
            reactor, metadata, clients, bases, blocking=partial(deferToThreadPool, reactor, pools.io)
        )
        return Groups(found, self.topology.default_group, files, policed, provenances, legacy)


def _conflict(metrics: Metrics, group: str, conflict: Conflict) -> None:
    metrics.conflicts.labels(group).inc()


def _refusal(metrics: Metrics, refusal: Refusal) -> None:
    metrics.policy_refusals.labels(refusal.rule).inc()


def indexes(
    settings: Settings,
    reactor: IProxyReactor,
    pools: Pools,
    metrics: Metrics,
    live: Live,
    metadata: WatchedMetadata,
) -> Indexes:
    """
    One client and one page cache per configured upstream, each with its
    own credentials, TLS trust and C{index-ttl}.
    """
    topology = upstreams.topology(settings)
    clients: dict[str, UpstreamClient] = {}
    pages: dict[str, PageCache] = {}
    memory = PageMemory()  # one page-cache-size for every upstream
    for spec in topology.upstreams:
        if not spec.verify:
            log.warn(
                "NOT CHECKING the TLS certificate of upstream {name} ({url}): verify is false, "
                "so anyone on the way can answer in its name",
                name=spec.name,
                url=spec.url,
            )
        hosts = None if spec.file_hosts is None else tuple(map(FileHost.parse, spec.file_hosts))
        upstream = Upstream(spec.name, spec.url, file_hosts=hosts, authorization=spec.authorization)
        try:
            tls = upstream_tls(spec.url, spec.ca_file, spec.verify)
        except ValueError as e:
            raise ConfigError(f"upstreams: {spec.name}: ca-file: {e}") from None
        client = UpstreamClient(
            reactor,
            upstreams=(upstream,),
            metrics=metrics,
            connect_timeout=settings.connect_timeout,
            live=live,
            tls=tls,
        )
        clients[spec.name] = client
        pages[spec.name] = PageCache(
            reactor,
            client,
            metadata,
            upstream,
            group=spec.prefix,
            live=live,
            blocking=partial(deferToThreadPool, reactor, pools.io),
            index_ttl=spec.index_ttl,
            memory=memory,
        )
    return Indexes(topology, clients, pages)


def file_cache(
    settings: Settings,
    live: Live,
    reactor: IProxyReactor,
    pools: Pools,
    metrics: Metrics,
    client: UpstreamClient | UpstreamClients,
    store: IFileStore,
    metadata: WatchedMetadata,
    redis: RedisMetadata | None,
    pages: PageCache,
    role: Role | None = None,
) -> FileCache:
    """
    The file cache; with Redis, one of a cluster that shares the cache's
    size and takes a lock on each file it fetches; as one of the workers,
    the same with the other workers, through file locks (or the cluster's
    with Redis), each worker reached by the others at its own socket.
    """
    coordinator = None
    instance = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex}"
    peer_url, secret = settings.peer_url, settings.peer_secret
    if role is not None:
        peer_url, secret = role.peer_url, role.secret
    locks: Locks | None = None
    if redis is not None:
        locks = RedisLocks(redis.redis, owner=owner_id(instance, peer_url), link=redis.link, clock=reactor)
    elif role is not None:
        locks = FileLocks(Path(settings.cache_dir) / "locks", owner=owner_id(instance, peer_url))
    if locks is not None:
        coordinator = SharedCoordinator(
            locks,
            metadata,
            reactor,
            peer_url,
            secret,
            lock_ttl=settings.lock_ttl,
            lock_first=isinstance(locks, FileLocks),
        )
    return FileCache(
        reactor,
        client,
        store,
        metadata,
        pages,
        live=live,
        metrics=metrics,
        run_spooling=partial(deferToThreadPool, reactor, pools.spool),
        journal=CommitJournal(str(journal_dir(settings, role))),
        coordinator=coordinator,
        shared_usage=coordinator is not None,
        peer_secret=secret,
    )

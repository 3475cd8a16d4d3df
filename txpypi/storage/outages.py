"""
Outages of the stores the proxy leans on: the metadata store (Redis or
SQLite) and the file store (S3).

While one of them fails, the proxy keeps serving: index pages from memory or
the upstream, cached files it knows of from the store, the rest streamed
from the upstream without caching.  What it cannot keep working is told once
per outage, not once per request: L{Outage} logs the first failure and the
recovery, counts failed calls in C{txpypi_store_errors_total{store}}, holds
C{txpypi_store_up{store}} at 0 meanwhile, and tries the store again every
C{retry} seconds in the background, so that an instance rejoins as soon as
the store is back, with or without traffic.

L{WatchedMetadata} and L{WatchedStore} wrap a store with one: every failure
they pass on is an L{Unavailable}, the one exception callers handle to
degrade.  L{WatchedStore} also refuses calls at once while the store is
down, so that a dead S3 costs a client no connect timeouts and retries.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import attrs
from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred, fail, maybeDeferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import alsoProvides, implementer

from txpypi.concurrency.waiters import Once
from txpypi.storage.metadata import FileRecord, IMetadata, PageRecord
from txpypi.storage.stores import (
    IFileReader,
    IFileStore,
    ILocalFile,
    IProbed,
    IRedirectable,
    IStreamingUpload,
    IUpload,
)

log = Logger(namespace="txpypi.outages")

T = TypeVar("T")

#: The key the file store is probed with: there is never an object under it.
PROBE_KEY = "txpypi-probe/absent"

#: How long C{/health} waits for a working store to answer its probe (a
#: load balancer's health check may give up after a second or two).
CHECK_WAIT = 1.0


class Unavailable(Exception):
    """
    A store failed, or is known to be down and was not asked: its outage is
    logged and counted where it was detected, so callers only degrade.
    """


def _missing(error: BaseException) -> bool:
    """
    Whether C{error} says an object is not there (another instance evicted
    it): an answer from the store, not a failure of it.
    """
    response = getattr(error, "response", None)
    code = response.get("Error", {}).get("Code") if isinstance(response, dict) else None
    return code in ("404", "NoSuchKey", "NotFound")


def describe(error: BaseException) -> str:
    """
    One line about C{error}, for logs and C{/health}.
    """
    if isinstance(error, Unavailable):
        return str(error)
    if isinstance(error, defer.TimeoutError):
        return "no answer in time"
    text = " ".join(str(error).split()) or "no detail"
    return f"{error.__class__.__name__}: {text}"[:300]


async def known_file(metadata: IMetadata, key: str) -> FileRecord | None:
    """
    The metadata store's record of C{key}; L{None} while the store is down
    (L{Unavailable}), so that the file is fetched from the upstream instead.
    """
    try:
        return await metadata.get_file(key)
    except Unavailable:
        return None


@attrs.define(eq=False)
class Outage:
    """
    Whether one store works, and what to do while it does not.

    @ivar store: the store's label in metrics and C{/health}: C{"metadata"}
        or C{"files"}.
    @ivar what: the store for people, in log lines.
    @ivar consequence: what the proxy does without it, for the log line.
    @ivar retry: seconds between background probes while it is down.
    @ivar fatal: whether the instance cannot serve without it (C{/health}
        answers 503 then): true of a local SQLite database, not of a Redis
        shared by every instance (a load balancer must not take them all
        out at once).
    """

    store: str
    what: str
    _clock: IReactorTime
    consequence: str = "degrading"
    retry: float = 5.0
    fatal: bool = False
    metrics: Any = None
    #: Asks the store whether it works (fails if it does not).
    probe: Callable[[], Deferred[Any]] | None = None
    since: float | None = None
    reason: str | None = None
    failures: int = 0
    _recovered: list[Callable[[], object]] = attrs.field(factory=list)
    _timer: Any = None
    #: The probe in progress, if one is, and the callers waiting for it.
    _checking: Once[None] | None = None
    _stopped: bool = False
    #: Fires once the recovery hooks of the last outage are done.
    recovery: Deferred[None] = attrs.field(factory=lambda: succeed(None))

    def __attrs_post_init__(self) -> None:
        self._gauge(1)

    @property
    def down(self) -> bool:
        return self.since is not None

    def _gauge(self, value: int) -> None:
        if self.metrics is not None:
            self.metrics.store_up.labels(self.store).set(value)

    def on_recovery(self, hook: Callable[[], object]) -> None:
        """
        Call C{hook} each time the store comes back.
        """
        self._recovered.append(hook)

    def failed(self, error: BaseException, count: bool = True) -> Unavailable:
        """
        A call to the store failed with C{error}: count it, and log it if it
        starts an outage.

        @return: the L{Unavailable} for callers.
        """
        reason = describe(error)
        if count:
            self.failures += 1
            if self.metrics is not None:
                self.metrics.store_errors.labels(self.store).inc()
        self.reason = reason
        if self.since is None:
            self.since = self._clock.seconds()
            self._gauge(0)
            log.error(
                "{what} is failing: {reason}; {consequence} until it is back (tried every {retry:g} s)",
                what=self.what,
                reason=reason,
                consequence=self.consequence,
                retry=self.retry,
                store=self.store,
            )
            self._schedule()
        return Unavailable(reason)

    def refused(self) -> None:
        """
        A call was refused at once because the store is down: count it.
        """
        self.failures += 1
        if self.metrics is not None:
            self.metrics.store_errors.labels(self.store).inc()

    def ok(self) -> None:
        """
        A call to the store worked: end the outage, if there was one.
        """
        if self.since is None:
            return
        seconds = self._clock.seconds() - self.since
        log.info(
            "{what} is back after {seconds:.1f} s ({failures} failed calls)",
            what=self.what,
            seconds=seconds,
            failures=self.failures,
            store=self.store,
        )
        self.since = self.reason = None
        self.failures = 0
        self._gauge(1)
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        hooks = [maybeDeferred(hook) for hook in self._recovered]
        for d in hooks:
            d.addErrback(lambda f: log.failure("after {what} came back", f, what=self.what))
        recovery = defer.gatherResults(hooks)
        self.recovery = recovery.addCallback(lambda _: None)

    def _schedule(self, delay: float | None = None) -> None:
        """
        Probe the store in C{delay} seconds (by default: soon after the
        first failure, which may have been a blip, then every C{retry}).
        """
        if self.probe is None or self._stopped:
            return
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        if delay is None:
            delay = min(1.0, self.retry)
        self._timer = self._clock.callLater(delay, self._probe_now)

    def _probe_now(self) -> None:
        self._timer = None
        Deferred.fromCoroutine(self.check()).addErrback(
            lambda f: log.failure("probing {what} crashed", f, what=self.what)
        )

    async def _probe_once(self) -> None:
        assert self.probe is not None
        try:
            await maybeDeferred(self.probe)
        except Exception as e:
            if self.down:
                self.reason = describe(e)
                self._schedule(self.retry)
            else:
                self.failed(e, count=False)
        else:
            self.ok()

    def _probed(self, _: object) -> None:
        checking, self._checking = self._checking, None
        if checking is not None:
            checking.happen(None)

    async def check(self, wait: float | None = None) -> None:
        """
        Ask the store now (one probe at a time however many ask), and wait
        for its answer for up to C{wait} seconds; not at all while it is
        known down (a store that hangs would cost each caller C{wait}).
        """
        if self.probe is None:
            return
        if self.down:
            wait = 0.0
        checking = self._checking
        if checking is None:
            checking = self._checking = Once()
            probing = Deferred.fromCoroutine(self._probe_once())
            probing.addErrback(lambda f: log.failure("probing {what} crashed", f, what=self.what))
            probing.addBoth(self._probed)
        if wait is not None and wait <= 0:
            return
        mine = checking.wait()
        if wait is not None:
            mine.addTimeout(wait, self._clock)
        try:
            await mine
        except defer.TimeoutError:
            pass

    def watch(
        self, d: Deferred[T], count: bool = True, innocent: Callable[[BaseException], bool] = lambda e: False
    ) -> Deferred[T]:
        """
        A call to the store: its success says the store is up; its failure
        is the store failing (an L{Unavailable}, counted unless not
        C{count}), except a cancellation by the caller (its client left)
        and the errors C{innocent} says are no fault of the store (a key
        that is not there).
        """

        def worked(result: T) -> T:
            self.ok()
            return result

        def failed(failure: Failure) -> Failure:
            error = failure.value
            assert isinstance(error, BaseException)
            if isinstance(error, CancelledError) or innocent(error):
                return failure
            return Failure(self.failed(error, count=count))

        return d.addCallbacks(worked, failed)

    def stop(self) -> None:
        """
        Stop probing (the service is stopping).
        """
        self._stopped = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def health(self) -> dict[str, Any]:
        """
        The store's part of C{/health}.
        """
        if self.since is None:
            return {"state": "ok"}
        return {"state": "failing", "since": self.since, "reason": self.reason, "failed_calls": self.failures}


@implementer(IMetadata)
@attrs.define
class WatchedMetadata:
    """
    A metadata store whose failures are L{Outage}s.  Access times and
    download counts that cannot be written are kept in memory and written
    when the store is back: they are data, not to be lost to an outage.
    """

    inner: Any
    outage: Outage
    _accessed: dict[str, float] = attrs.field(factory=dict)
    _downloads: dict[tuple[str, str, str], int] = attrs.field(factory=dict)

    def __attrs_post_init__(self) -> None:
        if self.outage.probe is None:
            self.outage.probe = self.inner.ping
        self.outage.on_recovery(self._write_kept)

    def call(self, f: Callable[..., Deferred[T]], *args: Any) -> Deferred[T]:
        return self.outage.watch(maybeDeferred(f, *args))

    def close(self) -> Deferred[None]:
        closed: Deferred[None] = maybeDeferred(self.inner.close)
        return closed

    def ping(self) -> Deferred[None]:
        return self.call(self.inner.ping)

    def get_page(self, key: str) -> Deferred[PageRecord | None]:
        return self.call(self.inner.get_page, key)

    def put_page(self, record: PageRecord) -> Deferred[None]:
        return self.call(self.inner.put_page, record)

    def delete_page(self, key: str) -> Deferred[None]:
        return self.call(self.inner.delete_page, key)

    def touch_page(self, key: str, fetched_at: float) -> Deferred[None]:
        return self.call(self.inner.touch_page, key, fetched_at)

    def get_file(self, key: str) -> Deferred[FileRecord | None]:
        return self.call(self.inner.get_file, key)

    def put_file(self, record: FileRecord) -> Deferred[FileRecord | None]:
        return self.call(self.inner.put_file, record)

    def delete_file(self, key: str, expected: FileRecord | None = None) -> Deferred[FileRecord | None]:
        return self.call(self.inner.delete_file, key, expected)

    def usage(self) -> Deferred[tuple[int, int]]:
        return self.call(self.inner.usage)

    def least_recent(self, limit: int) -> Deferred[list[FileRecord]]:
        return self.call(self.inner.least_recent, limit)

    def top_projects(self, limit: int) -> Deferred[list[tuple[str, int]]]:
        return self.call(self.inner.top_projects, limit)

    def project_downloads(self, project: str) -> Deferred[list[tuple[str, str, int]]]:
        return self.call(self.inner.project_downloads, project)

    def touch_files(self, accessed: dict[str, float]) -> Deferred[None]:
        accessed = dict(accessed)

        def keep(failure: Failure) -> None:
            failure.trap(Unavailable)
            for key, when in accessed.items():
                self._accessed[key] = max(when, self._accessed.get(key, when))

        return self.call(self.inner.touch_files, accessed).addErrback(keep)

    def add_downloads(self, counts: dict[tuple[str, str, str], int]) -> Deferred[None]:
        counts = dict(counts)

        def keep(failure: Failure) -> None:
            failure.trap(Unavailable)
            for key, n in counts.items():
                self._downloads[key] = self._downloads.get(key, 0) + n

        return self.call(self.inner.add_downloads, counts).addErrback(keep)

    def kept(self) -> tuple[int, int]:
        """
        How many access times and download counts wait for the store.
        """
        return len(self._accessed), len(self._downloads)

    def _write_kept(self) -> Deferred[None]:
        accessed, self._accessed = self._accessed, {}
        downloads, self._downloads = self._downloads, {}
        writes: list[Deferred[None]] = []
        if accessed:
            writes.append(self.touch_files(accessed))
        if downloads:
            writes.append(self.add_downloads(downloads))
        if writes:
            log.info(
                "writing {accessed} access times and {downloads} download counts kept during the outage",
                accessed=len(accessed),
                downloads=len(downloads),
            )
        done = defer.gatherResults(writes, consumeErrors=True)
        return done.addCallback(lambda _: None)


@implementer(IFileReader)
@attrs.define(slots=False)  # it may also provide the inner reader's IRedirectable or ILocalFile
class WatchedReader:
    """
    A reader of a watched store: a failed read is an L{Unavailable} too.
    """

    _inner: Any
    _store: WatchedStore

    def __attrs_post_init__(self) -> None:
        if IRedirectable.providedBy(self._inner):
            alsoProvides(self, IRedirectable)
        if ILocalFile.providedBy(self._inner):
            alsoProvides(self, ILocalFile)

    @property
    def fd(self) -> int:
        """
        The inner local reader's descriptor (when it is one: L{ILocalFile}).
        """
        fd: int = self._inner.fd
        return fd

    @property
    def key(self) -> str:
        key: str = self._inner.key
        return key

    def url(self, ttl: float) -> Deferred[str]:
        """
        A presigned URL of the file (when the inner reader makes them).
        Signing is local work: its failure is not an outage of the store.
        """
        url: Deferred[str] = IRedirectable(self._inner).url(ttl)
        return url

    @property
    def size(self) -> int:
        size: int = self._inner.size
        return size

    def read(self, offset: int, length: int) -> Deferred[bytes]:
        # Never refused: one failed call elsewhere must not cut off every
        # client reading a file that may still be readable.
        return self._store.call(self._inner.read, offset, length, refuse=False)

    def close(self) -> None:
        self._inner.close()


@implementer(IUpload)
@attrs.define
class WatchedUpload:
    """
    An upload into a watched store: a failure to complete it is an
    L{Unavailable} (the outage is logged once) when the store is failing.
    """

    _inner: Any
    _store: WatchedStore

    @property
    def sent(self) -> int:
        sent: int = self._inner.sent
        return sent

    def spooled(self, length: int) -> None:
        self._inner.spooled(length)

    def wait_sent(self, length: int) -> Deferred[None]:
        d: Deferred[None] = self._inner.wait_sent(length)
        return d

    def complete(self, length: int) -> Deferred[None]:
        # A download that was verified is worth one more try, even if a
        # call failed meanwhile: not refused.
        return self._store.call(self._inner.complete, length, refuse=False)

    def abort(self) -> Deferred[None]:
        d: Deferred[None] = self._inner.abort()
        return d


@implementer(IFileStore)
@attrs.define(slots=False)  # it may also provide the inner store's IStreamingUpload
class WatchedStore:
    """
    A file store whose failures are L{Outage}s.  While it is down, calls are
    refused at once (the background probe finds out when it is back); a
    client whose cached file cannot be opened is served from the upstream.
    """

    inner: Any
    outage: Outage

    def __attrs_post_init__(self) -> None:
        if self.outage.probe is None:
            self.outage.probe = self._probe
        if IStreamingUpload.providedBy(self.inner):
            alsoProvides(self, IStreamingUpload)

    def start_upload(self, spool_path: str, key: str, sha256: str) -> IUpload:
        """
        Start the inner store's upload of a file while it downloads.

        @raise Unavailable: while the store is down.
        """
        if self.outage.down:
            self.outage.refused()
            raise Unavailable(f"{self.outage.what} is down")
        return WatchedUpload(IStreamingUpload(self.inner).start_upload(spool_path, key, sha256), self)

    @property
    def spool_dir(self) -> str:
        spool: str = self.inner.spool_dir
        return spool

    def call(
        self, f: Callable[..., Deferred[T]], *args: Any, count: bool = True, refuse: bool = True
    ) -> Deferred[T]:
        """
        Call the inner store through the outage: refused at once while it
        is down (unless not C{refuse}), and a failure other than a missing
        key or a cancellation by the caller counts as the store failing.
        """
        if refuse and self.outage.down:
            if count:
                self.outage.refused()
            return fail(Unavailable(f"{self.outage.what} is down (it failed with {self.outage.reason})"))
        return self.outage.watch(maybeDeferred(f, *args), count=count, innocent=_missing)

    def _probe(self) -> Deferred[None]:
        """
        Ask the store whether it can serve: its own probe (a read of a known
        object) where it has one, else an open of a key that is never
        there.
        """
        if IProbed.providedBy(self.inner):
            d: Deferred[None] = IProbed(self.inner).probe()
            return d
        return Deferred.fromCoroutine(self._open_absent())

    async def _open_absent(self) -> None:
        reader = await self.inner.open(PROBE_KEY)
        if reader is not None:
            reader.close()

    def commit(self, spool_path: str, key: str) -> Deferred[None]:
        # A failed commit is counted by the download that made it.
        return self.call(self.inner.commit, spool_path, key, count=False)

    def open(self, key: str) -> Deferred[IFileReader | None]:
        def watched(reader: Any) -> IFileReader | None:
            return None if reader is None else WatchedReader(reader, self)

        return self.call(self.inner.open, key).addCallback(watched)

    def delete(self, key: str) -> Deferred[None]:
        return self.call(self.inner.delete, key)


__all__ = ["CHECK_WAIT", "Outage", "Unavailable", "WatchedMetadata", "WatchedReader", "WatchedStore"]

"""
Index pages: fetched from the upstream once per TTL however many clients ask
(single flight), kept in memory with their rendered bodies, and persisted in
the metadata store so that they survive a restart.  While the metadata store
is down, pages are served from memory or fetched from the upstream, and not
persisted (the outage is logged once, by L{txpypi.outages}).
"""

from __future__ import annotations

import gzip
import hashlib
from collections import OrderedDict
from collections.abc import Callable, Coroutine
from typing import Any, Generic, TypeVar

import attrs
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from txpypi.index import (
    HTML_LEGACY,
    JSON_V1,
    IndexParseError,
    ProjectList,
    ProjectPage,
    dump_page,
    load_page,
    parse_project,
    parse_project_list,
    render_page,
    render_project_list_html,
    render_project_list_json,
)
from txpypi.metadata import IMetadata, PageRecord
from txpypi.outages import Unavailable
from txpypi.upstream import FetchedPage, Upstream, UpstreamClient, UpstreamError, UpstreamNotFound

log = Logger()

K = TypeVar("K")
T = TypeVar("T")

LIST_JSON = "application/json"


class SingleFlight(Generic[K, T]):
    """
    Run at most one coroutine per key at a time; callers who ask while it
    runs share its result.  A caller that cancels its own Deferred does not
    cancel the shared work.
    """

    def __init__(self) -> None:
        self._waiting: dict[K, list[Deferred[T]]] = {}

    def __contains__(self, key: K) -> bool:
        return key in self._waiting

    def run(self, key: K, work: Callable[[], Coroutine[Any, Any, T]]) -> Deferred[T]:
        mine: Deferred[T] = Deferred()
        waiters = self._waiting.get(key)
        if waiters is not None:
            waiters.append(mine)
            return mine
        self._waiting[key] = [mine]
        Deferred.fromCoroutine(work()).addBoth(self._done, key)
        return mine

    def _done(self, result: T | Failure, key: K) -> None:
        for waiter in self._waiting.pop(key):
            if not waiter.called:
                waiter.callback(result)  # a Failure runs the errbacks


@attrs.define(eq=False)
class CachedPage:
    """
    A page in memory, with its bodies rendered in advance: serving it is a
    dictionary lookup.
    """

    key: str
    model: ProjectPage | ProjectList
    fetched_at: float
    etag: str | None
    last_modified: str | None
    html: bytes
    json: bytes
    html_gzip: bytes
    json_gzip: bytes
    html_etag: str
    json_etag: str

    def body(self, content_type: str, gzipped: bool = False) -> bytes:
        if content_type == JSON_V1:
            return self.json_gzip if gzipped else self.json
        return self.html_gzip if gzipped else self.html

    def validator(self, content_type: str, gzipped: bool = False) -> str:
        """
        A strong validator for one representation of the page.
        """
        tag = self.json_etag if content_type == JSON_V1 else self.html_etag
        return f'"{tag}-gz"' if gzipped else f'"{tag}"'

    def dump(self) -> bytes:
        if isinstance(self.model, ProjectList):
            return self.json
        return dump_page(self.model)


def prepare(
    key: str,
    model: ProjectPage | ProjectList,
    fetched_at: float,
    etag: str | None = None,
    last_modified: str | None = None,
) -> CachedPage:
    """
    Render a page's bodies.  Pure; run in a thread for large pages.
    """
    if isinstance(model, ProjectList):
        html = render_project_list_html(model.projects)
        json = render_project_list_json(model.projects)
    else:
        html = render_page(model, HTML_LEGACY)
        json = render_page(model, JSON_V1)
    return CachedPage(
        key,
        model,
        fetched_at,
        etag,
        last_modified,
        html,
        json,
        gzip.compress(html, 6, mtime=0),
        gzip.compress(json, 6, mtime=0),
        hashlib.sha256(html).hexdigest()[:32],
        hashlib.sha256(json).hexdigest()[:32],
    )


Blocking = Callable[..., Deferred[Any]]


def inline(f: Callable[..., T], *args: Any) -> Deferred[T]:
    """
    Run C{f} now; for tests and small deployments.
    """
    return maybeDeferred(f, *args)


HIT = "HIT"
MISS = "MISS"
STALE = "STALE"


class NotFound(Exception):
    """
    The upstream does not know this project.
    """


@attrs.define
class PageCache:
    """
    Index pages of one upstream.
    """

    _clock: Any
    _client: UpstreamClient
    _metadata: IMetadata
    upstream: Upstream
    ttl: float
    group: str = "default"
    max_pages: int = 4096
    #: How long past its TTL a page may still be served while the upstream
    #: fails (0: never).
    stale_ttl: float = 7 * 24 * 3600.0
    #: Never ask the upstream; serve what is cached.
    offline: bool = False
    #: Runs parsing and rendering (pure, CPU-bound) off the reactor thread.
    _blocking: Blocking = inline
    _memory: OrderedDict[str, CachedPage] = attrs.field(factory=OrderedDict)
    _flights: SingleFlight[str, CachedPage] = attrs.field(factory=SingleFlight)

    def key(self, project: str | None) -> str:
        return f"{self.group}/simple/{project}/" if project else f"{self.group}/simple/"

    def remaining(self, page: CachedPage) -> float:
        """
        Seconds of freshness left (negative when stale).
        """
        now: float = self._clock.seconds()
        return self.ttl - (now - page.fetched_at)

    def fresh(self, project: str | None) -> CachedPage | None:
        """
        The page, if it is in memory and fresh: the synchronous hot path.
        """
        page = self._memory.get(self.key(project))
        if page is not None and self.remaining(page) > 0:
            self._memory.move_to_end(page.key)
            return page
        return None

    async def forget(self, project: str | None) -> None:
        """
        Forget a page (L{None}: the project list) so that the next request
        fetches it from the upstream.
        """
        key = self.key(project)
        self._memory.pop(key, None)
        await self._metadata.delete_page(key)

    def _remember(self, page: CachedPage) -> None:
        self._memory[page.key] = page
        self._memory.move_to_end(page.key)
        while len(self._memory) > self.max_pages:
            self._memory.popitem(last=False)

    def age(self, page: CachedPage) -> float:
        now: float = self._clock.seconds()
        return now - page.fetched_at

    def _usable_stale(self, page: CachedPage | None) -> bool:
        if page is None:
            return False
        if self.offline:
            return True
        return self.stale_ttl > 0 and -self.remaining(page) < self.stale_ttl

    async def get(self, project: str | None) -> tuple[CachedPage, str]:
        """
        The page for C{project} (L{None}: the project list), and how it was
        answered: C{HIT}, C{MISS} (the upstream was asked) or C{STALE} (a
        copy past its TTL, because the upstream failed or we are offline).

        @raise NotFound: the upstream does not know the project (offline:
            the project is not cached).
        @raise UpstreamError: the upstream failed and no usable copy exists.
        """
        page = self.fresh(project)
        if page is not None:
            return page, HIT
        key = self.key(project)
        if key not in self._flights and key not in self._memory:
            try:
                record = await self._metadata.get_page(key)
            except Unavailable:
                record = None  # the metadata store is down: ask the upstream
            if record is not None:
                loaded = await self._blocking(self._load, project, record)
                if loaded is not None and key not in self._memory:
                    self._remember(loaded)
            # A flight may have landed while we read the store.
            page = self.fresh(project)
            if page is not None:
                return page, HIT
        stale = self._memory.get(key)
        if self.offline:
            if stale is None:
                raise NotFound(project)
            return stale, STALE
        try:
            return await self._flights.run(key, lambda: self._fetch(project, stale)), MISS
        except UpstreamError as e:
            stale = self._memory.get(key)
            if not self._usable_stale(stale):
                raise
            assert stale is not None
            log.warn(
                "serving {key} stale ({age:.0f} s old): {reason}",
                key=key,
                age=self.age(stale),
                reason=e.reason,
            )
            return stale, STALE

    def _load(self, project: str | None, record: PageRecord) -> CachedPage | None:
        if record.upstream != self.upstream.url:
            return None  # stored while another upstream was configured
        try:
            model: ProjectPage | ProjectList
            if project is None:
                model = parse_project_list(record.body, LIST_JSON)
            else:
                model = load_page(project, record.body)
        except IndexParseError:
            log.warn("ignoring unreadable stored page {key}", key=record.key)
            return None
        return prepare(record.key, model, record.fetched_at, record.etag, record.last_modified)

    def _parse(self, project: str | None, fetched: FetchedPage, now: float) -> tuple[CachedPage, bytes]:
        model: ProjectPage | ProjectList
        if project is None:
            model = parse_project_list(fetched.body, fetched.content_type)
        else:
            model = parse_project(project, fetched.body, fetched.content_type, fetched.url)
        page = prepare(self.key(project), model, now, fetched.etag, fetched.last_modified)
        return page, page.dump()

    async def _fetch(self, project: str | None, stale: CachedPage | None) -> CachedPage:
        url = self.upstream.project_url(project) if project else self.upstream.list_url()
        try:
            if stale is None:
                fetched = await self._client.fetch_page(url)
            else:
                fetched = await self._client.fetch_page(url, stale.etag, stale.last_modified)
        except UpstreamNotFound:
            raise NotFound(project) from None
        if fetched.not_modified and stale is not None:
            # Revalidated: the copy we have is fresh again, with no body sent.
            page = attrs.evolve(stale, fetched_at=self._clock.seconds())
            self._remember(page)
            try:
                await self._metadata.touch_page(page.key, page.fetched_at)
            except Unavailable:
                pass  # the metadata store is down: the outage is logged once
            except Exception:
                log.failure("could not store page {key}", key=page.key)
            return page
        try:
            parsed: tuple[CachedPage, bytes] = await self._blocking(
                self._parse, project, fetched, self._clock.seconds()
            )
            page, dumped = parsed
        except IndexParseError as e:
            raise UpstreamError(502, f"unreadable upstream page {url}: {e}") from e
        self._remember(page)
        record = PageRecord(
            key=page.key,
            upstream=self.upstream.url,
            url=fetched.url,
            body=dumped,
            fetched_at=page.fetched_at,
            etag=page.etag,
            last_modified=page.last_modified,
        )
        try:
            await self._metadata.put_page(record)
        except Unavailable:
            pass  # the metadata store is down: the outage is logged once
        except Exception:
            log.failure("could not store page {key}", key=page.key)
        return page

"""
Index pages: fetched from the upstream once per TTL however many clients ask
(single flight), kept in memory with their rendered bodies, and persisted in
the metadata store so that they survive a restart.  While the metadata store
is down, pages are served from memory or fetched from the upstream, and not
persisted (the outage is logged once, by L{txpypi.storage.outages}).

Memory is bounded: pages in memory are counted in bytes (their bodies and
an estimate of their parsed model, see L{model_cost}) and the least
recently used go first past C{max_bytes}; a body longer than
L{INFLATE_ABOVE} is kept gzip-compressed only; the project list (700,000
names on PyPI) is one bytes blob, not one object per project.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import io
import sys
import zlib
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from txpypi.cache.coordinator import ICoordinator
from txpypi.concurrency.waiters import SingleFlight, in_thread_now
from txpypi.core.live import Live
from txpypi.core.simple.formats import dump_page, load_page, parse_project, parse_project_list, render_page
from txpypi.core.simple.listhtml import project_list_html
from txpypi.core.simple.listjson import project_list_json
from txpypi.core.simple.media import HTML_LEGACY, JSON_V1
from txpypi.core.simple.model import DistFile, IndexParseError, ProjectPage
from txpypi.core.simple.projects import ProjectList
from txpypi.fetch.upstream import (
    MAX_PAGE_BYTES,
    FetchedPage,
    Limiter,
    Upstream,
    UpstreamClient,
    UpstreamError,
    UpstreamNotFound,
)
from txpypi.storage.metadata import IMetadata, PageRecord
from txpypi.storage.outages import Unavailable

log = Logger(namespace="txpypi.pages")

K = TypeVar("K")
T = TypeVar("T")

LIST_JSON = "application/json"

#: A rendered body longer than this is kept in memory gzip-compressed only
#: (a fifth of its size, or less); a client that does not accept gzip gets
#: it inflated slice by slice as it is sent.
INFLATE_ABOVE = 1024 * 1024

#: The most project names remembered as unknown to the upstream
#: (C{--negative-ttl}); past it the oldest are forgotten first.
MAX_NEGATIVE = 10_000


@attrs.frozen
class Body:
    """
    One format of a page, rendered: gzip-compressed always, and as it is
    (C{identity}) unless it is longer than L{INFLATE_ABOVE}.

    @ivar length: the length of the uncompressed body.
    @ivar tag: a digest of the uncompressed body, for its validators.
    """

    gzip: bytes
    identity: bytes | None
    length: int
    tag: str

    @classmethod
    def of(cls, data: bytes) -> Body:
        return cls(
            gzip.compress(data, 6, mtime=0),
            None if len(data) > INFLATE_ABOVE else data,
            len(data),
            hashlib.sha256(data).hexdigest()[:32],
        )

    @classmethod
    def of_pieces(cls, pieces: Iterable[bytes]) -> Body:
        """
        The same as L{of} the pieces joined, compressed and hashed a piece
        at a time: a big body is never whole in memory uncompressed.
        """
        deflater = zlib.compressobj(6, zlib.DEFLATED, 31)
        digest = hashlib.sha256()
        compressed = io.BytesIO()
        kept: list[bytes] | None = []
        length = 0
        for piece in pieces:
            length += len(piece)
            digest.update(piece)
            compressed.write(deflater.compress(piece))
            if kept is not None:
                kept.append(piece)
                if length > INFLATE_ABOVE:
                    kept = None
        compressed.write(deflater.flush())
        identity = None if kept is None else b"".join(kept)
        return cls(compressed.getvalue(), identity, length, digest.hexdigest()[:32])

    @property
    def cost(self) -> int:
        return len(self.gzip) + (0 if self.identity is None else len(self.identity))


@attrs.frozen
class Representation:
    """
    What one answer sends: C{data}, or with C{inflate} C{data} is gzip to
    inflate on the way; C{length} bytes reach the client.
    """

    data: bytes
    length: int
    inflate: bool
    etag: str


@attrs.define(eq=False)
class CachedPage:
    """
    A page in memory, with its bodies rendered in advance: serving it is a
    dictionary lookup.

    @ivar cost: the bytes of memory it holds, by L{page_cost}.
    """

    key: str
    model: ProjectPage | ProjectList
    fetched_at: float
    etag: str | None
    last_modified: str | None
    html: Body
    json: Body
    cost: int
    #: What the web layer built once per representation, by content type
    #: and gzip (the quick lane's header lines): two per content type
    #: served at most.
    answers: dict[tuple[str, bool], object] = attrs.field(factory=dict, repr=False)

    def _body(self, content_type: str) -> Body:
        return self.json if content_type == JSON_V1 else self.html

    def validator(self, content_type: str, gzipped: bool = False) -> str:
        """
        A strong validator for one representation of the page.
        """
        tag = self._body(content_type).tag
        return f'"{tag}-gz"' if gzipped else f'"{tag}"'

    def representation(self, content_type: str, gzipped: bool) -> Representation:
        body = self._body(content_type)
        etag = self.validator(content_type, gzipped)
        if gzipped:
            return Representation(body.gzip, len(body.gzip), False, etag)
        if body.identity is not None:
            return Representation(body.identity, body.length, False, etag)
        return Representation(body.gzip, body.length, True, etag)

    def dump(self) -> bytes:
        """
        The page as the metadata store keeps it: a project page as JSON
        with its upstream URLs (L{dump_page}); the project list as its
        gzip-compressed JSON body in base64 (3 MB for PyPI's rather than
        20 MB, text as the Redis store wants it; see L{load_stored_list}).
        """
        if isinstance(self.model, ProjectList):
            return base64.b64encode(self.json.gzip)
        return dump_page(self.model)


# What parsed values cost in memory beyond the characters of their strings,
# from sys.getsizeof (CPython 3.11, 64 bits: 49 bytes for a str, 184 for a
# small dict, 104 for a DistFile).  Measured once against tracemalloc by
# tests/test_pages.py::test_model_cost_is_honest, which parses pages of
# 2,000 files: for JSON with sizes, upload times, hashes and metadata hashes
# the estimate is 2.4% under what tracemalloc counts (1,175 against 1,204
# bytes a file), for HTML 4.9% under (allocator rounding, mostly).
_STR = sys.getsizeof("")
_DICT = sys.getsizeof({"sha256": ""})
_INT = sys.getsizeof(2**40)
_FILE = sys.getsizeof(DistFile("", "")) + 8  # and its slot in the files tuple
_PAGE = 1024  # the page, its tuples, and the CachedPage itself


def _text_cost(value: str | None) -> int:
    return 0 if value is None else _STR + len(value)


def _hashes_cost(hashes: Any) -> int:
    return _DICT + sum(_text_cost(k) + _text_cost(v) for k, v in hashes.items())


def model_cost(model: ProjectPage | ProjectList) -> int:
    """
    An estimate of the bytes a parsed page holds in memory.
    """
    if isinstance(model, ProjectList):
        return _PAGE + len(model.names)
    total = _PAGE + sum(_text_cost(v) + 8 for v in model.versions or ())
    for f in model.files:
        total += _FILE + _text_cost(f.filename) + _text_cost(f.url) + _hashes_cost(f.hashes)
        total += _text_cost(f.requires_python) + _text_cost(f.upload_time)
        if isinstance(f.yanked, str):
            total += _text_cost(f.yanked)
        if not isinstance(f.core_metadata, bool):
            total += _hashes_cost(f.core_metadata)
        if f.size is not None:
            total += _INT
    return total


def prepare(
    key: str,
    model: ProjectPage | ProjectList,
    fetched_at: float,
    etag: str | None = None,
    last_modified: str | None = None,
) -> CachedPage:
    """
    Render a page's bodies, one format after the other (so that a big
    page's uncompressed bodies are not both in memory at once).  Pure; run
    in a thread for large pages.
    """
    if isinstance(model, ProjectList):
        html = Body.of_pieces(project_list_html(model))
        json = Body.of_pieces(project_list_json(model))
    else:
        html = Body.of(render_page(model, HTML_LEGACY))
        json = Body.of(render_page(model, JSON_V1))
    cost = html.cost + json.cost + model_cost(model)
    return CachedPage(key, model, fetched_at, etag, last_modified, html, json, cost)


#: How a stored project list in base64 of gzip begins (a gzip header,
#: 1f 8b 08, in base64); one stored as plain JSON begins with "{".
_BASE64_GZIP = b"H4sI"


def load_stored_list(body: bytes) -> ProjectList:
    """
    The project list from its stored form (L{CachedPage.dump}), or from
    plain JSON as stored before.

    @raise IndexParseError: it cannot be read.
    """
    if body.startswith(_BASE64_GZIP):
        try:
            body = inflate(base64.b64decode(body, validate=True))
        except ValueError as e:  # binascii.Error included
            raise IndexParseError(f"stored project list: {e}") from e
    return parse_project_list(body, LIST_JSON)


def inflate(data: bytes, limit: int = MAX_PAGE_BYTES) -> bytes:
    """
    Decompress a gzip body (one we made) of at most C{limit} bytes.

    @raise IndexParseError: it is not gzip, is cut, or is larger.
    """
    inflater = zlib.decompressobj(wbits=31)
    try:
        out = inflater.decompress(data, limit + 1)
    except zlib.error as e:
        raise IndexParseError(f"invalid gzip: {e}") from e
    if len(out) > limit or not inflater.eof:
        raise IndexParseError("gzip body cut or too large")
    return out


Blocking = Callable[..., Deferred[Any]]


HIT = "HIT"
MISS = "MISS"

#: While another worker fetches a page, how long to wait before looking
#: again whether it is done: first, then at most (doubling in between).
SHARED_WAIT_FIRST = 0.005
SHARED_WAIT_MOST = 0.05
STALE = "STALE"


class NotFound(Exception):
    """
    The upstream does not know this project.
    """


@attrs.define(eq=False)
class PageMemory:
    """
    Pages in memory, least recently used first, and the bytes they cost
    (their C{cost}): one for every upstream's L{PageCache} of a proxy, whose
    keys never meet (each begins with its upstream's prefix).
    """

    pages: OrderedDict[str, CachedPage] = attrs.field(factory=OrderedDict)
    bytes_used: int = 0


@attrs.define
class PageCache:
    """
    Index pages of one upstream.
    """

    _clock: IReactorTime
    _client: UpstreamClient
    _metadata: IMetadata
    upstream: Upstream
    #: Where its pages (and its files, in L{txpypi.cache.files}) are kept:
    #: the upstream's cache prefix (L{txpypi.core.groups.UpstreamSpec.prefix}).
    group: str = "default"
    #: The live settings this cache reads (see the properties below).
    live: Live = attrs.field(factory=Live)
    #: This upstream's own C{index-ttl}, over the live one.
    index_ttl: float | None = attrs.field(default=None, kw_only=True)
    #: Runs parsing and rendering (pure, CPU-bound) off the reactor thread.
    _blocking: Blocking = in_thread_now
    #: Caps the page requests to the upstream in progress at once
    #: (C{--max-upstream-requests}); the others wait their turn for at most
    #: the client's response timeout.
    limiter: Limiter = attrs.field()
    #: The pages in memory, shared with the other upstreams' caches: one
    #: least-recently-used order and one C{page-cache-size} for them all.
    memory: PageMemory = attrs.field(factory=lambda: PageMemory(), kw_only=True)
    #: Keys of projects the upstream said it does not know, and when.
    _unknown: OrderedDict[str, float] = attrs.field(factory=OrderedDict)
    _flights: SingleFlight[str, CachedPage] = attrs.field(factory=SingleFlight)
    _loads: SingleFlight[str, None] = attrs.field(factory=SingleFlight)
    #: Who else fetches pages into the same metadata store (the other
    #: workers): one of them at a time fetches a page, the others wait and
    #: take the copy it stored.  L{None}: this process alone.
    shared: ICoordinator | None = attrs.field(default=None, kw_only=True)

    @property
    def _memory(self) -> OrderedDict[str, CachedPage]:
        return self.memory.pages

    @property
    def bytes_used(self) -> int:
        """
        The bytes the pages in memory cost (of every cache sharing it).
        """
        return self.memory.bytes_used

    @bytes_used.setter
    def bytes_used(self, value: int) -> None:
        self.memory.bytes_used = value

    @limiter.default
    def _default_limiter(self) -> Limiter:
        return Limiter(self._clock, self.live.max_upstream_requests)

    def __attrs_post_init__(self) -> None:
        self.live.on_change(self._retune)

    def _retune(self) -> None:
        self.limiter.limit = self.live.max_upstream_requests  # a raise lets those in line go
        self.trim()

    # -- the live settings it reads

    @property
    def ttl(self) -> float:
        """
        How long a page is fresh (the upstream's C{index-ttl}, else
        C{--index-ttl}).
        """
        return self.live.index_ttl if self.index_ttl is None else self.index_ttl

    @ttl.setter
    def ttl(self, value: float) -> None:
        self.live.index_ttl = value

    @property
    def max_bytes(self) -> int:
        """
        The most bytes the pages in memory may hold (C{--page-cache-size}),
        bodies and parsed models (see L{model_cost}); the least recently
        used go first.  A page larger than this on its own is served but
        not kept.
        """
        return self.live.page_cache_size

    @max_bytes.setter
    def max_bytes(self, value: int) -> None:
        self.live.page_cache_size = value

    @property
    def stale_ttl(self) -> float:
        """
        How long past its TTL a page may still be served while the upstream
        fails (C{--stale-ttl}; 0: never).
        """
        return self.live.stale_ttl

    @stale_ttl.setter
    def stale_ttl(self, value: float) -> None:
        self.live.stale_ttl = value

    @property
    def offline(self) -> bool:
        """
        Never ask the upstream; serve what is cached (C{--offline}).
        """
        return self.live.offline

    @offline.setter
    def offline(self, value: bool) -> None:
        self.live.offline = value

    @property
    def negative_ttl(self) -> float:
        """
        How long a project the upstream does not know is remembered as
        unknown (C{--negative-ttl}; 0: not at all), at most L{MAX_NEGATIVE}.
        """
        return self.live.negative_ttl

    @negative_ttl.setter
    def negative_ttl(self, value: float) -> None:
        self.live.negative_ttl = value

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
        found = self.fresh_left(project)
        return None if found is None else found[0]

    def fresh_left(self, project: str | None) -> tuple[CachedPage, float] | None:
        """
        L{fresh}, with the page's L{remaining} seconds (the quick lane's
        one call for both).
        """
        page = self._memory.get(self.key(project))
        if page is None:
            return None
        left = self.remaining(page)
        if left <= 0:
            return None
        self._memory.move_to_end(page.key)
        return page, left

    async def forget(self, project: str | None) -> None:
        """
        Forget a page (L{None}: the project list), or that the upstream did
        not know the project, so that the next request asks the upstream.
        """
        key = self.key(project)
        self._drop(key)
        self._unknown.pop(key, None)
        await self._metadata.delete_page(key)

    def _drop(self, key: str) -> None:
        page = self._memory.pop(key, None)
        if page is not None:
            self.bytes_used -= page.cost

    def keep(self, page: CachedPage) -> None:
        """
        Keep a page made elsewhere (a group's merged page) in the memory
        this cache shares, under its own key, counted and trimmed with the
        others.
        """
        self._remember(page)

    def _remember(self, page: CachedPage) -> None:
        self._drop(page.key)
        if page.cost > self.max_bytes:
            log.warn(
                "not keeping {key} in memory: it takes {cost} bytes, over the {limit} of page-cache-size",
                key=page.key,
                cost=page.cost,
                limit=self.max_bytes,
            )
        else:
            self._memory[page.key] = page
            self.bytes_used += page.cost
        self.trim()

    def trim(self) -> None:
        """
        Forget the least recently used pages until they fit in C{max_bytes}
        (after it changed, for instance).
        """
        while self.bytes_used > self.max_bytes and self._memory:
            _, page = self._memory.popitem(last=False)
            self.bytes_used -= page.cost

    def _known_unknown(self, key: str) -> bool:
        """
        Whether the upstream said, less than C{negative_ttl} ago, that it
        does not know this project.
        """
        learned = self._unknown.get(key)
        if learned is None:
            return False
        if self._clock.seconds() - learned < self.negative_ttl:
            return True
        del self._unknown[key]
        return False

    def _learn_unknown(self, key: str) -> None:
        if self.negative_ttl <= 0:
            return
        self._unknown[key] = self._clock.seconds()
        self._unknown.move_to_end(key)
        while len(self._unknown) > MAX_NEGATIVE:
            self._unknown.popitem(last=False)

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
        if not self.offline and self._known_unknown(key):
            raise NotFound(project)
        if key not in self._flights and key not in self._memory:
            # One read and parse of the stored copy, however many ask.
            await self._loads.run(key, lambda: self._load_stored(project))
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
            return await self._flights.run(key, lambda: self._fetch_once(project, stale)), MISS
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

    async def _load_stored(self, project: str | None) -> None:
        """
        Read the stored copy of a page into memory, if there is one.
        """
        key = self.key(project)
        try:
            record = await self._metadata.get_page(key)
        except Unavailable:
            return  # the metadata store is down: ask the upstream
        if record is None:
            return
        loaded = await self._blocking(self._load, project, record)
        if loaded is not None and key not in self._memory:
            self._remember(loaded)

    def _load(self, project: str | None, record: PageRecord) -> CachedPage | None:
        if record.upstream != self.upstream.url:
            return None  # stored while another upstream was configured
        try:
            model: ProjectPage | ProjectList
            if project is None:
                model = load_stored_list(record.body)
            else:
                model = load_page(project, record.body)
        except IndexParseError:
            log.warn("ignoring unreadable stored page {key}", key=record.key)
            return None
        return prepare(record.key, model, record.fetched_at, record.etag, record.last_modified)

    def _parse(
        self, project: str | None, fetched: FetchedPage, now: float
    ) -> tuple[CachedPage, bytes, list[tuple[str, str]]]:
        skipped: list[tuple[str, str]] = []
        model: ProjectPage | ProjectList
        if project is None:
            model = parse_project_list(fetched.body, fetched.content_type)
        else:
            model = parse_project(
                project,
                fetched.body,
                fetched.content_type,
                fetched.url,
                lambda href, reason: skipped.append((href, reason)),
            )
            if model.last_serial is None and fetched.last_serial is not None:
                model = attrs.evolve(model, last_serial=fetched.last_serial)  # an HTML page's
        page = prepare(self.key(project), model, now, fetched.etag, fetched.last_modified)
        return page, page.dump(), skipped

    async def _fetch_once(self, project: str | None, stale: CachedPage | None) -> CachedPage:
        """
        Fetch the page, unless another worker fetched it meanwhile: take
        the page's shared lock first (waiting while another worker holds
        it), then the stored copy if it is fresh.
        """
        if self.shared is None:
            return await self._fetch(project, stale)
        name = f"page {self.upstream.url} {self.key(project)}"
        wait = SHARED_WAIT_FIRST
        # At most a response timeout behind another worker's fetch (one
        # that hangs, or fails, for each waiter in turn): then fetch here.
        deadline = self._clock.seconds() + self._client.response_timeout
        while not await self._take(self.shared, name):
            if self._clock.seconds() >= deadline:
                log.info(
                    "fetching {key} here: another worker has fetched it for too long", key=self.key(project)
                )
                return await self._fetch(project, stale)
            await deferLater(self._clock, wait)
            wait = min(wait * 2, SHARED_WAIT_MOST)
        try:
            stored = await self._newer_stored(project, stale)
            if stored is not None and self.remaining(stored) > 0:
                return stored
            return await self._fetch(project, stored or stale)
        finally:
            self.shared.release(name)

    @staticmethod
    async def _take(shared: ICoordinator, name: str) -> bool:
        try:
            return await shared.take(name)
        except Exception:
            return True  # the lock cannot be told: fetch it here

    async def _newer_stored(self, project: str | None, than: CachedPage | None) -> CachedPage | None:
        """
        The stored copy of the page, into memory, when it is newer than
        C{than} (another worker stored it); else L{None}.
        """
        try:
            record = await self._metadata.get_page(self.key(project))
        except Unavailable:
            return None
        if record is None or (than is not None and record.fetched_at <= than.fetched_at):
            return None
        loaded: CachedPage | None = await self._blocking(self._load, project, record)
        if loaded is not None:
            self._remember(loaded)
        return loaded

    async def _fetch(self, project: str | None, stale: CachedPage | None) -> CachedPage:
        key = self.key(project)
        url = self.upstream.project_url(project) if project else self.upstream.list_url()
        await self.limiter.acquire(self._client.response_timeout)
        try:
            if stale is None:
                fetched = await self._client.fetch_page(url)
            else:
                fetched = await self._client.fetch_page(url, stale.etag, stale.last_modified)
        except UpstreamNotFound:
            self._learn_unknown(key)
            raise NotFound(project) from None
        finally:
            self.limiter.release()
        self._unknown.pop(key, None)
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
            parsed: tuple[CachedPage, bytes, list[tuple[str, str]]] = await self._blocking(
                self._parse, project, fetched, self._clock.seconds()
            )
        except IndexParseError as e:
            raise UpstreamError(502, f"unreadable upstream page {url}: {e}") from e
        page, dumped, skipped = parsed
        record = PageRecord(
            key=page.key,
            upstream=self.upstream.url,
            url=fetched.url,
            body=dumped,
            fetched_at=page.fetched_at,
            etag=page.etag,
            last_modified=page.last_modified,
        )
        del fetched, parsed, dumped  # a big body need not wait for the store
        if skipped:
            href, reason = skipped[0]
            log.warn(
                "left {count} link(s) out of {key}: their URL cannot be resolved (first {href!r}: {reason})",
                count=len(skipped),
                key=page.key,
                href=href,
                reason=reason,
            )
        self._remember(page)
        try:
            await self._metadata.put_page(record)
        except Unavailable:
            pass  # the metadata store is down: the outage is logged once
        except Exception:
            log.failure("could not store page {key}", key=page.key)
        return page

"""
Cached files: the records kept in memory, and opening a cached file only
while the project's index still lists it with the same hash (a file that
is gone, damaged or outdated is dropped, to be fetched again).
"""

from __future__ import annotations

import attrs
from twisted.logger import Logger

from txpypi.cache.pages import NotFound, PageCache
from txpypi.cache.records import Records
from txpypi.cache.stats import DownloadStats
from txpypi.cache.usage import Usage
from txpypi.core.names import strongest_hash
from txpypi.core.simple.model import DistFile, ProjectPage
from txpypi.fetch.wanted import ByteSource, Wanted
from txpypi.storage.metadata import FileRecord, IMetadata
from txpypi.storage.outages import Unavailable
from txpypi.storage.stores import IFileStore

log = Logger(namespace="txpypi.files")

METADATA_SUFFIX = ".metadata"


class NotListed(Exception):
    """
    The project's index does not list the requested file.
    """


@attrs.frozen
class Opened:
    """
    A file ready to send.

    @ivar source: the bytes, or L{None} for a HEAD that fetched nothing.
    @ivar size: its length, when known.
    @ivar sha256: its sha256, when known (always for hits).
    @ivar hit: whether it came from the cache.
    """

    source: ByteSource | None
    size: int | None
    sha256: str | None
    hit: bool


def wanted_for(key: str, upstream: str, dist: DistFile, filename: str) -> Wanted | None:
    """
    What to fetch for C{filename}: the dist itself, or its PEP 658 metadata
    file when C{filename} is the dist's name plus C{.metadata}; L{None} when
    the index offers no such file.
    """
    if filename == dist.filename:
        return Wanted(key, filename, upstream, dist.url, strongest_hash(dist.hashes), dist.size)
    if dist.core_metadata is False:
        return None
    hashes = {} if dist.core_metadata is True else dict(dist.core_metadata)  # type: ignore[arg-type]
    return Wanted(key, filename, upstream, dist.url + METADATA_SUFFIX, strongest_hash(hashes), None)


def find_wanted(page: ProjectPage, key: str, upstream: str, filename: str) -> Wanted | None:
    """
    What to fetch for C{filename} as C{page} lists it, or L{None}.
    """
    dist = page.find(filename.removesuffix(METADATA_SUFFIX))
    return None if dist is None else wanted_for(key, upstream, dist, filename)


@attrs.define
class CachedFiles:
    """
    Opens cached files, checked against the index and the store.
    """

    _pages: PageCache
    _store: IFileStore
    _metadata: IMetadata
    _records: Records
    _usage: Usage
    _stats: DownloadStats

    async def open_record(
        self, record: FileRecord | None, project: str, filename: str, pages: PageCache | None = None
    ) -> Opened | None:
        """
        Open a cached file that its index still lists, or return L{None}
        (and drop the record) when it is gone, damaged or outdated, so that
        it is fetched again.  While the file store is down, return L{None}
        and keep the record: the file is served from the upstream meanwhile.
        With no C{record}, return L{None}.  C{pages} is the index of the
        upstream the file came from (the cache's own by default).
        """
        if record is None:
            return None
        why = await self._listed(record, project, filename, pages or self._pages)
        if why is not None:
            await self.drop(record, f"{why}; fetching it again")
            return None
        try:
            reader = await self._store.open(record.store_key)
        except Unavailable:
            return None
        if reader is None:
            await self.drop(record, "it is gone from the store; fetching it again", delete_object=False)
            return None
        if reader.size != record.size:
            reader.close()
            await self.drop(record, f"it has {reader.size} bytes, not {record.size}; fetching it again")
            return None
        self._records.remember(record)
        if self._usage.max_size is not None:
            self._stats.served(record.key)
        return Opened(reader, reader.size, record.sha256, True)

    def open_now(
        self,
        record: FileRecord | None,
        project: str,
        filename: str,
        pages: PageCache,
        largest: int | None = None,
    ) -> Opened | None:
        """
        A hit opened at once, for the quick lane, when everything is known
        in memory: the file's record (of at most C{largest} bytes), a fresh
        page of C{pages} that lists it with the same sha256, and a store
        that opens files without waiting (the disk); else L{None}, and the
        usual way decides (and drops what is stale).
        """
        if record is None or record.upstream != pages.upstream.url:
            return None
        if largest is not None and record.size > largest:
            return None  # not opened, to be opened again the usual way
        page = pages.fresh(project)
        if page is None or not isinstance(page.model, ProjectPage):
            return None
        wanted = find_wanted(page.model, record.key, record.upstream, filename)
        if wanted is None or wanted.expected_hash != ("sha256", record.sha256):
            return None
        open_now = getattr(self._store, "open_now", None)
        if open_now is None:
            return None
        reader = open_now(record.store_key)
        if reader is None:
            return None
        if reader.size != record.size:
            reader.close()
            return None
        self._records.remember(record)
        if self._usage.max_size is not None:
            self._stats.served(record.key)
        return Opened(reader, reader.size, record.sha256, True)

    async def _listed(self, record: FileRecord, project: str, filename: str, pages: PageCache) -> str | None:
        """
        Check a cached file against the project's current index page (fresh,
        or stale while the upstream fails): the reason to fetch it again if
        the page lists it otherwise (another hash, or another URL when the
        page gives no sha256), else L{None}.

        @raise NotListed: the page no longer lists it (the upstream delisted
            it: a removed release must not live on in the cache); the
            record is dropped.
        @raise txpypi.cache.pages.NotFound: the upstream no longer knows the
            project (the record is dropped), or, offline, its page is not
            cached (the record is kept).
        @raise txpypi.fetch.upstream.UpstreamError: there is no page to check it
            against: the upstream fails and no stale copy is usable.
        """
        if record.upstream != pages.upstream.url:
            return f"it came from another upstream ({record.upstream})"
        try:
            page, _ = await pages.get(project)
        except NotFound:
            if not pages.offline:
                await self.drop(record, "the upstream no longer knows its project")
            raise
        assert isinstance(page.model, ProjectPage)
        wanted = find_wanted(page.model, record.key, record.upstream, filename)
        if wanted is None:
            await self.drop(record, "the upstream no longer lists it")
            raise NotListed(f"{filename} is no longer listed")
        if wanted.expected_hash is not None and wanted.expected_hash[0] == "sha256":
            if wanted.expected_hash[1] != record.sha256:
                return "the index now lists another hash"
        elif wanted.url != record.url:
            return "the index now lists it at another URL"
        return None

    async def drop(self, record: FileRecord, why: str, delete_object: bool = True) -> None:
        """
        Forget a cached file: its record -- only if it is still this record,
        not one that landed meanwhile -- and, with C{delete_object}, its
        bytes.  The size and count change by what the metadata store says it
        deleted, so a file dropped twice at once is counted out once.
        """
        log.warn("dropping cached {key}: {why}", key=record.key, why=why)
        self._records.forget(record)
        try:
            deleted = await self._metadata.delete_file(record.key, record)
            if deleted is not None:
                self._usage.account(-deleted.size, -1)
                if delete_object:
                    await self._store.delete(deleted.store_key)
        except Unavailable:
            pass  # a store is down (logged once); the record is found bad again later

    async def purge(self, key: str) -> bool:
        """
        Remove one cached file; C{False} if it was not cached.
        """
        self._records.pop(key, None)
        deleted = await self._metadata.delete_file(key)
        if deleted is None:
            return False
        self._records.pop(key, None)
        self._usage.account(-deleted.size, -1)
        await self._store.delete(deleted.store_key)
        log.info("purged {key}", key=key)
        return True


__all__ = ["METADATA_SUFFIX", "CachedFiles", "NotListed", "Opened", "Records", "find_wanted", "wanted_for"]

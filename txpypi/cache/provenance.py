"""
Provenance objects (PEP 740): fetched once from the URL the upstream's
page listed for a file, checked to be a well-formed JSON object, and kept
for good (a file's provenance is as immutable as the file): in memory (the
last L{MAX_KEPT}) and in the metadata store, so that a restart and a
cluster share them.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Mapping

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from txpypi.cache.lookup import NotListed
from txpypi.cache.pages import PageCache
from txpypi.concurrency.waiters import SingleFlight
from txpypi.core.simple.model import ProjectPage
from txpypi.fetch.upstream import UpstreamClient, UpstreamError
from txpypi.storage.metadata import IMetadata, PageRecord
from txpypi.storage.outages import Unavailable

log = Logger(namespace="txpypi.files")

#: The largest provenance object fetched (PyPI's are a few KB).
MAX_PROVENANCE_BYTES = 1024 * 1024

#: How many provenance objects are kept in memory (all are in the store).
MAX_KEPT = 1_000

#: The media type PEP 740 gives provenance objects.
PROVENANCE_TYPE = "application/vnd.pypi.integrity.v1+json"


def is_json_object(body: bytes) -> bool:
    """
    Whether C{body} is one well-formed JSON object (what is checked before
    an upstream's JSON is kept).
    """
    try:
        return isinstance(json.loads(body), dict)
    except ValueError:
        return False


@attrs.define
class Provenances:
    """
    Every upstream's provenance objects, by the file they are of.
    """

    _metadata: IMetadata
    _clock: IReactorTime
    #: Each upstream's client, by upstream URL.
    _clients: Mapping[str, UpstreamClient]
    _kept: OrderedDict[str, bytes] = attrs.field(factory=OrderedDict)
    _flights: SingleFlight[str, bytes] = attrs.field(factory=SingleFlight)

    async def get(self, pages: PageCache, project: str, filename: str) -> bytes:
        """
        The provenance object of C{filename} as C{pages}' upstream lists it.

        @raise NotListed: the page lists no such file, or none for it.
        @raise UpstreamError: it could not be fetched, or is no JSON object.
        """
        page, _ = await pages.get(project)
        assert isinstance(page.model, ProjectPage)
        dist = page.model.find(filename)
        if dist is None or dist.provenance is None:
            raise NotListed(f"{filename} has no provenance")
        key = f"provenance/{pages.group}/{project}/{filename}"
        kept = self._kept.get(key)
        if kept is not None:
            self._kept.move_to_end(key)
            return kept
        url = dist.provenance
        body = await self._flights.run(key, lambda: self._load(pages, key, url))
        self._keep(key, body)
        return body

    def _keep(self, key: str, body: bytes) -> None:
        self._kept[key] = body
        self._kept.move_to_end(key)
        while len(self._kept) > MAX_KEPT:
            self._kept.popitem(last=False)

    async def _load(self, pages: PageCache, key: str, url: str) -> bytes:
        try:
            stored = await self._metadata.get_page(key)
        except Unavailable:
            stored = None
        if stored is not None and stored.url == url:
            return stored.body
        client = self._clients[pages.upstream.url]
        fetched = await client.fetch_page(url, limit=MAX_PROVENANCE_BYTES)
        if not is_json_object(fetched.body):
            raise UpstreamError(502, f"the provenance at {url} is not a JSON object")
        record = PageRecord(key, pages.upstream.url, url, fetched.body, self._clock.seconds())
        try:
            await self._metadata.put_page(record)
        except Unavailable:
            pass  # kept in memory meanwhile; the outage is logged once
        return fetched.body

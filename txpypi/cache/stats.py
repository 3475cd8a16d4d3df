"""
Download statistics and access times: counted in memory as files are
served, written to the metadata store every minute (and before anything
reads them back).
"""

from __future__ import annotations

import attrs
from twisted.internet.interfaces import IReactorTime

from txpypi.core.simple.model import file_version
from txpypi.storage.metadata import IMetadata


@attrs.define
class DownloadStats:
    """
    Whole downloads per file (for C{/stats}) and when each cached file was
    last served (for eviction, least recently served first).
    """

    _clock: IReactorTime
    _metadata: IMetadata
    _accessed: dict[str, float] = attrs.field(factory=dict)
    _downloads: dict[tuple[str, str, str], int] = attrs.field(factory=dict)

    def served(self, key: str) -> None:
        """
        The cached file C{key} was served now.
        """
        self._accessed[key] = self._clock.seconds()

    def downloaded(self, project: str, filename: str) -> None:
        """
        Count one whole download of a distribution file.
        """
        key = (project, file_version(filename) or "", filename)
        self._downloads[key] = self._downloads.get(key, 0) + 1

    async def flush(self) -> None:
        """
        Write the access times and download counts gathered in memory to the
        metadata store.
        """
        accessed, self._accessed = self._accessed, {}
        if accessed:
            await self._metadata.touch_files(accessed)
        downloads, self._downloads = self._downloads, {}
        if downloads:
            await self._metadata.add_downloads(downloads)

    async def top_projects(self, limit: int) -> list[tuple[str, int]]:
        await self.flush()
        return await self._metadata.top_projects(limit)

    async def project_downloads(self, project: str) -> list[tuple[str, str, int]]:
        await self.flush()
        return await self._metadata.project_downloads(project)

"""
The groups a proxy serves (L{Groups}), and a group's files
(L{GroupFiles}): each opened in the one file cache with the page cache of
the member whose page listed it.
"""

from __future__ import annotations

from collections.abc import Mapping

import attrs
from twisted.internet.interfaces import IReactorTime

from txpypi.cache.files import FileCache, Opened
from txpypi.cache.groups import Group
from txpypi.cache.legacy import LegacyAPI
from txpypi.cache.lookup import NotListed
from txpypi.cache.pages import NotFound, PageCache
from txpypi.cache.policy import PolicedGroup
from txpypi.cache.provenance import Provenances
from txpypi.core.groups import single


@attrs.define
class GroupFiles:
    """
    A group's files: each opened from the member whose page listed it, in
    the one file cache (its key names the member).
    """

    group: Group
    files: FileCache
    #: The group's policy, checked before a file is opened (and fetched).
    policed: PolicedGroup | None = None
    #: Where provenance objects come from (none: not served).
    provenances: Provenances | None = None

    async def open(self, project: str, filename: str, fetch: bool = True, use_store: bool = True) -> Opened:
        """
        Open a file of the group's (see L{FileCache.open}).

        @raise PolicyRefused: the group's policy hides it.
        """
        group = self.group
        if self.policed is not None:
            await self.policed.check_file(project, filename)
        if group.alone:
            if not group.candidates(project):
                raise NotFound(project)
            # The member's page is checked by the file cache itself.
            return await self.files.open(project, filename, fetch, use_store, pages=group.first)
        # A cached file of a project no member knows any more is dropped
        # when its own member's page is checked (FileCache), never here: a
        # group's routes may hide a project that other groups still serve.
        source = await group.source(project, filename)
        return await self.files.open(project, filename, fetch, use_store, pages=source)

    def open_now(self, project: str, filename: str, largest: int | None = None) -> Opened | None:
        """
        A cached file of the group's opened at once, for the quick lane: only
        in a group of one member and no policy in force (anything else the
        usual way decides), see L{FileCache.open_now}.
        """
        group = self.group
        if (self.policed is not None and self.policed.active) or not group.alone:
            return None
        if not group.candidates(project):
            return None
        return self.files.open_now(project, filename, pages=group.first, largest=largest)

    async def provenance(self, project: str, filename: str) -> bytes:
        """
        The provenance object of the group's file C{filename} (PEP 740),
        from the member that listed the file.

        @raise NotListed: no provenance (or none served here).
        @raise PolicyRefused: the group's policy hides the file.
        """
        if self.provenances is None:
            raise NotListed(f"{filename} has no provenance")
        if self.policed is not None:
            await self.policed.check_file(project, filename)
        source = await self.group.source(project, filename)
        return await self.provenances.get(source, project, filename)

    def downloaded(self, project: str, filename: str) -> None:
        self.files.downloaded(project, filename)

    def count_store_error(self, store: str) -> None:
        self.files.count_store_error(store)

    async def purge(self, project: str, filename: str) -> bool:
        """
        Remove one cached file of the group's, from whichever member it came.
        """
        purged = False
        for member in self.group.members.values():
            purged = await self.files.purge(project, filename, pages=member) or purged
        return purged


@attrs.define
class Groups:
    """
    Every group, by name, and the default one (served at C{/simple/}).
    """

    by_name: Mapping[str, Group]
    default_name: str
    files: FileCache
    #: Each group's policy view, by group name (none: no policy applies).
    policed: Mapping[str, PolicedGroup] = attrs.field(factory=dict)
    provenances: Provenances | None = None
    #: The legacy JSON API (none: not served).
    legacy: LegacyAPI | None = None

    @classmethod
    def alone(cls, pages: PageCache, files: FileCache, clock: IReactorTime) -> Groups:
        """
        The one group of one upstream's pages (a proxy put together by hand).
        """
        topology = single((pages.upstream.url,))
        spec = topology.groups[0]
        group = Group(spec, topology, {spec.members[0]: pages}, None, clock)
        return cls({spec.name: group}, spec.name, files)

    @property
    def default(self) -> Group:
        return self.by_name[self.default_name]

    def get(self, name: str) -> Group | None:
        return self.by_name.get(name)

    def files_of(self, group: Group) -> GroupFiles:
        return GroupFiles(group, self.files, self.policed.get(group.name), self.provenances)

    def pages_of(self, group: Group) -> Group | PolicedGroup:
        """
        What answers the group's pages: its policy view, or the group.
        """
        return self.policed.get(group.name) or group

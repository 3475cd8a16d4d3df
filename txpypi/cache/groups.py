"""
A group: several upstreams' page caches behind one index, in priority
order, resolved C{first-index} (the first member that knows a project
answers alone) or C{merge} (every member's files, the higher one's kept on
a conflict), with routes sending some names only to some upstreams.

The safe choice is the default: a lower member is asked about a project
only when every higher one answered "no such project".  Which member owns
each project is remembered (L{Owners}: in memory and in the metadata
store, so that it survives a restart and a cluster shares it); when the
owner fails, its stale copy is served or the request fails naming it,
never falling through to a lower member, which is how a dependency
confusion attack would win.

A L{Group} answers like a L{PageCache} (C{fresh}, C{get}, C{remaining},
C{age}, C{offline}), so that C{/<group>/simple/} is served as C{/simple/}
is; L{txpypi.cache.groupfiles} opens its files.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from txpypi.cache.lookup import METADATA_SUFFIX, NotListed
from txpypi.cache.owners import Owners
from txpypi.cache.pages import HIT, MISS, STALE, CachedPage, NotFound, PageCache, prepare
from txpypi.concurrency.waiters import SingleFlight, in_thread_now
from txpypi.core.groups import GroupSpec, Topology
from txpypi.core.simple.merge import Conflict, merge_lists, merge_pages
from txpypi.core.simple.model import ProjectPage
from txpypi.core.simple.projects import ProjectList
from txpypi.fetch.upstream import UpstreamError

log = Logger(namespace="txpypi.pages")

#: The most merged pages (and project lists) a group remembers having made;
#: their bodies count against C{page-cache-size} with every other page.
MAX_MERGED = 2_000


#: The member pages a merged page is made of, with their members.
Parts = tuple[tuple[PageCache, CachedPage], ...]


@attrs.define(eq=False)
class Merged:
    """
    What a group answers for a project or its list from several members:
    the key in the page memory the members share of the page it serves (a
    page it made, counted against C{page-cache-size} with theirs; or the
    one member's page, when only one knows the project), and the pages it
    was made of, held weakly (it is fresh while they are its members'
    fresh pages; it does not keep them in memory).
    """

    key: str
    parts: tuple[tuple[PageCache, weakref.ref[CachedPage]], ...]

    @classmethod
    def of(cls, key: str, parts: Parts) -> Merged:
        return cls(key, tuple((member, weakref.ref(page)) for member, page in parts))

    def made_of(self, parts: Parts) -> bool:
        return len(parts) == len(self.parts) and all(
            mine[0] is theirs[0] and mine[1]() is theirs[1]
            for mine, theirs in zip(self.parts, parts, strict=True)
        )

    def alive(self) -> Parts | None:
        """
        The pages it was made of, or L{None} once one is gone from memory.
        """
        found = []
        for member, ref in self.parts:
            page = ref()
            if page is None:
                return None
            found.append((member, page))
        return tuple(found)


def _failed(name: str, project: str | None, error: UpstreamError) -> UpstreamError:
    what = "the project list" if project is None else project
    return UpstreamError(502, f"upstream {name} failed for {what}: {error.reason}")


def _state(states: list[str]) -> str:
    if STALE in states:
        return STALE
    return MISS if MISS in states else HIT


@attrs.define(eq=False)
class Group:
    """
    The index of one group, answering like a L{PageCache}.
    """

    spec: GroupSpec
    topology: Topology
    #: Its members' page caches, by upstream name, in priority order.
    members: Mapping[str, PageCache]
    #: Who owns each project (L{None} for a group of one member).
    owners: Owners | None
    _clock: IReactorTime
    #: Told of each file left out of a merged page (for the metrics).
    on_conflict: Callable[[Conflict], None] = lambda conflict: None
    #: Runs merging and rendering (pure, CPU-bound) off the reactor thread.
    _blocking: Callable[..., Any] = in_thread_now
    #: The merged pages made, by their keys (at most L{MAX_MERGED}).
    _merged: OrderedDict[str, Merged] = attrs.field(factory=OrderedDict)
    _merges: SingleFlight[str, CachedPage] = attrs.field(factory=SingleFlight)
    #: Its members by their cache prefix, and where its merged pages are
    #: kept: worked out once, for the hot path.
    _by_prefix: dict[str, PageCache] = attrs.field(init=False)
    _merged_prefix: str = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self._by_prefix = {member.group: member for member in self.members.values()}
        self._merged_prefix = f"{self.name}/merged/"

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def first(self) -> PageCache:
        return self.members[self.spec.members[0]]

    @property
    def offline(self) -> bool:
        return self.first.offline

    @property
    def alone(self) -> bool:
        """
        Whether it has one member: nothing to resolve, nothing to remember.
        """
        return len(self.members) == 1

    def candidates(self, project: str) -> tuple[str, ...]:
        return self.topology.candidates(self.spec, project)

    def _merged_key(self, project: str | None) -> str:
        return self._merged_prefix + (project or "")

    def _kept(self, key: str) -> tuple[Merged, CachedPage, Parts] | None:
        """
        A merged page still in memory, with what it was made of.
        """
        merged = self._merged.get(key)
        if merged is None:
            return None
        page = self.first.memory.pages.get(key)
        parts = merged.alive()
        if page is None or parts is None:
            del self._merged[key]
            return None
        return merged, page, parts

    def _member_of(self, page: CachedPage) -> PageCache:
        return self._by_prefix.get(page.key.partition("/")[0], self.first)

    # -- what SimpleResource reads

    def remaining(self, page: CachedPage) -> float:
        if not self._is_merged(page):
            return self._member_of(page).remaining(page)
        kept = self._kept(page.key)
        if kept is None:
            return 0.0  # not kept: made again when asked
        return min(member.remaining(part) for member, part in kept[2])

    def age(self, page: CachedPage) -> float:
        now: float = self._clock.seconds()
        return now - page.fetched_at

    def _is_merged(self, page: CachedPage) -> bool:
        return page.key.startswith(self._merged_prefix)

    def fresh(self, project: str | None) -> CachedPage | None:
        """
        The page, if it can be answered from memory now: the hot path.
        """
        if self.alone and (project is not None or not self.topology.routed):
            if project is not None and not self.candidates(project):
                return None
            return self.first.fresh(project)
        if project is None or self.spec.strategy == "merge":
            key = self._merged_key(project)
            kept = self._kept(key)
            if kept is None or not all(member.fresh(project) is part for member, part in kept[2]):
                return None
            self._merged.move_to_end(key)
            self.first.memory.pages.move_to_end(kept[1].key)
            return kept[1]
        owner = None if self.owners is None else self.owners.known(project)
        if owner is None or owner not in self.candidates(project):
            return None
        return self.members[owner].fresh(project)

    def fresh_left(self, project: str | None) -> tuple[CachedPage, float] | None:
        """
        L{fresh}, with the page's L{remaining} seconds.
        """
        if self.alone and project is not None:
            if not self.candidates(project):
                return None
            return self.first.fresh_left(project)
        page = self.fresh(project)
        return None if page is None else (page, self.remaining(page))

    async def get(self, project: str | None) -> tuple[CachedPage, str]:
        """
        The group's page for C{project} (L{None}: its project list), and how
        it was answered (C{HIT}, C{MISS} or C{STALE}).

        @raise NotFound: no member that may be asked knows it.
        @raise UpstreamError: a member that owns it or may own it failed
            with no usable copy (a 502 naming the member).
        """
        if project is None:
            return await self._list()
        candidates = self.candidates(project)
        if not candidates:
            raise NotFound(project)
        if self.alone:
            return await self.first.get(project)
        page = self.fresh(project)  # resolved within its TTL: as the hot path answers
        if page is not None:
            return page, HIT
        if self.spec.strategy == "merge":
            return await self._merge(project, candidates)
        return await self._first_index(project, candidates)

    async def _first_index(self, project: str, candidates: tuple[str, ...]) -> tuple[CachedPage, str]:
        owners = self.owners
        assert owners is not None  # a group of several members has them
        owner = await owners.get(project)
        if owner not in candidates:
            owner = None
        if self.offline:
            # Offline, a member's "not cached" is no "no such project".
            if owner is None:
                raise NotFound(project)
            candidates = (owner,)
        for name in candidates:
            try:
                page, state = await self.members[name].get(project)
            except NotFound:
                continue
            except UpstreamError as e:
                if owner is not None and candidates.index(owner) > candidates.index(name):
                    # It said "no such project" when the owner was found.
                    log.warn(
                        "{upstream} failed ({reason}); {project} is owned by {owner}, below it",
                        upstream=name,
                        reason=e.reason,
                        project=project,
                        owner=owner,
                    )
                    continue
                raise _failed(name, project, e) from None
            if name != owner:
                owners.set(project, name)  # stored in the background
            return page, state
        if owner is not None and not self.offline:
            await owners.forget(project)
        raise NotFound(project)

    async def _merge(self, project: str, candidates: tuple[str, ...]) -> tuple[CachedPage, str]:
        # A member failing fails the page: without it, a lower member's
        # file could take its place.
        parts, states = await self._gather(project, candidates)
        if len(parts) == 1:
            # One member knows it: its page, remembered for the hot path.
            self._note(self._merged_key(project), Merged.of(parts[0][1].key, parts))
            return parts[0][1], states[0]
        return await self._merged_page(project, parts), _state(states)

    async def _list(self) -> tuple[CachedPage, str]:
        if self.alone and not self.topology.routed:
            return await self.first.get(None)
        parts, states = await self._gather(None, tuple(self.members))
        return await self._merged_page(None, parts), _state(states)

    async def _gather(self, project: str | None, names: tuple[str, ...]) -> tuple[Parts, list[str]]:
        """
        The page of C{project} of every member in C{names} that knows it,
        with how each was answered.

        @raise NotFound: none knows it.
        @raise UpstreamError: one failed with no usable copy (naming it).
        """
        parts: list[tuple[PageCache, CachedPage]] = []
        states = []
        for name in names:
            member = self.members[name]
            try:
                page, state = await member.get(project)
            except NotFound:
                continue
            except UpstreamError as e:
                raise _failed(name, project, e) from None
            parts.append((member, page))
            states.append(state)
        if not parts:
            raise NotFound(project)
        return tuple(parts), states

    async def _merged_page(self, project: str | None, parts: Parts) -> CachedPage:
        key = self._merged_key(project)
        kept = self._kept(key)
        if kept is not None and kept[0].made_of(parts):
            return kept[1]
        return await self._merges.run(key, lambda: self._make(project, parts))

    async def _make(self, project: str | None, parts: Parts) -> CachedPage:
        key = self._merged_key(project)
        fetched_at = min(page.fetched_at for _, page in parts)
        conflicts: list[Conflict] = []
        page: CachedPage
        if project is None:
            names = tuple(member.upstream.name for member, _ in parts)
            lists = [page.model for _, page in parts]
            assert all(isinstance(m, ProjectList) for m in lists)

            def keep(i: int, name: str) -> bool:
                return self.topology.listed_by(self.spec, names[i], name)

            page = await self._blocking(lambda: prepare(key, merge_lists(lists, keep), fetched_at))  # type: ignore[arg-type]
        else:
            models = [page.model for _, page in parts]
            assert all(isinstance(m, ProjectPage) for m in models)
            model, conflicts = merge_pages(project, models)  # type: ignore[arg-type]
            page = await self._blocking(prepare, key, model, fetched_at)
        for conflict in conflicts:
            log.warn(
                "{group}: left {filename} of {upstream} out of {project}: {kept} lists it with another hash",
                group=self.name,
                filename=conflict.filename,
                upstream=parts[conflict.left_out][0].upstream.name,
                project=project,
                kept=parts[conflict.kept][0].upstream.name,
            )
            self.on_conflict(conflict)
        self.first.keep(page)
        self._note(key, Merged.of(key, parts))
        return page

    def _note(self, key: str, merged: Merged) -> None:
        self._merged[key] = merged
        self._merged.move_to_end(key)
        while len(self._merged) > MAX_MERGED:
            self._merged.popitem(last=False)

    async def _merged_parts(self, project: str, page: CachedPage) -> Parts:
        """
        The member pages a merged C{page} was made of; for one too big to
        keep (made for each answer), its members' pages, asked again.
        """
        kept = self._kept(page.key)
        return kept[2] if kept is not None else (await self._gather(project, self.candidates(project)))[0]

    async def contributors(self, project: str, page: CachedPage) -> list[PageCache]:
        """
        The members whose pages C{page} is made of, in priority order: its
        one member, or a merged page's members that know the project.
        """
        if not self._is_merged(page):
            return [self._member_of(page)]
        parts = await self._merged_parts(project, page)
        return [member for member, _ in parts]

    async def lister(self, project: str, page: CachedPage) -> Callable[[str], str]:
        """
        Which member listed each file of C{page} (by file name; for a page
        of one member, that member whatever the name), as an upstream
        name; C{""} for a name no member's page lists (the group's own
        policy then applies).  A merged page no longer kept has its
        members' pages asked again, as L{source} does.
        """
        if not self._is_merged(page):
            name = self._member_of(page).upstream.name
            return lambda filename: name
        parts = await self._merged_parts(project, page)
        listed = [(m.upstream.name, part.model) for m, part in parts]

        def lister(filename: str) -> str:
            for name, model in listed:
                if isinstance(model, ProjectPage) and model.find(filename) is not None:
                    return name
            return ""

        return lister

    async def source(self, project: str, filename: str) -> PageCache:
        """
        The member a file of the group's page came from.

        @raise NotListed: the group's page does not list it.
        """
        page, _ = await self.get(project)
        if not self._is_merged(page):
            return self._member_of(page)
        parts = await self._merged_parts(project, page)
        dist = filename.removesuffix(METADATA_SUFFIX)
        for member, part in parts:
            assert isinstance(part.model, ProjectPage)
            if part.model.find(dist) is not None:
                return member
        raise NotListed(filename)

    async def forget(self, project: str | None) -> None:
        """
        Forget the group's page for C{project} (L{None}: the list) in every
        member, and who owns it.
        """
        key = self._merged_key(project)
        self._merged.pop(key, None)
        self.first.memory.pages.pop(key, None)
        for member in self.members.values():
            await member.forget(project)
        if project is not None and self.owners is not None:
            await self.owners.forget(project)

"""
A group's pages and files as its supply-chain policy lets clients see
them (L{txpypi.core.policy}).

Policy applies when answering, never when filling: the caches hold the
upstream's pages as they are, and each group's view of a page is made from
them with the policy in force (L{Live.policy}, which SIGHUP replaces), so
that a policy change or an expired exemption takes effect on the next
request without a new upstream request, and two groups share one cached
page.  A view is kept (in the page memory every page shares) while its
page, the policy and every file's verdict stay the same: until the next
file comes of age or exemption ends.
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import attrs
from packaging.utils import canonicalize_version
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from txpypi.cache.groups import Group
from txpypi.cache.lookup import METADATA_SUFFIX
from txpypi.cache.pages import CachedPage, NotFound, prepare
from txpypi.concurrency.waiters import in_thread_now
from txpypi.core.live import Live
from txpypi.core.policy import Policy, PolicyTable, Refusal, Verdict
from txpypi.core.simple.model import ProjectPage, file_version

log = Logger(namespace="txpypi.policy")

#: The most views (pages with files hidden) a group remembers having made;
#: their bodies count against C{page-cache-size} with every other page.
MAX_VIEWS = 2_000

#: The most (group, file, rule) whose refusal was logged, so that each is
#: logged once, not once per request; past it the oldest are forgotten.
MAX_LOGGED = 10_000


class PolicyRefused(Exception):
    """
    A file the policy hides was asked for directly (a 403).
    """

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.reason)
        self.refusal = refusal


class ProjectBlocked(NotFound):
    """
    The policy hides the whole project (a 404 with the reason).
    """

    def __init__(self, refusal: Refusal) -> None:
        super().__init__(refusal.reason)
        self.refusal = refusal


@attrs.define(eq=False)
class View:
    """
    A page as the policy shows it, and what it was made from, both held
    weakly: a view keeps no page in memory past C{page-cache-size}.
    """

    page: weakref.ref[CachedPage]
    source: weakref.ref[CachedPage]
    table: PolicyTable
    #: When a verdict changes by itself (L{None}: never).
    until: float | None
    #: The files only an exemption lets through, with its reason: logged
    #: each time the view is answered.
    exempted: tuple[tuple[str, str], ...] = ()


def _versions(page: ProjectPage, visible: tuple[Any, ...]) -> tuple[str, ...] | None:
    """
    The page's C{versions} without those whose files are all hidden (a
    version listed with no file at all stays: the upstream said it).
    """
    if page.versions is None:
        return None
    seen = {canonicalize_version(v) for f in visible if (v := file_version(f.filename)) is not None}
    had = {canonicalize_version(v) for f in page.files if (v := file_version(f.filename)) is not None}
    return tuple(
        v for v in page.versions if canonicalize_version(v) in seen or canonicalize_version(v) not in had
    )


def _project_of(key: str) -> str:
    """
    The project of a page's key (C{<prefix>/simple/<project>/}, or a
    group's C{<group>/merged/<project>}).
    """
    return key.rstrip("/").rpartition("/")[2]


@attrs.define(eq=False)
class PolicedGroup:
    """
    A L{Group} answering through its policy: like a L{PageCache} for
    C{/<group>/simple/}, and L{check_file} before a file is opened.
    """

    group: Group
    live: Live
    _clock: IReactorTime
    #: Told of each refusal answered (for the metrics).
    on_refusal: Callable[[Refusal], None] = lambda refusal: None
    _blocking: Callable[..., Any] = in_thread_now
    _views: OrderedDict[str, View] = attrs.field(factory=OrderedDict)
    _logged: OrderedDict[tuple[str, str], None] = attrs.field(factory=OrderedDict)
    #: The policies worked out for the table in force (SIGHUP replaces it).
    _table: PolicyTable | None = None
    _policies: dict[str, Policy] = attrs.field(factory=dict)
    _active: bool = False

    def _current(self) -> None:
        table = self.live.policy
        if table is not self._table:
            self._table, self._policies = table, {}
            self._active = table.active_in(self.group.name, self.group.spec.members)

    @property
    def name(self) -> str:
        return self.group.name

    @property
    def offline(self) -> bool:
        return self.group.offline

    def policy(self, upstream: str) -> Policy:
        """
        The policy in force for C{upstream}'s files in this group.
        """
        self._current()
        found = self._policies.get(upstream)
        if found is None:
            found = self._policies[upstream] = self.live.policy.of(self.group.name, upstream)
        return found

    @property
    def active(self) -> bool:
        """
        Whether the policy in force can hide anything here.
        """
        self._current()
        return self._active

    def age(self, page: CachedPage) -> float:
        return self.group.age(page)

    def remaining(self, page: CachedPage) -> float:
        if not self._views:  # no policy has made a view: the hot path of most groups
            return self.group.remaining(page)
        view = self._views.get(page.key) or self._views.get(self._key(_project_of(page.key)))
        if view is None or view.page() is not page:
            return self.group.remaining(page)
        source = view.source()
        left = 0.0 if source is None else self.group.remaining(source)
        if view.until is not None:
            now: float = self._clock.seconds()
            left = min(left, view.until - now)
        return left

    def fresh(self, project: str | None) -> CachedPage | None:
        page = self.group.fresh(project)
        if page is None or project is None or not self.active:
            return page
        view = self._kept(project, page)
        if view is None:
            return None
        self._let_through(view)
        return view.page()

    def fresh_left(self, project: str | None) -> tuple[CachedPage, float] | None:
        """
        L{fresh}, with the page's L{remaining} seconds.
        """
        if not self._views and not self.active:
            return self.group.fresh_left(project)
        page = self.fresh(project)
        return None if page is None else (page, self.remaining(page))

    async def get(self, project: str | None) -> tuple[CachedPage, str]:
        """
        The page as the policy shows it.

        @raise ProjectBlocked: the policy hides the whole project.
        """
        page, state = await self.group.get(project)
        if project is None or not self.active:
            return page, state
        view = self._kept(project, page)
        shown = None if view is None else view.page()
        if view is not None and shown is not None:
            self._let_through(view)
        else:
            shown = await self._view(project, page)
        return shown, state

    def _let_through(self, view: View) -> None:
        for filename, reason in view.exempted:
            self._note(filename, "exempt", reason)

    def _key(self, project: str) -> str:
        return f"{self.group.name}/policy/{project}"

    def _kept(self, project: str, page: CachedPage) -> View | None:
        """
        The view of C{page} made for the policy in force, while it is right
        and in memory; a view that is not is forgotten.
        """
        key = self._key(project)
        view = self._views.get(key)
        if view is None:
            return None
        shown = view.page()
        right = view.source() is page and view.table is self.live.policy
        if right and view.until is not None and self._clock.seconds() >= view.until:
            right = False
        if right and shown is not page:
            right = shown is not None and self.group.first.memory.pages.get(shown.key) is shown
        if not right:
            del self._views[key]
            return None
        return view

    async def _verdicts(self, project: str, page: CachedPage) -> list[Verdict]:
        assert isinstance(page.model, ProjectPage)
        lister = await self.group.lister(project, page)
        now: float = self._clock.seconds()
        return [self.policy(lister(f.filename)).verdict(project, f, now) for f in page.model.files]

    async def _view(self, project: str, page: CachedPage) -> CachedPage:
        assert isinstance(page.model, ProjectPage)
        refused = self.policy((await self.group.lister(project, page))("")).project_refusal(project)
        if refused is not None:
            self._refused(refused, project)
            raise ProjectBlocked(refused)
        verdicts = await self._verdicts(project, page)
        until = min((v.until for v in verdicts if v.until is not None), default=None)
        exempted = []
        for f, verdict in zip(page.model.files, verdicts, strict=True):
            if verdict.exempted is not None:
                exempted.append((f.filename, verdict.exempted.reason))
                self._note(f.filename, "exempt", verdict.exempted.reason)
            elif verdict.expired is not None:
                self._note(f.filename, "expired", verdict.expired.text)
        visible = tuple(f for f, v in zip(page.model.files, verdicts, strict=True) if v.refusal is None)
        shown = page
        if len(visible) != len(page.model.files):
            model = attrs.evolve(page.model, files=visible, versions=_versions(page.model, visible))
            shown = await self._blocking(prepare, self._key(project), model, page.fetched_at)
            self.group.first.keep(shown)
        view = View(weakref.ref(shown), weakref.ref(page), self.live.policy, until, tuple(exempted))
        self._views[self._key(project)] = view
        self._views.move_to_end(self._key(project))
        while len(self._views) > MAX_VIEWS:
            self._views.popitem(last=False)
        return shown

    async def check_file(self, project: str, filename: str) -> None:
        """
        Refuse a file the policy hides, before it is opened (and fetched).

        @raise PolicyRefused: it is hidden; the reason names the rule.
        """
        if not self.active:
            return
        try:
            page, _ = await self.group.get(project)
        except NotFound:
            return  # the file cache answers it (and drops what is gone)
        assert isinstance(page.model, ProjectPage)
        dist = page.model.find(filename.removesuffix(METADATA_SUFFIX))
        if dist is None:
            return  # not listed: the file cache says so
        now: float = self._clock.seconds()
        lister = await self.group.lister(project, page)
        verdict = self.policy(lister(dist.filename)).verdict(project, dist, now)
        if verdict.exempted is not None:
            self._note(dist.filename, "exempt", verdict.exempted.reason)
        if verdict.refusal is not None:
            self._refused(verdict.refusal, filename)
            raise PolicyRefused(verdict.refusal)

    def _refused(self, refusal: Refusal, what: str) -> None:
        self.on_refusal(refusal)
        if self._first_time((what, refusal.rule)):
            log.info(
                "{group}: refused {what} ({rule}): {reason}",
                group=self.group.name,
                what=what,
                rule=refusal.rule,
                reason=refusal.reason,
            )

    def _note(self, filename: str, kind: str, detail: str) -> None:
        if kind == "exempt":
            # Logged every time it lets a file through.
            log.info(
                "{group}: {filename} let through by an exemption: {reason}",
                group=self.group.name,
                filename=filename,
                reason=detail,
            )
        elif self._first_time((filename, "expired")):
            log.info(
                "{group}: the exemption {rule} for {filename} expired; ignored",
                group=self.group.name,
                rule=detail,
                filename=filename,
            )

    def _first_time(self, key: tuple[str, str]) -> bool:
        if key in self._logged:
            return False
        self._logged[key] = None
        while len(self._logged) > MAX_LOGGED:
            self._logged.popitem(last=False)
        return True

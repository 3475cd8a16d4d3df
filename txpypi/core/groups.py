"""
Several upstream indexes behind one URL, as values: each configured
upstream (L{UpstreamSpec}), the groups that serve them (L{GroupSpec}),
the routes that send some project names only to some upstreams
(L{Route}), and the whole of it (L{Topology}), checked once.

Pure: the assembly reads the config into these, and the cache layer asks
them which members may answer for a project (L{Topology.candidates}).
"""

from __future__ import annotations

import re
from fnmatch import fnmatchcase
from typing import Literal

import attrs

from txpypi.core.policy import Policy

#: Group and upstream names: lower case letters, digits and dashes.
NAME = re.compile(r"[a-z0-9][a-z0-9-]*\Z", re.ASCII)

#: The first path segments of the proxy's own routes, which no group may
#: take (a group is served at C{/<group>/simple/}).
RESERVED = frozenset(
    {
        "simple",
        "files",
        "pypi",
        "cache",
        "metrics",
        "health",
        "stats",
        "_peer",
        "_worker",
        "static",
        "admin",
        "api",
    }
)

#: The group the command line's C{--upstream} makes, served at C{/simple/}.
DEFAULT_GROUP = "default"

Strategy = Literal["first-index", "merge"]
STRATEGIES: tuple[Strategy, ...] = ("first-index", "merge")


class TopologyError(ValueError):
    """
    The upstreams, groups and routes do not fit together; the message is
    one line that names the key.
    """


def check_name(key: str, name: object) -> str:
    """
    C{name} if it may name a group or an upstream.

    @raise TopologyError: it may not, naming C{key}.
    """
    if name in RESERVED:
        raise TopologyError(f"{key}: {name!r} is a path of the proxy's own and cannot name a group")
    if not isinstance(name, str) or NAME.match(name) is None:
        raise TopologyError(f"{key}: {name!r} is not a name (lower case letters, digits and dashes)")
    return name


def json_api_of(url: str) -> str | None:
    """
    The legacy JSON API base of a simple index at C{url}, as PyPI lays them
    out (C{.../simple/} and C{.../pypi/<project>/json}); L{None} for an
    index not under C{simple/}.
    """
    return url[: -len("simple/")] + "pypi/" if url.endswith("/simple/") else None


@attrs.frozen
class UpstreamSpec:
    """
    One configured upstream simple index.

    @ivar prefix: where its pages and files are kept in the caches (its
        name; C{default} for the command line's first C{--upstream}, so
        that caches kept before groups existed stay valid).
    @ivar authorization: the C{Authorization} header value sent to its own
        origin only (basic auth or a bearer token), never shown.
    @ivar ca_file: a PEM file of the CAs its TLS certificate is checked
        against, instead of the system's.
    @ivar verify: whether its TLS certificate is checked at all.
    @ivar index_ttl: how long its pages stay fresh (L{None}: the global
        C{index-ttl}).
    """

    name: str
    url: str
    prefix: str = attrs.field(default=attrs.Factory(lambda self: self.name, takes_self=True))
    authorization: str | None = attrs.field(default=None, repr=False)
    ca_file: str | None = None
    verify: bool = True
    index_ttl: float | None = None
    #: C{file-hosts}: with it, the only other hosts its files may come
    #: from (as L{txpypi.core.fetchpolicy.FileHost} spells them).
    file_hosts: tuple[str, ...] | None = None
    #: Its C{policy:} over its groups' (live: not compared for a restart).
    policy: Policy | None = attrs.field(default=None, eq=False)
    #: Where its legacy JSON API is (C{.../pypi/}, before C{<project>/json}):
    #: by default its URL with C{simple/} made C{pypi/}; L{None}: none.
    json_api: str | None = attrs.field(
        default=attrs.Factory(lambda self: json_api_of(self.url), takes_self=True)
    )


@attrs.frozen
class Route:
    """
    Project names (globs on normalized names) that only some upstreams may
    ever be asked about.
    """

    projects: tuple[str, ...]
    upstreams: tuple[str, ...]

    def matches(self, project: str) -> bool:
        return any(fnmatchcase(project, pattern) for pattern in self.projects)


@attrs.frozen
class GroupSpec:
    """
    Upstreams served together at C{/<name>/simple/}, in priority order.
    """

    name: str
    members: tuple[str, ...]
    strategy: Strategy = "first-index"
    #: Checked with the topology's own routes (they may narrow them).
    routes: tuple[Route, ...] = ()
    #: Its C{policy:} (live: not compared for a restart).
    policy: Policy | None = attrs.field(default=None, eq=False)


@attrs.frozen
class Topology:
    """
    The upstreams, the groups and the routes, checked to fit together.
    """

    upstreams: tuple[UpstreamSpec, ...]
    groups: tuple[GroupSpec, ...]
    default_group: str = DEFAULT_GROUP
    routes: tuple[Route, ...] = ()

    #: Whether any route is configured, worked out once (the hot path asks).
    _routed: bool = attrs.field(init=False, repr=False, eq=False)

    def __attrs_post_init__(self) -> None:
        self._check()
        object.__setattr__(self, "_routed", bool(self.routes) or any(g.routes for g in self.groups))

    def _check(self) -> None:
        names = [u.name for u in self.upstreams]
        if not names:
            raise TopologyError("upstreams: at least one upstream is needed")
        for name in names:
            check_name("upstreams", name)
            if names.count(name) > 1:
                raise TopologyError(f"upstreams: {name!r} is named twice")
        urls = [u.url for u in self.upstreams]
        for upstream in self.upstreams:
            if urls.count(upstream.url) > 1:
                # Files are sent to their upstream's client by its URL.
                raise TopologyError(f"upstreams: {upstream.name}: another upstream has the same url")
        prefixes = [u.prefix for u in self.upstreams]
        if len(set(prefixes)) != len(prefixes):
            raise TopologyError("upstreams: two upstreams share one cache prefix")
        groups = [g.name for g in self.groups]
        for group in self.groups:
            check_name("groups", group.name)
            if groups.count(group.name) > 1:
                raise TopologyError(f"groups: {group.name!r} is named twice")
            if not group.members:
                raise TopologyError(f"groups: {group.name}: members: at least one upstream is needed")
            for member in group.members:
                if member not in names:
                    raise TopologyError(f"groups: {group.name}: members: no upstream is named {member!r}")
            if len(set(group.members)) != len(group.members):
                raise TopologyError(f"groups: {group.name}: members: an upstream is listed twice")
            if group.strategy not in STRATEGIES:
                raise TopologyError(
                    f"groups: {group.name}: strategy: expected first-index or merge, got {group.strategy!r}"
                )
            self._check_routes(f"groups: {group.name}: routes", group.routes, names)
        self._check_routes("routes", self.routes, names)
        if self.default_group not in groups:
            raise TopologyError(f"default-group: no group is named {self.default_group!r}")

    @staticmethod
    def _check_routes(key: str, routes: tuple[Route, ...], names: list[str]) -> None:
        for route in routes:
            if not route.projects or not route.upstreams:
                raise TopologyError(f"{key}: a route needs projects and upstreams")
            for upstream in route.upstreams:
                if upstream not in names:
                    raise TopologyError(f"{key}: no upstream is named {upstream!r}")

    def upstream(self, name: str) -> UpstreamSpec:
        for upstream in self.upstreams:
            if upstream.name == name:
                return upstream
        raise KeyError(name)

    def group(self, name: str) -> GroupSpec:
        for group in self.groups:
            if group.name == name:
                return group
        raise KeyError(name)

    def routes_for(self, group: GroupSpec, project: str) -> tuple[Route, ...]:
        """
        The routes C{project} matches: the first of the group's own, and
        the first of the topology's (which holds in every group: a group's
        own route may narrow it, never widen it).
        """
        found = []
        for routes in (group.routes, self.routes):
            for route in routes:
                if route.matches(project):
                    found.append(route)
                    break
        return tuple(found)

    def allows(self, group: GroupSpec, member: str, project: str) -> bool:
        """
        Whether C{member} of C{group} may be asked about C{project}: every
        route it matches names the member.
        """
        return all(member in route.upstreams for route in self.routes_for(group, project))

    def candidates(self, group: GroupSpec, project: str) -> tuple[str, ...]:
        """
        The members of C{group} that may be asked about C{project}, in
        priority order: all of them, or, when routes match, only those they
        all name (none: the project is unknown here).
        """
        if not self._routed:
            return group.members
        routes = self.routes_for(group, project)
        if not routes:
            return group.members
        return tuple(m for m in group.members if all(m in route.upstreams for route in routes))

    def listed_by(self, group: GroupSpec, member: str, project: str) -> bool:
        """
        Whether C{member}'s project list may put C{project} in C{group}'s
        (a routed name only from the upstreams its routes name).
        """
        return self.allows(group, member, project)

    @property
    def routed(self) -> bool:
        """
        Whether any route is configured (the project lists are then filtered).
        """
        return self._routed


def single(urls: tuple[str, ...]) -> Topology:
    """
    The topology of the command line's C{--upstream} (repeated: first-index
    in that order): upstreams C{upstream}, C{upstream-2}, ... in one group,
    C{default}.  The first keeps its pages and files where they were kept
    before groups existed.
    """
    specs = tuple(
        UpstreamSpec("upstream", url, prefix=DEFAULT_GROUP)
        if i == 0
        else UpstreamSpec(f"upstream-{i + 1}", url)
        for i, url in enumerate(urls)
    )
    return Topology(specs, (GroupSpec(DEFAULT_GROUP, tuple(s.name for s in specs)),))

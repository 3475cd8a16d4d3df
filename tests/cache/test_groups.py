"""
Groups on a L{Clock}, against fake upstreams through iosim: first-index
asks a lower member only after every higher one said 404, remembers the
owner (in the metadata store too), never falls through while the owner
fails, and skips a failing higher member only for a project a lower one
is known to own; routes keep names away from upstreams; merge keeps the
higher member's file on a conflict and counts it; the project list is the
union, filtered by routes.
"""

from __future__ import annotations

from typing import Any

import pytest
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from tests.cache.test_pages import result
from txpypi.cache.groups import Group
from txpypi.cache.owners import Owners
from txpypi.cache.pages import NotFound, PageCache, PageMemory
from txpypi.core.groups import GroupSpec, Route, Topology, UpstreamSpec
from txpypi.core.live import Live
from txpypi.core.simple.merge import Conflict
from txpypi.core.simple.model import ProjectPage
from txpypi.core.simple.projects import ProjectList
from txpypi.fetch.upstream import Upstream, UpstreamClient, UpstreamError
from txpypi.storage.metadata import MemoryMetadata
from txpypi.testing import Dist, FakeUpstream, build_wheel


def raised(coroutine: Any) -> BaseException:
    out: list[Any] = []
    Deferred.fromCoroutine(coroutine).addBoth(out.append)
    assert out and hasattr(out[0], "value"), f"did not fail: {out}"
    value: BaseException = out[0].value
    return value


class Setup:
    """
    Fake upstreams named private, public and third, a group over them.
    """

    def __init__(
        self,
        members: tuple[str, ...] = ("private", "public"),
        strategy: str = "first-index",
        routes: tuple[Route, ...] = (),
        metadata: MemoryMetadata | None = None,
        fakes: dict[str, FakeUpstream] | None = None,
    ) -> None:
        self.clock = Clock()
        self.metadata = metadata or MemoryMetadata()
        self.fakes = fakes or {name: FakeUpstream(mode="json") for name in ("private", "public", "third")}
        self.pages: dict[str, PageCache] = {}
        self.live = Live()  # one for every part, as in the proxy
        for name, fake in self.fakes.items():
            client = UpstreamClient(self.clock, agent=RequestTraversalAgent(fake))
            upstream = Upstream(name, f"http://{name}.test/simple/")
            self.pages[name] = PageCache(
                self.clock, client, self.metadata, upstream, group=name, live=self.live
            )
        specs = tuple(UpstreamSpec(n, f"http://{n}.test/simple/") for n in self.fakes)
        spec = GroupSpec("default", members, strategy, ())  # type: ignore[arg-type]
        self.topology = Topology(specs, (spec,), routes=routes)
        self.conflicts: list[Conflict] = []
        self.group = Group(
            spec,
            self.topology,
            {name: self.pages[name] for name in members},
            Owners(self.metadata, "default", self.clock),
            self.clock,
            on_conflict=self.conflicts.append,
        )

    def add(self, name: str, *dists: Dist) -> None:
        for dist in dists:
            self.fakes[name].add(dist)

    def asked(self, name: str, project: str) -> int:
        return self.fakes[name].requests[f"/simple/{project}/"]

    def versions(self, project: str) -> list[str]:
        page, _ = result(self.group.get(project))
        assert isinstance(page.model, ProjectPage)
        return sorted(f.filename for f in page.model.files)


def test_the_first_member_that_knows_a_project_answers_alone() -> None:
    s = Setup()
    s.add("private", build_wheel("acme-lib", "1.0"))
    s.add("public", build_wheel("acme-lib", "99.0"), build_wheel("requests", "2.0"))
    assert s.versions("acme-lib") == ["acme_lib-1.0-py3-none-any.whl"]
    assert (s.asked("private", "acme-lib"), s.asked("public", "acme-lib")) == (1, 0)
    assert s.versions("requests") == ["requests-2.0-py3-none-any.whl"]
    assert (s.asked("private", "requests"), s.asked("public", "requests")) == (1, 1)
    assert s.group.owners is not None
    assert (s.group.owners.known("acme-lib"), s.group.owners.known("requests")) == ("private", "public")
    # The owner is in the metadata store, for a restart and the cluster.
    assert s.metadata.pages["owners/default/acme-lib"].body == b"private"


def test_the_hot_path_answers_from_the_owner_page() -> None:
    s = Setup()
    s.add("public", build_wheel("requests", "2.0"))
    page, state = result(s.group.get("requests"))
    assert state == "MISS"
    assert s.group.fresh("requests") is page
    assert s.group.remaining(page) == s.pages["public"].remaining(page)


def test_the_owner_failing_is_never_a_fall_through() -> None:
    """
    The private upstream owns acme-lib and goes down: its stale copy is
    served, or without one a 502 naming it; the public 99.0 never.
    """
    s = Setup()
    s.add("private", build_wheel("acme-lib", "1.0"))
    s.add("public", build_wheel("acme-lib", "99.0"))
    assert s.versions("acme-lib") == ["acme_lib-1.0-py3-none-any.whl"]
    s.fakes["private"].page_faults["acme-lib"] = "500"
    s.clock.advance(601)  # past the TTL
    page, state = result(s.group.get("acme-lib"))
    assert state == "STALE" and page.model.files[0].filename == "acme_lib-1.0-py3-none-any.whl"
    # Without a stale copy.
    s.pages["private"].stale_ttl = 0
    error = raised(s.group.get("acme-lib"))
    assert isinstance(error, UpstreamError) and error.status == 502
    assert "upstream private failed for acme-lib" in error.reason
    assert s.asked("public", "acme-lib") == 0


def test_an_unknown_owner_is_never_a_fall_through_either() -> None:
    s = Setup()
    s.add("public", build_wheel("acme-lib", "99.0"))
    s.fakes["private"].page_faults["acme-lib"] = "500"
    error = raised(s.group.get("acme-lib"))
    assert isinstance(error, UpstreamError) and "private" in error.reason
    assert s.asked("public", "acme-lib") == 0


def test_a_higher_member_failing_is_skipped_for_a_project_a_lower_one_owns() -> None:
    """
    Every higher member said 404 when requests was resolved to public: while
    private is down, requests is still served from public (logged).
    """
    s = Setup()
    s.add("public", build_wheel("requests", "2.0"))
    assert s.versions("requests") == ["requests-2.0-py3-none-any.whl"]
    s.fakes["private"].page_faults["requests"] = "500"
    s.clock.advance(601)
    assert s.versions("requests") == ["requests-2.0-py3-none-any.whl"]
    assert s.asked("private", "requests") == 2


def test_a_higher_member_that_publishes_the_project_takes_it_over() -> None:
    s = Setup()
    s.add("public", build_wheel("acme-lib", "99.0"))
    assert s.versions("acme-lib") == ["acme_lib-99.0-py3-none-any.whl"]
    s.add("private", build_wheel("acme-lib", "1.0"))
    s.clock.advance(601)
    assert s.versions("acme-lib") == ["acme_lib-1.0-py3-none-any.whl"]
    assert s.group.owners is not None and s.group.owners.known("acme-lib") == "private"


def test_the_owner_survives_a_restart() -> None:
    """
    A new process reads who owns requests from the metadata store: with
    private down, requests still comes from public, which owns it.
    """
    metadata = MemoryMetadata()
    s = Setup(metadata=metadata)
    s.add("public", build_wheel("requests", "2.0"))
    s.versions("requests")
    s.fakes["private"].page_faults["requests"] = "500"
    again = Setup(metadata=metadata, fakes=s.fakes)
    again.clock.advance(601)  # the stored page is stale: public is asked
    assert again.versions("requests") == ["requests-2.0-py3-none-any.whl"]
    assert again.group.owners is not None and again.group.owners.known("requests") == "public"


def test_everyone_saying_404_is_a_404_and_forgets_the_owner() -> None:
    s = Setup()
    s.add("public", build_wheel("gone", "1.0"))
    s.versions("gone")
    del s.fakes["public"].dists["gone"]
    s.clock.advance(601)
    with pytest.raises(NotFound):
        result(s.group.get("gone"))
    assert s.group.owners is not None and s.group.owners.known("gone") is None
    assert "owners/default/gone" not in s.metadata.pages


def test_a_route_keeps_a_name_away_from_the_public_index() -> None:
    s = Setup(routes=(Route(("acme-*",), ("private",)),))
    s.add("public", build_wheel("acme-lib", "99.0"))
    with pytest.raises(NotFound):
        result(s.group.get("acme-lib"))
    assert s.asked("public", "acme-lib") == 0 and s.asked("private", "acme-lib") == 1


def test_a_route_to_an_upstream_outside_the_group_makes_the_name_unknown() -> None:
    s = Setup(members=("public",), routes=(Route(("acme-*",), ("private",)),))
    s.add("public", build_wheel("acme-lib", "99.0"))
    with pytest.raises(NotFound):
        result(s.group.get("acme-lib"))
    assert s.group.fresh("acme-lib") is None
    assert s.asked("public", "acme-lib") == 0


def test_merge_keeps_the_higher_members_file_on_a_conflict() -> None:
    s = Setup(members=("public", "third"), strategy="merge")
    s.add("public", build_wheel("torch", "2.0"), build_wheel("torch", "1.0"))
    forged = build_wheel("torch", "2.0", padding=64)
    assert forged.content != s.fakes["public"].dists["torch"][0].content
    s.add("third", forged, build_wheel("torch", "3.0"))
    page, _ = result(s.group.get("torch"))
    files = {f.filename: f for f in page.model.files}
    assert sorted(files) == [
        "torch-1.0-py3-none-any.whl",
        "torch-2.0-py3-none-any.whl",
        "torch-3.0-py3-none-any.whl",
    ]
    assert files["torch-2.0-py3-none-any.whl"].url.startswith("http://public.test/")
    assert [c.filename for c in s.conflicts] == ["torch-2.0-py3-none-any.whl"]
    # Served from memory while the members' pages are fresh; the file's
    # source is the member that listed it.
    assert s.group.fresh("torch") is page
    assert result(s.group.source("torch", "torch-3.0-py3-none-any.whl")) is s.pages["third"]
    assert result(s.group.source("torch", "torch-2.0-py3-none-any.whl")) is s.pages["public"]
    # Asked again, nothing changed: no new conflict is logged.
    result(s.group.get("torch"))
    assert len(s.conflicts) == 1


def test_merge_fails_when_a_member_fails() -> None:
    s = Setup(members=("public", "third"), strategy="merge")
    s.add("third", build_wheel("torch", "3.0"))
    s.fakes["public"].page_faults["torch"] = "500"
    error = raised(s.group.get("torch"))
    assert isinstance(error, UpstreamError) and "public" in error.reason


def test_the_project_list_is_the_union_filtered_by_routes() -> None:
    s = Setup(routes=(Route(("acme-*",), ("private",)),))
    s.add("private", build_wheel("acme-lib", "1.0"), build_wheel("Shared", "1.0"))
    s.add(
        "public", build_wheel("acme-evil", "99.0"), build_wheel("requests", "2.0"), build_wheel("shared", "2")
    )
    page, _ = result(s.group.get(None))
    assert isinstance(page.model, ProjectList)
    assert sorted(page.model.projects) == ["acme-lib", "requests", "shared"]
    assert s.group.fresh(None) is page


def test_the_upstreams_share_one_page_memory() -> None:
    """
    Every upstream's pages count against one page-cache-size: filling it
    from public pushes private's least recently used pages out.
    """
    s = Setup()
    memory = PageMemory()
    for pages in s.pages.values():
        pages.memory = memory
    for i in range(6):
        s.add("private", build_wheel(f"p{i}", "1.0"))
        s.add("public", build_wheel(f"q{i}", "1.0"))
    result(s.pages["private"].get("p0"))
    one_page = memory.bytes_used
    s.pages["private"].max_bytes = 4 * one_page  # the live setting, shared too
    for i in range(6):
        result(s.pages["private"].get(f"p{i}"))
        result(s.pages["public"].get(f"q{i}"))
    assert memory.bytes_used <= 4 * one_page
    assert s.pages["private"].fresh("p0") is None  # pushed out by public's pages
    assert s.pages["public"].fresh("q5") is not None
    assert sorted(key.split("/")[0] for key in memory.pages) == ["private", "private", "public", "public"]


def test_merged_pages_count_against_the_shared_page_memory() -> None:
    s = Setup(members=("public", "third"), strategy="merge")
    s.add("public", build_wheel("torch", "2.0"))
    s.add("third", build_wheel("torch", "3.0"))
    page, _ = result(s.group.get("torch"))
    memory = s.pages["public"].memory
    assert memory.pages["default/merged/torch"] is page
    assert memory.bytes_used >= page.cost
    # Pushed out of memory with the others, it is made again when asked.
    s.live.update({"page_cache_size": 0})  # as a SIGHUP does: every cache trims
    assert s.group.fresh("torch") is None
    again, _ = result(s.group.get("torch"))
    assert again is not page and sorted(f.filename for f in again.model.files) == [
        "torch-2.0-py3-none-any.whl",
        "torch-3.0-py3-none-any.whl",
    ]

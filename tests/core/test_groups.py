"""
The topology of upstreams, groups and routes: names checked, references
checked, and which members a project may be asked of.
"""

from __future__ import annotations

import pytest

from txpypi.core.groups import (
    RESERVED,
    GroupSpec,
    Route,
    Topology,
    TopologyError,
    UpstreamSpec,
    check_name,
    single,
)

PRIVATE = UpstreamSpec("private", "https://private.example/simple/")
PUBLIC = UpstreamSpec("public", "https://public.example/simple/")


def topology(*groups: GroupSpec, routes: tuple[Route, ...] = ()) -> Topology:
    return Topology(
        (PRIVATE, PUBLIC), groups or (GroupSpec("default", ("private", "public")),), routes=routes
    )


@pytest.mark.parametrize("name", sorted(RESERVED))
def test_a_path_of_the_proxys_own_cannot_name_a_group(name: str) -> None:
    with pytest.raises(TopologyError, match=f"groups: '{name}' is a path of the proxy's own"):
        check_name("groups", name)


@pytest.mark.parametrize("name", ["", "Private", "-x", "a_b", "a.b", "é", "a\n"])
def test_names_are_lower_case_letters_digits_and_dashes(name: str) -> None:
    with pytest.raises(TopologyError, match="is not a name"):
        check_name("upstreams", name)


def test_a_group_names_upstreams_that_exist() -> None:
    with pytest.raises(TopologyError, match="groups: default: members: no upstream is named 'nope'"):
        topology(GroupSpec("default", ("private", "nope")))


def test_the_default_group_exists() -> None:
    with pytest.raises(TopologyError, match="default-group: no group is named 'default'"):
        topology(GroupSpec("mirror", ("public",)))


def test_a_route_names_upstreams_that_exist() -> None:
    with pytest.raises(TopologyError, match="routes: no upstream is named 'other'"):
        topology(routes=(Route(("acme-*",), ("other",)),))


def test_candidates_follow_routes_a_groups_own_narrowing_never_widening() -> None:
    own = (Route(("acme-special",), ("public",)), Route(("shared-x",), ("private",)))
    group = GroupSpec("default", ("private", "public"), routes=own)
    routes = (Route(("acme-*",), ("private",)), Route(("shared-*",), ("private", "public")))
    found = topology(group, routes=routes)
    assert found.candidates(group, "requests") == ("private", "public")
    assert found.candidates(group, "acme-lib") == ("private",)
    # The global route holds in every group: the group's own cannot send an
    # acme-* name to public.
    assert found.candidates(group, "acme-special") == ()
    # It may narrow one.
    assert found.candidates(group, "shared-x") == ("private",)
    assert found.candidates(group, "shared-y") == ("private", "public")
    assert found.listed_by(group, "public", "acme-lib") is False
    assert found.listed_by(group, "private", "acme-lib") is True
    assert found.listed_by(group, "public", "shared-x") is False
    assert found.routed


def test_two_upstreams_may_not_share_a_url() -> None:
    twin = UpstreamSpec("twin", PRIVATE.url)
    with pytest.raises(TopologyError, match="upstreams: private: another upstream has the same url"):
        Topology((PRIVATE, twin), (GroupSpec("default", ("private",)),))


def test_a_route_to_an_upstream_outside_the_group_leaves_no_candidate() -> None:
    mirror = GroupSpec("mirror", ("public",))
    found = topology(
        GroupSpec("default", ("private", "public")), mirror, routes=(Route(("acme-*",), ("private",)),)
    )
    assert found.candidates(mirror, "acme-lib") == ()


def test_the_command_lines_upstreams_are_one_first_index_group() -> None:
    found = single(("https://a.example/simple/", "https://b.example/simple/"))
    assert [(u.name, u.prefix) for u in found.upstreams] == [
        ("upstream", "default"),
        ("upstream-2", "upstream-2"),
    ]
    assert found.groups == (GroupSpec("default", ("upstream", "upstream-2"), "first-index"),)


def test_credentials_stay_out_of_the_repr() -> None:
    spec = UpstreamSpec("private", "https://private.example/simple/", authorization="Basic c2VjcmV0")
    assert "c2VjcmV0" not in repr(spec)

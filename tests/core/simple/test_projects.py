"""
The list of all projects: packed compactly, the root page parsed (HTML by
regular expressions, JSON a slice at a time) and rendered a batch at a time.
"""

from __future__ import annotations

import json
from html import escape as html_escape
from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from packaging.utils import canonicalize_name

from txpypi.core.simple.formats import parse_project_list
from txpypi.core.simple.listhtml import render_project_list_html
from txpypi.core.simple.listjson import parse_list_json, render_project_list_json
from txpypi.core.simple.media import JSON_V1
from txpypi.core.simple.model import IndexParseError, parse_api_version
from txpypi.core.simple.projects import ProjectList


def test_project_list_round_trip() -> None:
    names = ("Django", "zope.interface", "a_b")
    assert parse_project_list(render_project_list_json(names), JSON_V1).projects == names
    assert parse_project_list(render_project_list_html(names), "text/html").projects == names
    assert b'href="zope-interface/"' in render_project_list_html(names)


_json_bytes = st.sampled_from(list(b'{}[],:" \\nab1u0'))


def _reference_names(body: bytes) -> tuple[str, ...] | None:
    try:
        data = json.loads(body)
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("projects"), list):
        return None
    meta = data.get("meta", {})
    version = meta.get("api-version", "1.0") if isinstance(meta, dict) else "1.0"
    # The version's own rule (int() of each part, so " 1.1" passes) is not
    # what this test is about: the names are.  Hypothesis found the
    # reference's stricter rule disagreeing on a space before the 1.
    try:
        parse_api_version(version)
    except IndexParseError:
        return None
    return tuple(
        p["name"]
        for p in data["projects"]
        if isinstance(p, dict) and isinstance(p.get("name"), str) and _listable(p["name"])
    )


def _listable(name: str) -> bool:
    """
    What the project list keeps: names without a newline that UTF-8 can
    encode (JSON can spell a lone surrogate).
    """
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return bool(name) and "\n" not in name


@given(
    st.lists(st.text(st.characters(blacklist_categories=("Cs",)), max_size=6), max_size=12),
    st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 2), _json_bytes), max_size=4),
    st.sampled_from([16, 64, 1024 * 1024]),
)
@settings(max_examples=300, deadline=None)
def test_the_project_list_parser_agrees_with_json_loads(
    names: list[str], edits: list[tuple[int, int, int]], slice_size: int
) -> None:
    """
    The slice-at-a-time JSON root parser gives the names json.loads finds,
    or refuses (IndexParseError) what json.loads refuses, on documents with
    random bytes changed, deleted or inserted, cut into slices of any size.
    """
    nested = {"x": [{}, {"y": "},{"}]}  # brackets and a "},{" that are not between projects
    document = {
        "meta": {"api-version": "1.1"},
        "projects": [{"name": n, **(nested if i % 3 == 0 else {})} for i, n in enumerate(names)],
    }
    body = bytearray(json.dumps(document, separators=(",", ":") if len(names) % 2 else (", ", ": ")).encode())
    for position, kind, byte in edits:
        position %= len(body)
        if kind == 0:
            body[position] = byte
        elif kind == 1:
            del body[position]
        else:
            body.insert(position, byte)
    expected = _reference_names(bytes(body))
    try:
        got: tuple[str, ...] | None = parse_list_json(bytes(body), slice_size).projects
    except IndexParseError:
        got = None
    if got is None and expected is not None:
        # Our api-version check is stricter than the reference's: it must say so.
        with pytest.raises(IndexParseError, match="api-version"):
            parse_project_list(bytes(body), JSON_V1)
        return
    assert got == expected


def test_project_list_is_one_blob() -> None:
    names = ["Django", "zope.interface", "a\nb", "", "ok"]
    packed = ProjectList.of(names)
    assert packed.names == b"Django\nzope.interface\nok\n" and packed.count == 3
    assert list(packed) == ["Django", "zope.interface", "ok"]
    # A newline inside a name must not pass for the one between two names.
    assert list(ProjectList.of(["a\nb", "c"])) == ["c"]
    assert b'<a href="a%0Ab/">a\nb</a>' in render_project_list_html(["a\nb", "c"])


_list_names = st.lists(
    st.text(st.sampled_from("Aaz09._-_..--") | st.characters(blacklist_categories=("Cs",)), max_size=12)
    | st.text(st.sampled_from("ABab09._-"), min_size=1, max_size=12),
    max_size=30,
)


@given(_list_names)
@settings(max_examples=200)
def test_project_list_rendering_is_the_per_name_rendering(names: list[str]) -> None:
    """
    The batch fast path (plain names rendered with a few string operations
    for the whole batch) renders exactly what rendering each name with
    canonicalize_name, quote and escape gives, and packing keeps what it
    should.
    """
    links = "".join(f'    <a href="{quote(canonicalize_name(n))}/">{html_escape(n)}</a>\n' for n in names)
    assert links.encode() in render_project_list_html(names)
    assert json.loads(render_project_list_json(names))["projects"] == [{"name": n} for n in names]
    assert list(ProjectList.of(names)) == [n for n in names if _listable(n)]

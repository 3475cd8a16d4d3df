"""
One project's page: parsed from HTML and JSON, rendered back, stored.
"""

from __future__ import annotations

import json

import attrs
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from txpypi.core.names import strongest_hash
from txpypi.core.simple.formats import dump_page, load_page, render_page
from txpypi.core.simple.media import HTML_LEGACY, JSON_V1
from txpypi.core.simple.model import DistFile, IndexParseError, ProjectPage
from txpypi.core.simple.pagehtml import parse_project_html, render_project_html
from txpypi.core.simple.pagejson import parse_project_json, render_project_json

BASE = "https://upstream.example/simple/demo/"


HTML_PAGE = b"""<!DOCTYPE html><html><head>
<meta name="pypi:repository-version" content="1.4">
<meta name="pypi:project-status" content="quarantined">
<meta name="pypi:project-status-reason" content="under review">
</head><body>
<a href="../../packages/demo-1.0.tar.gz#sha256=aa11">demo-1.0.tar.gz</a>
<a href="https://files.example/demo-1.1-py3-none-any.whl#sha256=bb22"
   data-requires-python="&gt;=3.8" data-yanked="" data-dist-info-metadata="sha256=cc33">
   demo-1.1-py3-none-any.whl</a>
<a href="/x/demo-1.2-py3-none-any.whl" data-yanked="bad &amp; broken" data-core-metadata="true"
   data-gpg-sig="false">demo-1.2-py3-none-any.whl</a>
</body></html>"""


def test_parse_html_keeps_everything() -> None:
    page = parse_project_html("demo", HTML_PAGE, BASE)
    assert page.api_version == "1.4"
    assert (page.status, page.status_reason) == ("quarantined", "under review")
    first, second, third = page.files
    assert first.url == "https://upstream.example/packages/demo-1.0.tar.gz"
    assert first.hashes == {"sha256": "aa11"}
    assert second.url == "https://files.example/demo-1.1-py3-none-any.whl"
    assert second.requires_python == ">=3.8"
    assert second.yanked is True
    assert second.core_metadata == {"sha256": "cc33"}
    assert third.url == "https://upstream.example/x/demo-1.2-py3-none-any.whl"
    assert third.yanked == "bad & broken"
    assert third.core_metadata is True
    assert third.gpg_sig is False


def test_parse_json_keeps_everything() -> None:
    body = json.dumps(
        {
            "meta": {"api-version": "1.1", "_last-serial": 7},
            "name": "Demo",
            "files": [
                {
                    "filename": "demo-1.0-py3-none-any.whl",
                    "url": "../../packages/demo-1.0-py3-none-any.whl",
                    "hashes": {"sha256": "AB12", "md5": "cd"},
                    "requires-python": "<4",
                    "dist-info-metadata": {"sha256": "ee"},
                    "yanked": "oops",
                    "size": 123,
                    "upload-time": "2024-01-01T00:00:00Z",
                }
            ],
            "versions": ["1.0", "2.0"],
            "project-status": {"status": "archived"},
        }
    ).encode()
    page = parse_project_json("demo", body, BASE)
    (f,) = page.files
    assert page.name == "Demo" and page.last_serial == 7
    assert page.versions == ("1.0", "2.0") and page.status == "archived"
    assert f.url == "https://upstream.example/packages/demo-1.0-py3-none-any.whl"
    assert f.hashes == {"sha256": "AB12", "md5": "cd"}
    assert (f.requires_python, f.yanked, f.size) == ("<4", "oops", 123)
    assert f.core_metadata == {"sha256": "ee"}
    assert f.upload_time == "2024-01-01T00:00:00Z"


def test_rendered_links_point_at_the_proxy() -> None:
    page = parse_project_html("demo", HTML_PAGE, BASE)
    html = render_page(page, HTML_LEGACY).decode()
    assert "files.example" not in html and "upstream.example" not in html
    assert 'href="../../files/demo/demo-1.1-py3-none-any.whl#sha256=bb22"' in html
    assert 'data-core-metadata="sha256=cc33"' in html and 'data-dist-info-metadata="sha256=cc33"' in html
    assert 'data-yanked="bad &amp; broken"' in html
    assert 'data-requires-python="&gt;=3.8"' in html
    assert '<meta name="pypi:project-status" content="quarantined">' in html
    data = json.loads(render_page(page, JSON_V1))
    assert [f["url"] for f in data["files"]] == [
        "../../files/demo/demo-1.0.tar.gz",
        "../../files/demo/demo-1.1-py3-none-any.whl",
        "../../files/demo/demo-1.2-py3-none-any.whl",
    ]
    assert data["versions"] == ["1.0", "1.1", "1.2"]
    assert data["project-status"] == {"status": "quarantined", "reason": "under review"}
    # HTML carries no sizes, and api-version 1.1 makes them mandatory.
    assert data["meta"]["api-version"] == "1.0"
    sized = attrs.evolve(page, files=tuple(attrs.evolve(f, size=1) for f in page.files))
    assert json.loads(render_page(sized, JSON_V1))["meta"]["api-version"] == "1.4"
    assert (
        json.loads(render_page(attrs.evolve(sized, api_version="1.0"), JSON_V1))["meta"]["api-version"]
        == "1.1"
    )
    assert (
        json.loads(render_page(attrs.evolve(sized, api_version="9.0"), JSON_V1))["meta"]["api-version"]
        == "1.4"
    )


def test_nonsense_repository_version_is_read_as_1_0() -> None:
    body = HTML_PAGE.replace(b'content="1.4"', b'content=""')
    page = parse_project_html("demo", body, BASE)
    assert page.api_version == "1.0"
    assert b'content="1.0"' in render_page(page, HTML_LEGACY)


@pytest.mark.parametrize(
    "body",
    [
        b"[]",
        b"{",
        b'{"files": 3}',
        b'{"files": [{"filename": 1}]}',
        b'{"files": [{"filename": "a", "url": "b", "size": -1}]}',
    ],
)
def test_bad_json_is_refused(body: bytes) -> None:
    with pytest.raises(IndexParseError):
        parse_project_json("demo", body, BASE)


# -- round-trip properties

_text = (
    st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1, max_size=20)
    .map(str.strip)
    .filter(bool)
)
_hex = st.text("0123456789abcdef", min_size=4, max_size=64)
_hashes = st.dictionaries(st.sampled_from(["sha256", "md5", "sha512"]), _hex, max_size=2)
_some_hashes = st.dictionaries(st.sampled_from(["sha256", "md5", "sha512"]), _hex, min_size=1, max_size=2)
_filenames = st.from_regex(
    r"[a-z][a-z0-9_]{0,8}-[0-9]\.[0-9]{1,2}(-py3-none-any\.whl|\.tar\.gz)", fullmatch=True
)


@st.composite
def dist_files(draw: st.DrawFn, with_size: bool) -> DistFile:
    filename = draw(_filenames)
    return DistFile(
        filename=filename,
        url=f"https://files.example/p/{filename}",
        hashes=draw(_hashes),
        requires_python=draw(st.none() | st.sampled_from([">=3.8", "<4,>=3.7", "!=3.0.*"])),
        yanked=draw(st.booleans() | _text),
        core_metadata=draw(st.booleans() | _some_hashes),
        gpg_sig=draw(st.none() | st.booleans()),
        size=draw(st.integers(0, 10**10)) if with_size else None,
        upload_time=draw(st.none() | st.just("2024-05-06T07:08:09.123456Z")) if with_size else None,
        provenance=draw(st.none() | st.just(f"https://upstream.example/integrity/{filename}/provenance")),
    )


#: PEP 708 URLs.
_TRACKED = ["https://pypi.org/simple/demo/", "https://other.example/simple/demo/"]


@st.composite
def pages(draw: st.DrawFn, with_size: bool = True) -> ProjectPage:
    files = draw(st.lists(dist_files(with_size), max_size=6, unique_by=lambda f: f.filename))
    return ProjectPage(
        name=draw(st.from_regex(r"[A-Za-z][A-Za-z0-9._-]{0,10}[A-Za-z0-9]", fullmatch=True)),
        files=tuple(files),
        api_version=draw(st.sampled_from(["1.1", "1.4"])),
        versions=tuple(draw(st.lists(st.sampled_from(["1.0", "2.0", "3.1"]), unique=True, max_size=3))),
        status=draw(st.none() | st.sampled_from(["active", "archived", "quarantined"])),
        status_reason=None,
        last_serial=draw(st.none() | st.integers(0, 10**9)),
        tracks=tuple(draw(st.lists(st.sampled_from(_TRACKED), unique=True, max_size=2))),
        alternate_locations=tuple(draw(st.lists(st.sampled_from(_TRACKED), unique=True, max_size=2))),
    )


@given(pages())
@settings(max_examples=150)
def test_json_round_trip(page: ProjectPage) -> None:
    """
    JSON rendered with upstream URLs parses back to the same page: this is
    also how pages are stored.
    """
    assert load_page(page.name, dump_page(page)) == page
    reparsed = parse_project_json(
        page.name, render_project_json(page, lambda f: f.url, lambda f: f.provenance), ""
    )
    assert reparsed.files == page.files
    assert (reparsed.tracks, reparsed.alternate_locations) == (page.tracks, page.alternate_locations)


def _html_view(f: DistFile) -> DistFile:
    """
    What HTML can carry of a file: one hash, no size or upload time, and
    core-metadata hashes reduced to the strongest.
    """
    best = strongest_hash(f.hashes)
    metadata = f.core_metadata
    if isinstance(metadata, dict):
        strongest = strongest_hash(metadata)
        metadata = {strongest[0]: strongest[1]} if strongest else True
    return DistFile(
        filename=f.filename,
        url=f.url,
        hashes={best[0]: best[1]} if best else {},
        requires_python=f.requires_python,
        yanked=f.yanked,
        core_metadata=metadata,
        gpg_sig=f.gpg_sig,
        provenance=f.provenance,
    )


@given(pages(with_size=False))
@settings(max_examples=150)
def test_html_to_model_to_json_to_model(page: ProjectPage) -> None:
    """
    HTML -> model -> JSON -> model keeps every field that HTML carries.
    """
    html = render_project_html(page, lambda f: f.url, lambda f: f.provenance)
    from_html = parse_project_html(page.name, html, "")
    assert from_html.files == tuple(_html_view(f) for f in page.files)
    assert from_html.status == page.status
    assert (from_html.tracks, from_html.alternate_locations) == (page.tracks, page.alternate_locations)
    json = render_project_json(from_html, lambda f: f.url, lambda f: f.provenance)
    from_json = parse_project_json(page.name, json, "")
    assert from_json.files == from_html.files
    assert from_json.status == from_html.status
    assert (from_json.tracks, from_json.alternate_locations) == (page.tracks, page.alternate_locations)


# -- links that cannot be resolved

_hrefs = st.text(
    st.sampled_from("[]:/?#@%.-_ab1\\ \t\"'<>&=;") | st.characters(blacklist_categories=("Cs",)), max_size=30
) | st.builds(lambda host, rest: f"http://[{host}{rest}", st.text("0123456789abcdef:", max_size=8), _text)


@given(_hrefs, st.sampled_from(["https://upstream.example/simple/demo/", "", "http://[::1]/x/"]))
@settings(max_examples=300)
def test_arbitrary_hrefs_never_raise_but_index_parse_error(href: str, base: str) -> None:
    """
    Whatever an upstream puts in an href (HTML, escaped or raw) or a url
    (JSON), parsing raises nothing but IndexParseError; a link whose URL
    urljoin refuses is left out and reported, never a crash.
    """
    from html import escape as html_escape

    escaped = html_escape(href)
    link = f'<a href="{escaped}">demo-1.0.tar.gz</a>'
    skipped: list[tuple[str, str]] = []
    for body, checked in (
        (link.encode(), True),
        (f'<base href="{escaped}">{link}'.encode(), False),
        (f"<a href={href}>demo-1.0.tar.gz</a>".encode("utf-8", "surrogatepass"), False),
    ):
        skipped.clear()
        try:
            page = parse_project_html("demo", body, base, lambda h, r: skipped.append((h, r)))
        except IndexParseError:
            continue
        if checked and href:
            assert len(page.files) + len(skipped) == 1
    entry = {"filename": "demo-1.0.tar.gz", "url": href, "hashes": {}}
    skipped.clear()
    try:
        page = parse_project_json(
            "demo", json.dumps({"files": [entry]}).encode(), base, lambda h, r: skipped.append((h, r))
        )
    except IndexParseError:
        return
    assert len(page.files) + len(skipped) == 1


def test_an_invalid_ipv6_link_is_left_out() -> None:
    skipped: list[tuple[str, str]] = []
    page = parse_project_html(
        "demo",
        b'<a href="http://[::1/a-1.0.tar.gz">a-1.0.tar.gz</a><a href="b-1.0.tar.gz">b-1.0.tar.gz</a>',
        BASE,
        lambda h, r: skipped.append((h, r)),
    )
    assert [f.filename for f in page.files] == ["b-1.0.tar.gz"]
    assert skipped == [("http://[::1/a-1.0.tar.gz", "Invalid IPv6 URL")]

"""
One project's page in HTML (PEP 503, with PEP 592, 629, 658, 714 and 792
attributes): read from an upstream, and written for clients.
"""

from __future__ import annotations

from collections.abc import Mapping
from html import escape
from html.parser import HTMLParser
from urllib.parse import unquote, urljoin, urlsplit

from txpypi.core.names import strongest_hash
from txpypi.core.simple.links import HrefFor, SkipLink, ignore, resolve
from txpypi.core.simple.model import (
    CORE_METADATA_KEYS,
    DistFile,
    IndexParseError,
    ProjectPage,
    parse_api_version,
    served_api_version,
)
from txpypi.core.simple.pagejson import ProvenanceFor, no_provenance

_VERSION = "pypi:repository-version"
_STATUS = "pypi:project-status"
_STATUS_REASON = "pypi:project-status-reason"
#: PEP 708: C{<meta>} elements that may be repeated, one URL or name each.
_TRACKS = "pypi:tracks"
_ALTERNATES = "pypi:alternate-locations"
_METADATA = tuple(f"data-{key}" for key in CORE_METADATA_KEYS)


class _PageParser(HTMLParser):
    def __init__(self, base_url: str, skip: SkipLink = ignore) -> None:
        super().__init__(convert_charrefs=True)
        self.base_url = base_url
        self._skip = skip
        self.meta: dict[str, str] = {}
        #: Every value of the C{<meta>} names that may repeat, in order.
        self.repeated: dict[str, list[str]] = {_TRACKS: [], _ALTERNATES: []}
        self.anchors: list[tuple[dict[str, str | None], str]] = []
        self._current: dict[str, str | None] | None = None
        self._text: list[str] = []

    def handle_starttag(self, tag: str, attrs_: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs_)
        if tag == "base" and attributes.get("href"):
            href = attributes["href"] or ""
            try:
                self.base_url = urljoin(self.base_url, href)
            except ValueError as e:
                self._skip(href, f"<base> ignored: {e}")
        elif tag == "meta" and attributes.get("name"):
            name, content = str(attributes["name"]), attributes.get("content") or ""
            self.meta[name] = content
            if name in self.repeated and content:
                self.repeated[name].append(content)
        elif tag == "a":
            self._current = attributes
            self._text = []

    def handle_data(self, data: str) -> None:
        if self._current is not None:
            self._text.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "a" and self._current is not None:
            self.anchors.append((self._current, "".join(self._text).strip()))
            self._current = None


def _feed(body: bytes | str, base_url: str, skip: SkipLink = ignore) -> _PageParser:
    parser = _PageParser(base_url, skip)
    try:
        parser.feed(body if isinstance(body, str) else body.decode("utf-8", "replace"))
        parser.close()
    except Exception as e:  # HTMLParser is lenient; be safe anyway
        raise IndexParseError(f"unparseable HTML: {e}") from e
    return parser


def _version_of(meta: Mapping[str, str]) -> str:
    """
    The version a page's C{meta} declares, or C{1.0} when it makes no sense.
    """
    value = meta.get(_VERSION, "1.0")
    try:
        parse_api_version(value)
    except IndexParseError:
        return "1.0"
    return value


def declared_version(head: str) -> str:
    """
    The api-version the C{meta} elements of an HTML page (or of its head)
    declare, C{1.0} when none does or it makes no sense.

    @raise IndexParseError: it cannot be parsed at all.
    """
    return _version_of(_feed(head, "").meta)


def _metadata_attr(value: str | None) -> bool | dict[str, str]:
    if value is None or value.strip().lower() in ("", "false"):
        return False
    if value.strip().lower() == "true":
        return True
    name, sep, digest = value.partition("=")
    if sep and name and digest:
        return {name.strip().lower(): digest.strip()}
    return True


def _dist_file(
    attributes: Mapping[str, str | None], text: str, base_url: str, skip: SkipLink
) -> DistFile | None:
    """
    The file an C{<a>} element lists, or L{None} when it has no link or
    its link cannot be resolved (then C{skip} is told).
    """
    href = attributes.get("href")
    if not href:
        return None
    try:
        url, hashes = resolve(base_url, href)
        filename = text or unquote(urlsplit(url).path.rsplit("/", 1)[-1])
    except ValueError as e:
        skip(href, str(e))
        return None
    yanked: bool | str = False
    if "data-yanked" in attributes:
        yanked = attributes["data-yanked"] or True
    gpg = attributes.get("data-gpg-sig")
    provenance = attributes.get("data-provenance") or None
    if provenance is not None:
        try:
            provenance = urljoin(base_url, provenance)
        except ValueError:
            provenance = None
    return DistFile(
        filename=filename,
        url=url,
        hashes=hashes,
        requires_python=attributes.get("data-requires-python") or None,
        yanked=yanked,
        core_metadata=_metadata_attr(attributes.get(_METADATA[0], attributes.get(_METADATA[1]))),
        gpg_sig=None if gpg is None else gpg.lower() == "true",
        provenance=provenance,
    )


def parse_project_html(name: str, body: bytes, base_url: str, skip: SkipLink = ignore) -> ProjectPage:
    """
    Parse a PEP 503 project page.  Relative links are resolved against
    C{base_url} (or a C{<base>} element); a link that cannot be resolved is
    left out, and C{skip} told.
    """
    parser = _feed(body, base_url, skip)
    parsed = (_dist_file(attributes, text, parser.base_url, skip) for attributes, text in parser.anchors)
    return ProjectPage(
        name=name,
        files=tuple(f for f in parsed if f is not None),
        api_version=_version_of(parser.meta),
        status=parser.meta.get(_STATUS) or None,
        status_reason=parser.meta.get(_STATUS_REASON) or None,
        tracks=tuple(parser.repeated[_TRACKS]),
        alternate_locations=tuple(parser.repeated[_ALTERNATES]),
    )


def _strongest(hashes: Mapping[str, str]) -> str | None:
    """
    The strongest hash as C{name=digest}: HTML carries one.
    """
    best = strongest_hash(hashes)
    return f"{best[0]}={best[1]}" if best else None


def _link(f: DistFile, href_for: HrefFor, provenance_for: ProvenanceFor) -> str:
    fragment = _strongest(f.hashes)
    attributes = [f'href="{escape(href_for(f) + ("" if fragment is None else "#" + fragment))}"']
    if f.requires_python:
        attributes.append(f'data-requires-python="{escape(f.requires_python)}"')
    if f.yanked is not False:
        reason = "" if f.yanked is True else str(f.yanked)
        attributes.append(f'data-yanked="{escape(reason)}"')
    if f.core_metadata is not False:
        metadata = "true" if f.core_metadata is True else _strongest(f.core_metadata) or "true"
        attributes += [f'{key}="{escape(metadata)}"' for key in _METADATA]
    if f.gpg_sig is not None:
        attributes.append(f'data-gpg-sig="{"true" if f.gpg_sig else "false"}"')
    provenance = provenance_for(f)
    if provenance is not None:
        attributes.append(f'data-provenance="{escape(provenance)}"')
    return f"    <a {' '.join(attributes)}>{escape(f.filename)}</a><br />"


def render_project_html(
    page: ProjectPage, href_for: HrefFor, provenance_for: ProvenanceFor = no_provenance
) -> bytes:
    """
    Render a PEP 503 page, with PEP 592, 629, 658, 708, 714, 740 and 792
    attributes.
    """
    name = escape(page.name)
    lines = [
        "<!DOCTYPE html>",
        "<html>",
        "  <head>",
        f'    <meta name="{_VERSION}" content="{served_api_version(page, json=False)}">',
    ]
    if page.status:
        lines.append(f'    <meta name="{_STATUS}" content="{escape(page.status)}">')
    if page.status_reason:
        lines.append(f'    <meta name="{_STATUS_REASON}" content="{escape(page.status_reason)}">')
    lines += [f'    <meta name="{_TRACKS}" content="{escape(url)}">' for url in page.tracks]
    lines += [f'    <meta name="{_ALTERNATES}" content="{escape(url)}">' for url in page.alternate_locations]
    lines += [
        f"    <title>Links for {name}</title>",
        "  </head>",
        "  <body>",
        f"    <h1>Links for {name}</h1>",
    ]
    lines += [_link(f, href_for, provenance_for) for f in page.files]
    lines += ["  </body>", "</html>", ""]
    return "\n".join(lines).encode("utf-8")

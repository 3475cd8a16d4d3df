"""
The Simple Repository API as values: parse upstream pages (PEP 503 HTML and
PEP 691 JSON) into frozen attrs values, render them back in either format,
and negotiate which format a client wants.

Pure: no I/O, no reactor.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from html import escape, unescape
from html.parser import HTMLParser
from itertools import islice
from typing import Any
from urllib.parse import quote, unquote, urldefrag, urljoin, urlsplit

import attrs
from packaging.utils import (
    InvalidSdistFilename,
    InvalidWheelFilename,
    canonicalize_name,
    parse_sdist_filename,
    parse_wheel_filename,
)

from txpypi.core.names import strongest_hash

JSON_V1 = "application/vnd.pypi.simple.v1+json"
HTML_V1 = "application/vnd.pypi.simple.v1+html"
HTML_LEGACY = "text/html"
JSON_LATEST = "application/vnd.pypi.simple.latest+json"
HTML_LATEST = "application/vnd.pypi.simple.latest+html"

#: What we serve, in order of preference when a client likes several equally.
SERVED_TYPES = (HTML_LEGACY, HTML_V1, JSON_V1)
_ALIASES = {JSON_LATEST: JSON_V1, HTML_LATEST: HTML_V1}

#: What we ask an upstream for: JSON first, because only JSON carries sizes and
#: upload times.
UPSTREAM_ACCEPT = f"{JSON_V1}, {HTML_V1};q=0.2, {HTML_LEGACY};q=0.1"

#: The highest api-version whose fields we understand and pass on.
MAX_API_VERSION = (1, 4)


class IndexParseError(ValueError):
    """
    An upstream page could not be understood.
    """


@attrs.frozen
class DistFile:
    """
    One file in a project's index, as the upstream described it.

    @ivar url: the absolute URL the upstream listed (fragment removed).
    @ivar yanked: C{False}, C{True}, or the yank reason (PEP 592).
    @ivar core_metadata: C{False}, C{True}, or the metadata file's hashes
        (PEP 658 / PEP 714).
    """

    filename: str
    url: str
    hashes: Mapping[str, str] = attrs.field(factory=dict)
    requires_python: str | None = None
    yanked: bool | str = False
    core_metadata: bool | Mapping[str, str] = False
    gpg_sig: bool | None = None
    size: int | None = None
    upload_time: str | None = None


@attrs.frozen
class ProjectPage:
    """
    One project's index page.
    """

    name: str
    files: tuple[DistFile, ...]
    api_version: str = "1.0"
    versions: tuple[str, ...] | None = None
    status: str | None = None
    status_reason: str | None = None
    last_serial: int | None = None

    def find(self, filename: str) -> DistFile | None:
        for f in self.files:
            if f.filename == filename:
                return f
        return None


#: How many project names are packed, rendered or parsed at a time, so
#: that a list of 700,000 never exists as 700,000 Python objects at once.
LIST_BATCH = 10_000


#: A batch of names (joined by newlines) that needs no escaping in HTML or
#: JSON, no quoting in a URL, and holds no empty name: the common case,
#: which is packed and rendered with a few string operations per batch
#: rather than a few function calls per name.
_PLAIN = re.compile(r"[A-Za-z0-9._-]+(?:\n[A-Za-z0-9._-]+)*")
_DASHES = re.compile(r"--+")


def _plain(batch: list[str]) -> str | None:
    """
    The batch joined by newlines, if it is plain (see L{_PLAIN}).
    """
    text = "\n".join(batch)
    if _PLAIN.fullmatch(text) is None or text.count("\n") != len(batch) - 1:
        return None
    return text


def _pack(names: Iterable[str]) -> tuple[bytes, int]:
    """
    Names as one UTF-8 blob, each followed by a newline, and their count.
    An empty name, one that holds a newline, or one that cannot be encoded
    (a lone surrogate from JSON) is left out: it could not be a project
    anyone installs.
    """
    out = io.BytesIO()
    count = _pack_into(out, names)
    return out.getvalue(), count


def _pack_into(out: io.BytesIO, names: Iterable[str]) -> int:
    """
    L{_pack} into C{out}, a batch at a time: big results grow in one
    buffer rather than as pieces joined at the end, which would leave the
    allocator with as much again in freed pieces.
    """
    count = 0
    it = iter(names)
    while batch := list(islice(it, LIST_BATCH)):
        text = _plain(batch)
        if text is not None:
            out.write(text.encode("ascii"))
            out.write(b"\n")
            count += len(batch)
            continue
        for name in batch:
            if name and "\n" not in name:
                try:
                    out.write((name + "\n").encode("utf-8"))
                    count += 1
                except UnicodeEncodeError:
                    pass
    return count


def _batches(blob: bytes, size: int = 256 * 1024) -> Iterator[list[str]]:
    """
    The names packed in C{blob}, about C{size} bytes of them at a time.
    """
    start = 0
    while start < len(blob):
        end = blob.find(b"\n", start + size)
        end = len(blob) if end < 0 else end + 1
        yield blob[start:end].decode("utf-8").split("\n")[:-1]
        start = end


@attrs.frozen
class ProjectList:
    """
    The list of all projects an index knows, compactly: C{names} holds them
    in UTF-8, each followed by a newline, in one bytes object rather than
    one Python object per project (PyPI lists some 700,000).  Build it with
    L{ProjectList.of}.
    """

    names: bytes = b""
    count: int = 0
    api_version: str = "1.0"

    @classmethod
    def of(cls, names: Iterable[str], api_version: str = "1.0") -> ProjectList:
        blob, count = _pack(names)
        return cls(blob, count, api_version)

    def batches(self) -> Iterator[list[str]]:
        """
        The names, a batch at a time.
        """
        return _batches(self.names)

    def __iter__(self) -> Iterator[str]:
        for batch in self.batches():
            yield from batch

    @property
    def projects(self) -> tuple[str, ...]:
        """
        All the names as a tuple (for small lists: tests, debugging).
        """
        return tuple(self)


# ---------------------------------------------------------------------------
# Content negotiation (PEP 691)


def _parse_accept(accept: str) -> list[tuple[str, float]]:
    ranges = []
    for part in accept.split(","):
        pieces = [p.strip() for p in part.split(";")]
        media = pieces[0].lower()
        if not media:
            continue
        q = 1.0
        for param in pieces[1:]:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value.strip())
                except ValueError:
                    q = 0.0
                q = min(max(q, 0.0), 1.0)
        ranges.append((_ALIASES.get(media, media), q))
    return ranges


def _specificity(media_range: str, candidate: str) -> int:
    if media_range == candidate:
        return 3
    major, _, minor = media_range.partition("/")
    if minor == "*" and candidate.split("/")[0] == major:
        return 2
    if media_range == "*/*":
        return 1
    return 0


def negotiate(accept: str | None, format_override: str | None = None) -> str | None:
    """
    Choose the content type to serve for a Simple API page.

    @param accept: the request's C{Accept} header, or L{None}.
    @param format_override: the C{?format=} query value, which wins when given.
    @return: one of L{SERVED_TYPES}, or L{None} when nothing we serve is
        acceptable (the caller answers 406).
    """
    if format_override is not None:
        # A literal "+" in a query string decodes to a space; take it back.
        requested = format_override.strip().lower().replace(" ", "+")
        wanted = _ALIASES.get(requested, requested)
        return wanted if wanted in SERVED_TYPES else None
    if not accept or not accept.strip():
        return HTML_LEGACY
    ranges = _parse_accept(accept)
    best: str | None = None
    best_q = 0.0
    for candidate in SERVED_TYPES:
        specific = 0
        q = 0.0
        for media_range, range_q in ranges:
            s = _specificity(media_range, candidate)
            if s > specific or (s == specific and s > 0 and range_q > q):
                specific, q = s, range_q
        if specific and q > best_q:
            best, best_q = candidate, q
    return best


# ---------------------------------------------------------------------------
# Parsing


def _parse_version(value: Any) -> tuple[int, int]:
    try:
        major, _, minor = str(value).partition(".")
        return int(major), int(minor or 0)
    except ValueError as e:
        raise IndexParseError(f"bad api-version {value!r}") from e


def _html_api_version(value: str) -> str:
    """
    An HTML page's declared version, or C{1.0} when it makes no sense.
    """
    try:
        _parse_version(value)
    except IndexParseError:
        return "1.0"
    return value


def _hashes_from_fragment(url: str) -> tuple[str, dict[str, str]]:
    base, fragment = urldefrag(url)
    hashes: dict[str, str] = {}
    if fragment:
        name, sep, value = fragment.partition("=")
        if sep and name and value:
            hashes[name.lower()] = value
    return base, hashes


def _metadata_attr(value: str | None) -> bool | dict[str, str]:
    if value is None or value.strip().lower() in ("", "false"):
        return False
    if value.strip().lower() == "true":
        return True
    name, sep, digest = value.partition("=")
    if sep and name and digest:
        return {name.strip().lower(): digest.strip()}
    return True


#: Told of each link left out of a page because its URL cannot be resolved
#: (C{urljoin} refuses it, for instance C{http://[::1}): the href and why.
SkipLink = Callable[[str, str], None]


def _ignore(href: str, reason: str) -> None:
    pass


def _resolve(base_url: str, href: str) -> tuple[str, dict[str, str]]:
    """
    C{href} made absolute against C{base_url}, without its fragment, and the
    hash the fragment named.

    @raise ValueError: C{urljoin} cannot make sense of it.
    """
    return _hashes_from_fragment(urljoin(base_url, href))


class _PageParser(HTMLParser):
    def __init__(self, base_url: str, skip: SkipLink = _ignore) -> None:
        super().__init__(convert_charrefs=True)
        self.base_url = base_url
        self._skip = skip
        self.meta: dict[str, str] = {}
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
            self.meta[str(attributes["name"])] = attributes.get("content") or ""
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


def _feed(body: bytes | str, base_url: str, skip: SkipLink = _ignore) -> _PageParser:
    parser = _PageParser(base_url, skip)
    try:
        parser.feed(body if isinstance(body, str) else body.decode("utf-8", "replace"))
        parser.close()
    except Exception as e:  # HTMLParser is lenient; be safe anyway
        raise IndexParseError(f"unparseable HTML: {e}") from e
    return parser


def parse_project_html(name: str, body: bytes, base_url: str, skip: SkipLink = _ignore) -> ProjectPage:
    """
    Parse a PEP 503 project page.  Relative links are resolved against
    C{base_url} (or a C{<base>} element); a link that cannot be resolved is
    left out, and C{skip} told.
    """
    parser = _feed(body, base_url, skip)
    files = []
    for attributes, text in parser.anchors:
        href = attributes.get("href")
        if not href:
            continue
        try:
            url, hashes = _resolve(parser.base_url, href)
            filename = text or unquote(urlsplit(url).path.rsplit("/", 1)[-1])
        except ValueError as e:
            skip(href, str(e))
            continue
        yanked: bool | str = False
        if "data-yanked" in attributes:
            yanked = attributes["data-yanked"] or True
        metadata_attr = attributes.get("data-core-metadata", attributes.get("data-dist-info-metadata"))
        gpg = attributes.get("data-gpg-sig")
        files.append(
            DistFile(
                filename=filename,
                url=url,
                hashes=hashes,
                requires_python=attributes.get("data-requires-python") or None,
                yanked=yanked,
                core_metadata=_metadata_attr(metadata_attr),
                gpg_sig=None if gpg is None else gpg.lower() == "true",
            )
        )
    return ProjectPage(
        name=name,
        files=tuple(files),
        api_version=_html_api_version(parser.meta.get("pypi:repository-version", "1.0")),
        status=parser.meta.get("pypi:project-status") or None,
        status_reason=parser.meta.get("pypi:project-status-reason") or None,
    )


def _as_hashes(value: Any, what: str) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise IndexParseError(f"{what} is not a mapping of strings")
    return {k.lower(): v for k, v in value.items()}


def _json_file(entry: Any, base_url: str, skip: SkipLink) -> DistFile | None:
    if not isinstance(entry, dict):
        raise IndexParseError("file entry is not an object")
    filename = entry.get("filename")
    href = entry.get("url")
    if not isinstance(filename, str) or not isinstance(href, str):
        raise IndexParseError("file entry lacks filename or url")
    try:
        url, fragment_hashes = _resolve(base_url, href)
    except ValueError as e:
        skip(href, str(e))
        return None
    hashes = fragment_hashes
    hashes.update(_as_hashes(entry.get("hashes", {}), "hashes"))
    metadata: Any = entry.get("core-metadata", entry.get("dist-info-metadata", False))
    if isinstance(metadata, dict):
        metadata = _as_hashes(metadata, "core-metadata")
    elif not isinstance(metadata, bool):
        raise IndexParseError("core-metadata is neither a bool nor a mapping")
    yanked = entry.get("yanked", False)
    if not isinstance(yanked, (bool, str)):
        raise IndexParseError("yanked is neither a bool nor a string")
    if yanked == "":
        yanked = True
    size = entry.get("size")
    if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 0):
        raise IndexParseError("size is not a non-negative integer")
    requires_python = entry.get("requires-python")
    upload_time = entry.get("upload-time")
    gpg = entry.get("gpg-sig")
    return DistFile(
        filename=filename,
        url=url,
        hashes=hashes,
        requires_python=requires_python if isinstance(requires_python, str) and requires_python else None,
        yanked=yanked,
        core_metadata=metadata,
        gpg_sig=gpg if isinstance(gpg, bool) else None,
        size=size,
        upload_time=upload_time if isinstance(upload_time, str) else None,
    )


def _load_json(body: bytes) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except ValueError as e:
        raise IndexParseError(f"invalid JSON: {e}") from e
    if not isinstance(data, dict):
        raise IndexParseError("JSON page is not an object")
    return data


def _meta_version(data: Mapping[str, Any]) -> str:
    meta = data.get("meta", {})
    version = meta.get("api-version", "1.0") if isinstance(meta, dict) else "1.0"
    _parse_version(version)
    return str(version)


def parse_project_json(name: str, body: bytes, base_url: str, skip: SkipLink = _ignore) -> ProjectPage:
    """
    Parse a PEP 691 project page.  A file whose URL cannot be resolved is
    left out, and C{skip} told.
    """
    data = _load_json(body)
    files = data.get("files")
    if not isinstance(files, list):
        raise IndexParseError("JSON page has no files list")
    versions = data.get("versions")
    if versions is not None and not (
        isinstance(versions, list) and all(isinstance(v, str) for v in versions)
    ):
        raise IndexParseError("versions is not a list of strings")
    status = data.get("project-status")
    status_name = status_reason = None
    if isinstance(status, dict):
        status_name = status.get("status") if isinstance(status.get("status"), str) else None
        status_reason = status.get("reason") if isinstance(status.get("reason"), str) else None
    meta = data.get("meta")
    serial = meta.get("_last-serial") if isinstance(meta, dict) else None
    parsed = (_json_file(entry, base_url, skip) for entry in files)
    return ProjectPage(
        name=str(data.get("name") or name),
        files=tuple(f for f in parsed if f is not None),
        api_version=_meta_version(data),
        versions=None if versions is None else tuple(versions),
        status=status_name,
        status_reason=status_reason,
        last_serial=serial if isinstance(serial, int) and not isinstance(serial, bool) else None,
    )


def parse_project(
    name: str, body: bytes, content_type: str, base_url: str, skip: SkipLink = _ignore
) -> ProjectPage:
    """
    Parse a project page in whichever format the upstream answered with;
    C{skip} is told of each link left out because it cannot be resolved.
    """
    if "json" in content_type.lower():
        return parse_project_json(name, body, base_url, skip)
    return parse_project_html(name, body, base_url, skip)


def parse_project_list(body: bytes, content_type: str) -> ProjectList:
    """
    Parse the root C{/simple/} page in either format, into a compact
    L{ProjectList}.  Neither parser builds one Python object per project
    for the whole list: JSON is parsed a slice of the projects array at a
    time, HTML by regular expressions rather than L{HTMLParser} (which
    takes some 13 s for PyPI's 700,000 links).
    """
    if "json" in content_type.lower():
        return _parse_list_json(body)
    return _parse_list_html(body)


_WS = re.compile(rb"[ \t\n\r]*")
#: A JSON string, or a lone quote (an unterminated string: an error).
_JSON_STRING = rb'"(?:[^"\\]|\\.)*"|"'
_STRING = re.compile(_JSON_STRING, re.S)
#: What matters for finding where a JSON value ends: strings (whose
#: brackets and commas do not count), brackets and commas.
_STRUCTURE = re.compile(_JSON_STRING + rb"|[\[\]{},]", re.S)
#: A scalar's extent (checked by json.loads afterwards).
_SCALAR = re.compile(rb"[^,\]}\s]+")
#: Where one object of a list may end and the next begin.
_NEXT_OBJECT = re.compile(rb"\}[ \t\n\r]*,[ \t\n\r]*\{")
#: About how many bytes of the projects array are parsed at a time.
LIST_SLICE = 1024 * 1024


def _loads(data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError as e:  # UnicodeDecodeError included
        raise IndexParseError(f"invalid JSON: {e}") from e


def _skip_ws(body: bytes, i: int) -> int:
    match = _WS.match(body, i)
    assert match is not None  # it matches the empty string
    return match.end()


def _value_end(body: bytes, i: int, depth: int = 0, cut_after: int | None = None) -> tuple[int, bool]:
    """
    Where the JSON value that starts at C{i} ends.  With C{depth=1}, C{i}
    is inside an array: return where it closes (C{True}) or, given
    C{cut_after}, the first comma between its elements at or after that
    offset (C{False}).  Exact: strings are skipped whole.
    """
    if depth == 0 and body[i : i + 1] not in (b"{", b"["):
        scalar = _STRING.match(body, i) if body[i : i + 1] == b'"' else _SCALAR.match(body, i)
        if scalar is None or scalar.group() == b'"':
            raise IndexParseError("invalid JSON: bad value")
        return scalar.end(), False
    for token in _STRUCTURE.finditer(body, i):
        t = token.group()
        if t[0] == 0x22:  # '"'
            if len(t) == 1:
                raise IndexParseError("invalid JSON: unterminated string")
        elif t in (b"{", b"["):
            depth += 1
        elif t in (b"}", b"]"):
            depth -= 1
            if depth == 0:
                if cut_after is not None and t != b"]":
                    raise IndexParseError("invalid JSON: unbalanced brackets")
                return token.end(), True
            if depth < 0:
                raise IndexParseError("invalid JSON: unbalanced brackets")
        elif depth == 1 and cut_after is not None and token.start() >= cut_after:
            return token.start(), False
    raise IndexParseError("invalid JSON: unterminated value")


def _project_names(body: bytes, i: int, out: io.BytesIO) -> tuple[int, int]:
    """
    Parse the projects array that starts at C{i}, a slice of about
    L{LIST_SLICE} bytes at a time: each slice ends where one object ends
    and the next begins, and is parsed with C{json.loads} (a guess at that
    place that is wrong -- inside a string, or inside a nested value --
    makes the slice invalid JSON; then the slice is cut exactly instead).

    @param out: where the names are packed (see L{_pack}).
    @return: how many were, and where the array ends.
    """
    if body[i : i + 1] != b"[":
        raise IndexParseError("JSON root page has no projects list")
    count = 0
    position = _skip_ws(body, i + 1)
    if body[position : position + 1] == b"]":
        return 0, position + 1
    while True:
        items: Any = None
        candidate = _NEXT_OBJECT.search(body, position + LIST_SLICE)
        if candidate is not None:
            try:
                items = json.loads(b"[" + body[position : candidate.start() + 1] + b"]")
                end, following, last = candidate.start() + 1, candidate.end() - 1, False
            except ValueError:
                items = None
        if items is None:
            end, last = _value_end(body, position, depth=1, cut_after=position + LIST_SLICE)
            if last:
                end -= 1  # the closing bracket
            items = _loads(b"[" + body[position:end] + b"]")
            following = _skip_ws(body, end + 1)
        names = [n for item in items if type(item) is dict and type(n := item.get("name")) is str]
        count += _pack_into(out, names)
        if last:
            return count, end + 1
        position = following


def _parse_list_json(body: bytes) -> ProjectList:
    """
    A JSON root page: the top-level object is walked key by key; its
    C{projects} array is parsed by L{_project_names}, any other value whole.
    """
    i = _skip_ws(body, 0)
    if body[i : i + 1] != b"{":
        raise IndexParseError("JSON page is not an object")
    data: dict[str, Any] = {}
    found: tuple[io.BytesIO, int] | None = None
    i = _skip_ws(body, i + 1)
    if body[i : i + 1] != b"}":
        while True:
            key_match = _STRING.match(body, i)
            if key_match is None or key_match.group() == b'"':
                raise IndexParseError("invalid JSON: expected a key")
            key = _loads(key_match.group())
            i = _skip_ws(body, key_match.end())
            if body[i : i + 1] != b":":
                raise IndexParseError("invalid JSON: expected ':'")
            i = _skip_ws(body, i + 1)
            if key == "projects":
                out = io.BytesIO()  # a second projects key replaces the first
                count, i = _project_names(body, i, out)
                found = out, count
            else:
                end, _ = _value_end(body, i)
                data[key] = _loads(body[i:end])
                i = end
            i = _skip_ws(body, i)
            if body[i : i + 1] == b",":
                i = _skip_ws(body, i + 1)
                continue
            if body[i : i + 1] == b"}":
                break
            raise IndexParseError("invalid JSON: expected ',' or '}'")
    if _skip_ws(body, i + 1) != len(body):
        raise IndexParseError("invalid JSON: extra data after the object")
    if found is None:
        raise IndexParseError("JSON root page has no projects list")
    out, count = found
    return ProjectList(out.getvalue(), count, api_version=_meta_version(data))


_COMMENT = re.compile(r"<!--.*?(?:-->|\Z)", re.S)
_ANCHOR = re.compile(r"<a(?:\s[^>]*)?>(.*?)</a\s*>", re.S | re.I)
_TAG = re.compile(r"<[^>]*>")


def _anchor_texts(text: str) -> Iterator[str]:
    for anchor in _ANCHOR.finditer(text):
        name = anchor.group(1)
        if "<" in name:
            name = _TAG.sub("", name)
        if "&" in name:
            name = unescape(name)
        name = name.strip()
        if name:
            yield name


def _parse_list_html(body: bytes) -> ProjectList:
    """
    An HTML root page: the text of each C{<a>} element (comments left out,
    tags inside it stripped, character references decoded).  The head,
    before the first link, goes through L{HTMLParser} for its C{meta}.
    """
    text = body.decode("utf-8", "replace")
    if "<!--" in text:
        text = _COMMENT.sub("", text)
    first = _ANCHOR.search(text)
    head = _feed(text if first is None else text[: first.start()], "")
    blob, count = _pack(_anchor_texts(text))
    return ProjectList(
        blob, count, api_version=_html_api_version(head.meta.get("pypi:repository-version", "1.0"))
    )


# ---------------------------------------------------------------------------
# Rendering


def file_version(filename: str) -> str | None:
    """
    The version encoded in a wheel or sdist file name, if it parses.
    """
    try:
        if filename.endswith(".whl"):
            return str(parse_wheel_filename(filename)[1])
        return str(parse_sdist_filename(filename)[1])
    except (InvalidWheelFilename, InvalidSdistFilename, ValueError):
        return None


def page_versions(page: ProjectPage) -> tuple[str, ...]:
    """
    The versions a page lists: the upstream's own list when it sent one (PEP
    700), else those parsed from its file names.
    """
    if page.versions is not None:
        return page.versions
    seen: dict[str, None] = {}
    for f in page.files:
        version = file_version(f.filename)
        if version is not None:
            seen.setdefault(version)
    return tuple(seen)


def served_api_version(page: ProjectPage, json: bool) -> str:
    """
    The api-version we can honestly claim for a page we render: what the
    upstream declared, capped at what we understand.  JSON claims at least
    1.1 (PEP 700) when every file has its size, and 1.0 when some do not,
    because 1.1 makes C{size} mandatory.
    """
    version = min(_parse_version(page.api_version), MAX_API_VERSION)
    if json:
        if all(f.size is not None for f in page.files):
            version = max(version, (1, 1))
        else:
            version = (1, 0)
    return f"{version[0]}.{version[1]}"


def local_href(project: str, filename: str) -> str:
    """
    The link we serve for a file, relative to C{/simple/<project>/}, so that
    it resolves to C{/files/<project>/<filename>} under whatever host and
    prefix the client used.
    """
    return f"../../files/{quote(project)}/{quote(filename)}"


HrefFor = Callable[[DistFile], str]


def _fragment(hashes: Mapping[str, str]) -> str:
    best = strongest_hash(hashes)
    return f"#{best[0]}={best[1]}" if best else ""


def _metadata_value_html(value: bool | Mapping[str, str]) -> str | None:
    if value is False:
        return None
    if value is True:
        return "true"
    assert not isinstance(value, bool)
    best = strongest_hash(value)
    return f"{best[0]}={best[1]}" if best else "true"


def render_project_html(page: ProjectPage, href_for: HrefFor) -> bytes:
    """
    Render a PEP 503 page, with PEP 592, 629, 658, 714 and 792 attributes.
    """
    name = escape(page.name)
    lines = [
        "<!DOCTYPE html>",
        "<html>",
        "  <head>",
        f'    <meta name="pypi:repository-version" content="{served_api_version(page, json=False)}">',
    ]
    if page.status:
        lines.append(f'    <meta name="pypi:project-status" content="{escape(page.status)}">')
    if page.status_reason:
        lines.append(f'    <meta name="pypi:project-status-reason" content="{escape(page.status_reason)}">')
    lines += [
        f"    <title>Links for {name}</title>",
        "  </head>",
        "  <body>",
        f"    <h1>Links for {name}</h1>",
    ]
    for f in page.files:
        attributes = [f'href="{escape(href_for(f) + _fragment(f.hashes))}"']
        if f.requires_python:
            attributes.append(f'data-requires-python="{escape(f.requires_python)}"')
        if f.yanked is not False:
            reason = "" if f.yanked is True else str(f.yanked)
            attributes.append(f'data-yanked="{escape(reason)}"')
        metadata = _metadata_value_html(f.core_metadata)
        if metadata is not None:
            attributes.append(f'data-core-metadata="{escape(metadata)}"')
            attributes.append(f'data-dist-info-metadata="{escape(metadata)}"')
        if f.gpg_sig is not None:
            attributes.append(f'data-gpg-sig="{"true" if f.gpg_sig else "false"}"')
        lines.append(f"    <a {' '.join(attributes)}>{escape(f.filename)}</a><br />")
    lines += ["  </body>", "</html>", ""]
    return "\n".join(lines).encode("utf-8")


def _file_json(f: DistFile, href_for: HrefFor) -> dict[str, Any]:
    entry: dict[str, Any] = {"filename": f.filename, "url": href_for(f), "hashes": dict(f.hashes)}
    if f.requires_python:
        entry["requires-python"] = f.requires_python
    metadata: Any = f.core_metadata if isinstance(f.core_metadata, bool) else dict(f.core_metadata)
    entry["core-metadata"] = metadata
    entry["dist-info-metadata"] = metadata
    if f.gpg_sig is not None:
        entry["gpg-sig"] = f.gpg_sig
    entry["yanked"] = f.yanked
    if f.size is not None:
        entry["size"] = f.size
    if f.upload_time is not None:
        entry["upload-time"] = f.upload_time
    return entry


def project_json(page: ProjectPage, href_for: HrefFor) -> dict[str, Any]:
    meta: dict[str, Any] = {"api-version": served_api_version(page, json=True)}
    if page.last_serial is not None:
        meta["_last-serial"] = page.last_serial
    data: dict[str, Any] = {
        "meta": meta,
        "name": page.name,
        "files": [_file_json(f, href_for) for f in page.files],
        "versions": list(page_versions(page)),
    }
    if page.status is not None:
        status: dict[str, str] = {"status": page.status}
        if page.status_reason is not None:
            status["reason"] = page.status_reason
        data["project-status"] = status
    return data


def render_project_json(page: ProjectPage, href_for: HrefFor) -> bytes:
    """
    Render a PEP 691 page, with PEP 700 sizes, upload times and versions.
    """
    return json.dumps(project_json(page, href_for), separators=(",", ":")).encode("utf-8")


def _in_batches(names: Iterable[str]) -> Iterator[list[str]]:
    if isinstance(names, ProjectList):
        yield from names.batches()
        return
    batch: list[str] = []
    for name in names:
        batch.append(name)
        if len(batch) >= LIST_BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def _list_links(batch: list[str]) -> str:
    text = _plain(batch)
    if text is not None:
        # canonicalize_name on the whole batch: lower case, runs of -_. to -.
        canonical = _DASHES.sub("-", text.lower().replace("_", "-").replace(".", "-")).split("\n")
        return "".join([f'    <a href="{c}/">{n}</a>\n' for c, n in zip(canonical, batch, strict=True)])
    return "".join(f'    <a href="{quote(canonicalize_name(n))}/">{escape(n)}</a>\n' for n in batch)


_LIST_HEAD = (
    b"<!DOCTYPE html>\n<html>\n  <head>\n"
    b'    <meta name="pypi:repository-version" content="1.1">\n'
    b"    <title>Simple index</title>\n  </head>\n  <body>\n"
)


def project_list_html(projects: Iterable[str]) -> Iterator[bytes]:
    """
    The root page in HTML, a piece (a batch of names) at a time, so that a
    caller can compress it without ever holding it whole.
    """
    yield _LIST_HEAD
    for batch in _in_batches(projects):
        yield _list_links(batch).encode("utf-8")
    yield b"  </body>\n</html>\n"


def render_project_list_html(projects: Iterable[str]) -> bytes:
    return b"".join(project_list_html(projects))


def _list_entries(batch: list[str]) -> str:
    if _plain(batch) is not None:
        return '{"name":"' + '"},{"name":"'.join(batch) + '"}'
    return json.dumps([{"name": n} for n in batch], separators=(",", ":"))[1:-1]


def project_list_json(projects: Iterable[str]) -> Iterator[bytes]:
    """
    The root page in JSON, a piece (a batch of names) at a time.
    """
    yield b'{"meta":{"api-version":"1.1"},"projects":['
    for n, batch in enumerate(_in_batches(projects)):
        yield (b"," if n else b"") + _list_entries(batch).encode()
    yield b"]}"


def render_project_list_json(projects: Iterable[str]) -> bytes:
    return b"".join(project_list_json(projects))


def render_page(page: ProjectPage, content_type: str) -> bytes:
    """
    Render a page for clients of this proxy: file links point at our own
    C{/files/} route.
    """
    href: HrefFor = lambda f: local_href(canonicalize_name(page.name), f.filename)  # noqa: E731
    if content_type == JSON_V1:
        return render_project_json(page, href)
    return render_project_html(page, href)


def dump_page(page: ProjectPage) -> bytes:
    """
    Serialize a page with its upstream URLs, for the metadata store.
    """
    data = project_json(page, lambda f: f.url)
    data["meta"]["api-version"] = page.api_version
    if page.versions is None:
        del data["versions"]
    return json.dumps(data, separators=(",", ":")).encode("utf-8")


def load_page(name: str, body: bytes) -> ProjectPage:
    """
    Inverse of L{dump_page}.
    """
    return parse_project_json(name, body, "")

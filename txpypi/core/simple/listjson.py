"""
The root page (the list of all projects) in JSON: read a slice of its
projects array at a time, written a batch of names at a time.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterable, Iterator
from typing import Any

from txpypi.core.simple.model import IndexParseError
from txpypi.core.simple.pagejson import loads, meta_version
from txpypi.core.simple.projects import ProjectList, batches, pack_into, plain

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


def _project_names(body: bytes, i: int, out: io.BytesIO, slice_size: int) -> tuple[int, int]:
    """
    Parse the projects array that starts at C{i}, a slice of about
    C{slice_size} bytes at a time: each slice ends where one object ends
    and the next begins, and is parsed with C{json.loads} (a guess at that
    place that is wrong -- inside a string, or inside a nested value --
    makes the slice invalid JSON; then the slice is cut exactly instead).

    @param out: where the names are packed (see L{pack_into}).
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
        candidate = _NEXT_OBJECT.search(body, position + slice_size)
        if candidate is not None:
            try:
                items = json.loads(b"[" + body[position : candidate.start() + 1] + b"]")
                end, following, last = candidate.start() + 1, candidate.end() - 1, False
            except ValueError:
                items = None
        if items is None:
            end, last = _value_end(body, position, depth=1, cut_after=position + slice_size)
            if last:
                end -= 1  # the closing bracket
            items = loads(b"[" + body[position:end] + b"]")
            following = _skip_ws(body, end + 1)
        names = [n for item in items if type(item) is dict and type(n := item.get("name")) is str]
        count += pack_into(out, names)
        if last:
            return count, end + 1
        position = following


def parse_list_json(body: bytes, slice_size: int = LIST_SLICE) -> ProjectList:
    """
    A JSON root page: the top-level object is walked key by key; its
    C{projects} array is parsed by L{_project_names}, C{slice_size} bytes
    at a time, any other value whole.

    @raise IndexParseError: it is not a root page, or not JSON.
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
            key = loads(key_match.group())
            i = _skip_ws(body, key_match.end())
            if body[i : i + 1] != b":":
                raise IndexParseError("invalid JSON: expected ':'")
            i = _skip_ws(body, i + 1)
            if key == "projects":
                out = io.BytesIO()  # a second projects key replaces the first
                count, i = _project_names(body, i, out, slice_size)
                found = out, count
            else:
                end, _ = _value_end(body, i)
                data[key] = loads(body[i:end])
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
    return ProjectList(out.getvalue(), count, api_version=meta_version(data))


def _entries(batch: list[str]) -> str:
    if plain(batch) is not None:
        return '{"name":"' + '"},{"name":"'.join(batch) + '"}'
    return json.dumps([{"name": n} for n in batch], separators=(",", ":"))[1:-1]


def project_list_json(projects: Iterable[str]) -> Iterator[bytes]:
    """
    The root page in JSON, a piece (a batch of names) at a time.
    """
    yield b'{"meta":{"api-version":"1.1"},"projects":['
    for n, batch in enumerate(batches(projects)):
        yield (b"," if n else b"") + _entries(batch).encode()
    yield b"]}"


def render_project_list_json(projects: Iterable[str]) -> bytes:
    return b"".join(project_list_json(projects))

"""
The root page (the list of all projects) in HTML: read by regular
expressions, written a batch of names at a time.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from html import escape, unescape
from urllib.parse import quote

from packaging.utils import canonicalize_name

from txpypi.core.simple.pagehtml import declared_version
from txpypi.core.simple.projects import ProjectList, batches, pack, plain

_COMMENT = re.compile(r"<!--.*?(?:-->|\Z)", re.S)
_ANCHOR = re.compile(r"<a(?:\s[^>]*)?>(.*?)</a\s*>", re.S | re.I)
_TAG = re.compile(r"<[^>]*>")
_DASHES = re.compile(r"--+")


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


def parse_list_html(body: bytes) -> ProjectList:
    """
    An HTML root page: the text of each C{<a>} element (comments left out,
    tags inside it stripped, character references decoded).  Regular
    expressions rather than L{HTMLParser}, which takes some 13 s for PyPI's
    700,000 links; the head, before the first link, goes through it for its
    C{meta}.

    @raise IndexParseError: the head cannot be parsed.
    """
    text = body.decode("utf-8", "replace")
    if "<!--" in text:
        text = _COMMENT.sub("", text)
    first = _ANCHOR.search(text)
    version = declared_version(text if first is None else text[: first.start()])
    blob, count = pack(_anchor_texts(text))
    return ProjectList(blob, count, api_version=version)


def _links(batch: list[str]) -> str:
    text = plain(batch)
    if text is not None:
        # canonicalize_name on the whole batch: lower case, runs of -_. to -.
        canonical = _DASHES.sub("-", text.lower().replace("_", "-").replace(".", "-")).split("\n")
        return "".join([f'    <a href="{c}/">{n}</a>\n' for c, n in zip(canonical, batch, strict=True)])
    return "".join(f'    <a href="{quote(canonicalize_name(n))}/">{escape(n)}</a>\n' for n in batch)


_HEAD = (
    b"<!DOCTYPE html>\n<html>\n  <head>\n"
    b'    <meta name="pypi:repository-version" content="1.1">\n'
    b"    <title>Simple index</title>\n  </head>\n  <body>\n"
)


def project_list_html(projects: Iterable[str]) -> Iterator[bytes]:
    """
    The root page in HTML, a piece (a batch of names) at a time, so that a
    caller can compress it without ever holding it whole.
    """
    yield _HEAD
    for batch in batches(projects):
        yield _links(batch).encode("utf-8")
    yield b"  </body>\n</html>\n"


def render_project_list_html(projects: Iterable[str]) -> bytes:
    return b"".join(project_list_html(projects))

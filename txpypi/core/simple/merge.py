"""
A group's pages in C{merge} mode: the files of every member that knows the
project, in priority order, and the union of their project lists.  Pure.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import attrs
from packaging.utils import canonicalize_name

from txpypi.core.names import strongest_hash
from txpypi.core.simple.model import ProjectPage, page_versions, parse_api_version
from txpypi.core.simple.projects import ProjectList

#: PEP 792 statuses, the least restrictive first: a merged page has the
#: most restrictive of its members'.
STATUS_ORDER = ("active", "deprecated", "archived", "quarantined")


@attrs.frozen
class Conflict:
    """
    One file name that two members list with different hashes: the file of
    the higher member (C{kept}) is served, the other left out.
    """

    filename: str
    kept: int
    left_out: int


def _restrictiveness(status: str | None) -> int:
    if status is None:
        return 0
    try:
        return STATUS_ORDER.index(status)
    except ValueError:
        return len(STATUS_ORDER)  # a status we do not know: the most cautious


def merge_pages(name: str, pages: Sequence[ProjectPage]) -> tuple[ProjectPage, list[Conflict]]:
    """
    One page of the files of C{pages} (highest priority first): a file
    name listed again lower down is left out, and is a L{Conflict} when its
    strongest hash differs (or only one side has a hash to compare).

    C{versions} (PEP 700) is the union; the project status is the most
    restrictive (PEP 792); the api-version the lowest; C{tracks} and
    C{alternate-locations} (PEP 708) the union, in priority order.
    """
    files = []
    seen: dict[str, tuple[int, tuple[str, str] | None]] = {}
    conflicts: list[Conflict] = []
    for i, page in enumerate(pages):
        for f in page.files:
            digest = strongest_hash(f.hashes)
            if f.filename in seen:
                first, kept_hash = seen[f.filename]
                if kept_hash is None or digest is None or kept_hash != digest:
                    conflicts.append(Conflict(f.filename, first, i))
                continue
            seen[f.filename] = (i, digest)
            files.append(f)
    versions: dict[str, None] = {}
    for page in pages:
        versions.update(dict.fromkeys(page_versions(page)))
    strict = max(pages, key=lambda p: _restrictiveness(p.status))
    api = min(pages, key=lambda p: parse_api_version(p.api_version)).api_version
    listed_versions = tuple(versions) if any(p.versions is not None for p in pages) else None
    merged = ProjectPage(
        name,
        tuple(files),
        api_version=api,
        versions=listed_versions,
        status=strict.status,
        status_reason=strict.status_reason,
        # PEP 708: what the members said, together (merging was the
        # group's choice; the page still carries their relations).
        tracks=tuple(dict.fromkeys(url for p in pages for url in p.tracks)),
        alternate_locations=tuple(dict.fromkeys(url for p in pages for url in p.alternate_locations)),
    )
    return merged, conflicts


def merge_lists(lists: Sequence[ProjectList], keep: Callable[[int, str], bool]) -> ProjectList:
    """
    The union of project lists (each name once, by its normalized form, as
    the first list spells it), keeping the names that C{keep(i, normalized)}
    allows from list C{i}.
    """
    seen: dict[str, str] = {}
    for i, names in enumerate(lists):
        for name in names:
            key = str(canonicalize_name(name))
            if key not in seen and keep(i, key):
                seen[key] = name
    api = min((n.api_version for n in lists), key=parse_api_version, default="1.0")
    return ProjectList.of(_values(seen), api)


def _values(seen: dict[str, str]) -> Iterable[str]:
    return seen.values()

"""
A project's index page as values, and the versions it speaks of: the
api-version of the page itself, and the versions of the project it lists.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import attrs
from packaging.utils import (
    InvalidSdistFilename,
    InvalidWheelFilename,
    parse_sdist_filename,
    parse_wheel_filename,
)

#: The highest api-version whose fields we understand and pass on.
MAX_API_VERSION = (1, 4)

#: Where a file's core metadata is announced (PEP 714): the new name is read
#: first, and both are written, for clients that know only the old one.
CORE_METADATA_KEYS = ("core-metadata", "dist-info-metadata")


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
    #: Its provenance object's absolute URL (PEP 740), as the upstream listed it.
    provenance: str | None = None


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
    #: PEP 708: the projects it tracks, and its alternate locations (URLs).
    tracks: tuple[str, ...] = ()
    alternate_locations: tuple[str, ...] = ()

    def find(self, filename: str) -> DistFile | None:
        for f in self.files:
            if f.filename == filename:
                return f
        return None


def parse_api_version(value: Any) -> tuple[int, int]:
    """
    An api-version (C{"1.1"}) as a pair of numbers.

    @raise IndexParseError: it is not one.
    """
    try:
        major, _, minor = str(value).partition(".")
        return int(major), int(minor or 0)
    except ValueError as e:
        raise IndexParseError(f"bad api-version {value!r}") from e


def served_api_version(page: ProjectPage, json: bool) -> str:
    """
    The api-version we can honestly claim for a page we render: what the
    upstream declared, capped at what we understand.  JSON claims at least
    1.1 (PEP 700) when every file has its size, and 1.0 when some do not,
    because 1.1 makes C{size} mandatory.
    """
    version = min(parse_api_version(page.api_version), MAX_API_VERSION)
    if json:
        if all(f.size is not None for f in page.files):
            version = max(version, (1, 1))
        else:
            version = (1, 0)
    return f"{version[0]}.{version[1]}"


#: Source archives pip takes besides the C{.tar.gz} and C{.zip} that
#: packaging's sdist names cover (longest first).
OTHER_ARCHIVES = (".tar.bz2", ".tar.lzma", ".tar.xz", ".tar.lz", ".tbz", ".tgz", ".tlz", ".txz", ".tar")


#: The file names whose versions L{file_version} keeps worked out (every
#: hit counts its version in the download statistics).
FILE_VERSIONS_KEPT = 4096


@functools.lru_cache(maxsize=FILE_VERSIONS_KEPT)
def file_version(filename: str) -> str | None:
    """
    The version encoded in a wheel or sdist file name, if it parses.
    """
    try:
        lowered = filename.lower()
        if lowered.endswith(".whl"):
            return str(parse_wheel_filename(filename)[1])
        for suffix in (".tar.gz", ".zip", *OTHER_ARCHIVES):
            if lowered.endswith(suffix):  # any case, any archive: read as packaging's
                filename = filename[: -len(suffix)] + (suffix if suffix == ".zip" else ".tar.gz")
                break
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

"""
One project's page in JSON (PEP 691, with PEP 700 sizes, upload times and
versions): read from an upstream, and written for clients.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urljoin

from txpypi.core.simple.links import HrefFor, SkipLink, ignore, resolve
from txpypi.core.simple.model import (
    CORE_METADATA_KEYS,
    DistFile,
    IndexParseError,
    ProjectPage,
    page_versions,
    parse_api_version,
    served_api_version,
)


def loads(data: bytes) -> Any:
    """
    C{json.loads}, failing as the parsers of pages do.

    @raise IndexParseError: it is not JSON (or not UTF-8).
    """
    try:
        return json.loads(data)
    except ValueError as e:  # UnicodeDecodeError included
        raise IndexParseError(f"invalid JSON: {e}") from e


def dump(data: Any) -> bytes:
    """
    JSON as we write it: compact, UTF-8.
    """
    return json.dumps(data, separators=(",", ":")).encode("utf-8")


def meta_version(data: Mapping[str, Any]) -> str:
    """
    The api-version a page's C{meta} declares, C{1.0} when it has none.

    @raise IndexParseError: it makes no sense.
    """
    meta = data.get("meta", {})
    version = meta.get("api-version", "1.0") if isinstance(meta, dict) else "1.0"
    parse_api_version(version)
    return str(version)


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
        url, hashes = resolve(base_url, href)
    except ValueError as e:
        skip(href, str(e))
        return None
    hashes.update(_as_hashes(entry.get("hashes", {}), "hashes"))
    metadata: Any = entry.get(CORE_METADATA_KEYS[0], entry.get(CORE_METADATA_KEYS[1], False))
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
    provenance = entry.get("provenance")
    if isinstance(provenance, str) and provenance:
        try:
            provenance = urljoin(base_url, provenance)
        except ValueError:
            provenance = None
    else:
        provenance = None
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
        provenance=provenance,
    )


def parse_project_json(name: str, body: bytes, base_url: str, skip: SkipLink = ignore) -> ProjectPage:
    """
    Parse a PEP 691 project page.  A file whose URL cannot be resolved is
    left out, and C{skip} told.
    """
    data = loads(body)
    if not isinstance(data, dict):
        raise IndexParseError("JSON page is not an object")
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
    tracks, alternates = _urls(data.get("tracks")), _urls(data.get("alternate-locations"))
    parsed = (_json_file(entry, base_url, skip) for entry in files)
    return ProjectPage(
        name=str(data.get("name") or name),
        files=tuple(f for f in parsed if f is not None),
        api_version=meta_version(data),
        versions=None if versions is None else tuple(versions),
        status=status_name,
        status_reason=status_reason,
        last_serial=serial if isinstance(serial, int) and not isinstance(serial, bool) else None,
        tracks=tracks,
        alternate_locations=alternates,
    )


def _urls(value: Any) -> tuple[str, ...]:
    """
    A PEP 708 list of URLs (anything else: none).
    """
    if not isinstance(value, list):
        return ()
    return tuple(v for v in value if isinstance(v, str) and v)


#: Where a file's provenance is served (PEP 740), or L{None} for none.
ProvenanceFor = Callable[[DistFile], str | None]


def _file_json(f: DistFile, href_for: HrefFor, provenance_for: ProvenanceFor) -> dict[str, Any]:
    entry: dict[str, Any] = {"filename": f.filename, "url": href_for(f), "hashes": dict(f.hashes)}
    if f.requires_python:
        entry["requires-python"] = f.requires_python
    if f.core_metadata is not False:  # absent, as the upstream had it: not "false"
        metadata: Any = True if f.core_metadata is True else dict(f.core_metadata)
        for key in CORE_METADATA_KEYS:
            entry[key] = metadata
    if f.gpg_sig is not None:
        entry["gpg-sig"] = f.gpg_sig
    entry["yanked"] = f.yanked
    if f.size is not None:
        entry["size"] = f.size
    if f.upload_time is not None:
        entry["upload-time"] = f.upload_time
    provenance = provenance_for(f)
    if provenance is not None:
        entry["provenance"] = provenance
    return entry


def no_provenance(f: DistFile) -> str | None:
    return None


def project_json(
    page: ProjectPage, href_for: HrefFor, provenance_for: ProvenanceFor = no_provenance
) -> dict[str, Any]:
    """
    A PEP 691 page as the object L{render_project_json} writes.
    """
    meta: dict[str, Any] = {"api-version": served_api_version(page, json=True)}
    if page.last_serial is not None:
        meta["_last-serial"] = page.last_serial
    data: dict[str, Any] = {
        "meta": meta,
        "name": page.name,
        "files": [_file_json(f, href_for, provenance_for) for f in page.files],
        "versions": list(page_versions(page)),
    }
    if page.tracks:
        data["tracks"] = list(page.tracks)
    if page.alternate_locations:
        data["alternate-locations"] = list(page.alternate_locations)
    if page.status is not None:
        status: dict[str, str] = {"status": page.status}
        if page.status_reason is not None:
            status["reason"] = page.status_reason
        data["project-status"] = status
    return data


def render_project_json(
    page: ProjectPage, href_for: HrefFor, provenance_for: ProvenanceFor = no_provenance
) -> bytes:
    """
    Render a PEP 691 page, with PEP 700 sizes, upload times and versions,
    PEP 708 tracks and alternate locations, PEP 740 provenance links.
    """
    return dump(project_json(page, href_for, provenance_for))

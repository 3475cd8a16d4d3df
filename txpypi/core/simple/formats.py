"""
Which format a page is read or written in: the upstream's C{Content-Type}
picks the parser, the type a client negotiated picks the renderer, and a
page is stored as JSON with its upstream URLs.
"""

from __future__ import annotations

from packaging.utils import canonicalize_name

from txpypi.core.simple.links import HrefFor, SkipLink, ignore, local_href
from txpypi.core.simple.listhtml import parse_list_html
from txpypi.core.simple.listjson import parse_list_json
from txpypi.core.simple.media import JSON_V1
from txpypi.core.simple.model import DistFile, ProjectPage
from txpypi.core.simple.pagehtml import parse_project_html, render_project_html
from txpypi.core.simple.pagejson import dump, parse_project_json, project_json, render_project_json
from txpypi.core.simple.projects import ProjectList

#: A file's provenance object (PEP 740) is served at its file's link plus this.
PROVENANCE_SUFFIX = ".provenance"


def _is_json(content_type: str) -> bool:
    return "json" in content_type.lower()


def parse_project(
    name: str, body: bytes, content_type: str, base_url: str, skip: SkipLink = ignore
) -> ProjectPage:
    """
    Parse a project page in whichever format the upstream answered with;
    C{skip} is told of each link left out because it cannot be resolved.
    """
    if _is_json(content_type):
        return parse_project_json(name, body, base_url, skip)
    return parse_project_html(name, body, base_url, skip)


def parse_project_list(body: bytes, content_type: str) -> ProjectList:
    """
    Parse the root C{/simple/} page in either format, into a compact
    L{ProjectList}.  Neither parser builds one Python object per project
    for the whole list: JSON is parsed a slice of the projects array at a
    time, HTML by regular expressions.
    """
    if _is_json(content_type):
        return parse_list_json(body)
    return parse_list_html(body)


def render_page(page: ProjectPage, content_type: str) -> bytes:
    """
    Render a page for clients of this proxy: file links point at our own
    C{/files/} route.
    """
    project = canonicalize_name(page.name)
    href: HrefFor = lambda f: local_href(project, f.filename)  # noqa: E731

    def provenance(f: DistFile) -> str | None:
        return None if f.provenance is None else local_href(project, f.filename + PROVENANCE_SUFFIX)

    if content_type == JSON_V1:
        return render_project_json(page, href, provenance)
    return render_project_html(page, href, provenance)


def dump_page(page: ProjectPage) -> bytes:
    """
    Serialize a page with its upstream URLs, for the metadata store.
    """
    data = project_json(page, lambda f: f.url, lambda f: f.provenance)
    data["meta"]["api-version"] = page.api_version
    if page.versions is None:
        del data["versions"]
    return dump(data)


def load_page(name: str, body: bytes) -> ProjectPage:
    """
    Inverse of L{dump_page}.
    """
    return parse_project_json(name, body, "")

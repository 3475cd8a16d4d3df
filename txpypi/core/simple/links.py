"""
Links in a page: the upstream's, made absolute with the hash their fragment
names, and ours, which point clients at the proxy's C{/files/} route.
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import quote, urldefrag, urljoin

from txpypi.core.simple.model import DistFile

#: Told of each link left out of a page because its URL cannot be resolved
#: (C{urljoin} refuses it, for instance C{http://[::1}): the href and why.
SkipLink = Callable[[str, str], None]

#: The link a renderer writes for a file.
HrefFor = Callable[[DistFile], str]


def ignore(href: str, reason: str) -> None:
    """
    The L{SkipLink} that is told nothing.
    """


def resolve(base_url: str, href: str) -> tuple[str, dict[str, str]]:
    """
    C{href} made absolute against C{base_url}, without its fragment, and the
    hash the fragment named.

    @raise ValueError: C{urljoin} cannot make sense of it.
    """
    base, fragment = urldefrag(urljoin(base_url, href))
    hashes: dict[str, str] = {}
    if fragment:
        name, sep, value = fragment.partition("=")
        if sep and name and value:
            hashes[name.lower()] = value
    return base, hashes


def local_href(project: str, filename: str) -> str:
    """
    The link we serve for a file, relative to C{/simple/<project>/}, so that
    it resolves to C{/files/<project>/<filename>} under whatever host and
    prefix the client used.
    """
    return f"../../files/{quote(project)}/{quote(filename)}"

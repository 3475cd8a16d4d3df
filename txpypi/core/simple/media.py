"""
The media types of the Simple API, and which one a client gets (PEP 691
content negotiation).
"""

from __future__ import annotations

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

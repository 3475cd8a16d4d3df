"""
Pure parsing of the request headers we honour: C{Accept-Encoding},
C{If-None-Match} and C{Range}.
"""

from __future__ import annotations


class Unsatisfiable(ValueError):
    """
    A well-formed byte range that selects nothing of the file (416).
    """


def accepts_gzip(accept_encoding: str | None) -> bool:
    """
    Does an C{Accept-Encoding} header accept gzip (with a q above zero)?
    gzip's own entry (or x-gzip's) decides where there is one, wherever it
    is in the list; otherwise C{*}'s (RFC 9110, 12.5.3).  A malformed q is
    zero.
    """
    if not accept_encoding:
        return False
    named: list[float] = []
    star: list[float] = []
    for part in accept_encoding.split(","):
        name, *params = (p.strip() for p in part.split(";"))
        name = name.lower()
        if name not in ("gzip", "x-gzip", "*"):
            continue
        q = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        (star if name == "*" else named).append(q)
    wanted = named or star
    return bool(wanted) and max(wanted) > 0


def etag_matches(if_none_match: str | None, etag: str) -> bool:
    """
    Does an C{If-None-Match} header name C{etag} (weak comparison, as RFC
    9110 says for If-None-Match), or C{*}?
    """
    if not if_none_match:
        return False
    wanted = etag.removeprefix("W/")
    for tag in if_none_match.split(","):
        tag = tag.strip()
        if tag == "*" or tag.removeprefix("W/") == wanted:
            return True
    return False


def _digits(text: str) -> bool:
    """
    Empty, or ASCII digits only: C{str.isdigit} also accepts other scripts'
    digits and superscripts (C{"²"}), which C{int} then refuses or reads
    as another number.
    """
    return all("0" <= c <= "9" for c in text)


#: Byte positions past this are past any file: longer digit strings are
#: read as it (C{int} refuses strings of over 4,300 digits, and a client
#: may send one).
_BEYOND = 10**18


def _position(digits: str) -> int:
    digits = digits.lstrip("0") or "0"
    return _BEYOND if len(digits) > 18 else int(digits)


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """
    Parse a C{Range} header for a file of C{size} bytes.

    @return: C{(start, end)} with C{end} exclusive, or L{None} to send the
        whole file (no header, a malformed one, another unit, or several
        ranges, which we are free to ignore).
    @raise Unsatisfiable: for a single, well-formed range outside the file.
    """
    if not header:
        return None
    unit, sep, spec = header.partition("=")
    if not sep or unit.strip().lower() != "bytes" or "," in spec:
        return None
    first, dash, last = spec.strip().partition("-")
    if not dash:
        return None
    first, last = first.strip(), last.strip()
    if not _digits(first) or not _digits(last) or first == last == "":
        return None
    if first == "":
        suffix = _position(last)
        if suffix == 0 or size == 0:
            raise Unsatisfiable(header)
        return max(0, size - suffix), size
    start = _position(first)
    end = size if last == "" else min(size, _position(last) + 1)
    if last != "" and _position(last) < start:
        return None  # malformed: ignored, as RFC 9110 allows
    if start >= size:
        raise Unsatisfiable(header)
    return start, end

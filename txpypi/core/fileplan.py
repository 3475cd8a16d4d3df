"""
The HTTP rules of a file answer, as a pure decision: given the request's
conditional and range headers and what is known of the file, which status
to answer, which bytes to send and which length headers to set.

Pure: no I/O, no Twisted.  The web layer acts on the plan; nothing here can
leak a reader, because nothing here holds one.
"""

from __future__ import annotations

import attrs

from txpypi.core.httpheaders import Unsatisfiable, etag_matches, parse_range


@attrs.frozen
class FilePlan:
    """
    What to answer for one file request.

    @ivar status: C{200}, C{206}, C{304} or C{416}.
    @ivar start: the first byte to send.
    @ivar end: the (exclusive) end of the bytes to send, or L{None} for the
        end of a file of unknown size.
    @ivar body: whether bytes are sent at all (not for HEAD, 304 or 416).
    @ivar headers: the length and range headers of the answer.
    @ivar redirect: whether a store that honours C{Range} itself, but knows
        nothing of our ETags, may answer in our place (a presigned URL): not
        for a HEAD (a URL signed for GET refuses it), a C{304} (answered
        here), or an C{If-Range} naming another version (only we can tell).
    """

    status: int
    start: int = 0
    end: int | None = None
    body: bool = True
    headers: tuple[tuple[bytes, bytes], ...] = ()
    redirect: bool = False

    @property
    def error(self) -> bool:
        return self.status >= 400


def range_applies(if_range: str | None, etag: str | None) -> bool:
    """
    A C{Range} counts unless an C{If-Range} names another version (only a
    strong ETag can match: we send no dates for files).
    """
    return if_range is None or (etag is not None and if_range.strip() == etag)


def plan_file(
    *,
    head: bool,
    size: int | None,
    etag: str | None,
    if_none_match: str | None = None,
    range_header: str | None = None,
    if_range: str | None = None,
) -> FilePlan:
    """
    Decide the answer for a file of C{size} bytes (L{None}: not known yet)
    whose strong validator is C{etag} (L{None}: not known yet).
    """
    if etag is not None and etag_matches(if_none_match, etag):
        return FilePlan(304, body=False)
    # Whether a Range counts; a store honours it only then as we would.
    ranged = not head and range_applies(if_range, etag)
    headers: list[tuple[bytes, bytes]] = []
    if size is not None:
        headers.append((b"accept-ranges", b"bytes"))
    start, end, status = 0, size, 200
    if size is not None and ranged:
        try:
            wanted = parse_range(range_header, size)
        except Unsatisfiable:
            unsatisfiable = ((b"content-range", b"bytes */%d" % size),)
            return FilePlan(416, body=False, headers=unsatisfiable, redirect=ranged)
        if wanted is not None:
            start, end = wanted
            status = 206
            headers.append((b"content-range", b"bytes %d-%d/%d" % (start, end - 1, size)))
    if end is not None:
        headers.append((b"content-length", b"%d" % (end - start)))
    return FilePlan(status, start, end, body=not head, headers=tuple(headers), redirect=ranged)

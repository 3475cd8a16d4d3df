"""
The quick lane: a warm project page, or a small cached file on the disk,
answered straight from the connection, without a twisted.web request.

Twisted's request machinery (a L{twisted.web.server.Request} per request,
its headers, its render and finish, a generic header writer) is most of a
warm page's cost.  When a connection between requests receives exactly one
whole, plain request -- C{GET} or C{HEAD} of C{/simple/<project>/},
C{/files/<project>/<filename>} or the same under C{/<group>/}, HTTP/1.1, no
body, no header that changes how it is read, nothing after it -- and the
page is fresh in memory (or the file is a hit that needs nothing but
memory and the disk to be sure of), the answer is written at once: a
status line, header lines built once, and the body.  Anything else (and any doubt)
goes the usual way, untouched, so that the answers are the same bytes but
for the cost; the access log line and the metrics are the same too.
"""

from __future__ import annotations

import os
import re
import socket
import time
from typing import Any, NamedTuple

from twisted.internet import tcp
from twisted.web.http import datetimeToString
from twisted.web.server import version as server_version

#: The longest request the quick lane reads, in bytes (a longer one goes
#: the usual way).
MAX_QUICK_REQUEST = 8 * 1024

#: The most header lines of a quick request (Twisted's C{maxHeaders}: past
#: it, the usual way refuses the request).
MAX_QUICK_HEADERS = 500

#: The header lines of a quick request, each a name (an HTTP token) and a
#: value without CR, LF or NUL: any other goes the usual way.
_HEADER_LINES = re.compile(rb"(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[^\r\n\x00]*\r\n)*")

#: The headers that may come with a quick request; any other goes the usual
#: way, unless it is one that changes nothing about a page's answer.
_USED = frozenset({b"host", b"accept", b"accept-encoding", b"if-none-match", b"user-agent", b"referer"})
_FORWARDED = b"x-forwarded-for"
#: C{Connection} may come if it says what HTTP/1.1 means anyway.
_CONNECTION = b"connection"
_KEEP_ALIVE = b"keep-alive"
#: Headers that change how a request is read or answered: never quick.
_SLOW = frozenset(
    {
        b"content-length",
        b"transfer-encoding",
        b"expect",
        b"upgrade",
        b"te",
        b"range",
        b"if-range",
        b"if-match",
        b"if-modified-since",
        b"if-unmodified-since",
        b"authorization",
        b"x-forwarded-proto",
        b"x-forwarded-host",
        b"forwarded",
    }
)

#: The paths of the quick lane: a project page and a file, under a group
#: or not, each segment of the bytes a name may hold as the usual way would
#: take it without decoding anything (a file name with local versions and
#: epochs too).
_PAGE_PATH = re.compile(rb"(?:/([A-Za-z0-9._-]+))?/simple/([A-Za-z0-9._-]+)/")
_FILE_PATH = re.compile(rb"(?:/([A-Za-z0-9._-]+))?/files/([A-Za-z0-9._-]+)/([A-Za-z0-9._+!-]+)")
_KINDS = (b"simple", b"files")


class QuickRequest(NamedTuple):
    """
    A request the quick lane may answer: its method, what it asks for
    (C{b"simple"} or C{b"files"}), the group's path (C{b""} for the
    default's), the project and the file name (C{b""} for a page), and the
    headers it reads.  A tuple: one is made for every quick request.
    """

    method: bytes
    uri: bytes
    kind: bytes
    group: bytes
    project: bytes
    filename: bytes
    headers: dict[bytes, bytes]

    def header(self, name: bytes) -> bytes | None:
        return self.headers.get(name)


def parse(data: bytes) -> QuickRequest | None:
    """
    The request in C{data} if it is exactly one quick one, else L{None}.
    """
    if len(data) > MAX_QUICK_REQUEST or not data.endswith(b"\r\n\r\n") or b"\x00" in data:
        return None
    first = data.find(b"\r\n")
    parts = data[:first].split(b" ")
    if len(parts) != 3 or parts[2] != b"HTTP/1.1" or parts[0] not in (b"GET", b"HEAD"):
        return None
    method, uri = parts[0], parts[1]
    route = _route(uri)
    if route is None:
        return None
    # Each header line, the last one's CRLF included; a request with
    # another empty line in it is pipelined (the usual way keeps the order)
    # and fails this as a malformed line does.
    lines = data[first + 2 : -2]
    if lines.count(b"\r\n") > MAX_QUICK_HEADERS or _HEADER_LINES.fullmatch(lines) is None:
        return None  # what Twisted refuses with a 400: the usual way says so
    headers: dict[bytes, bytes] = {}
    for line in lines[:-2].split(b"\r\n") if lines else ():
        name, _, value = line.partition(b":")
        name = name.lower()
        if name in _SLOW:
            return None
        if name in _USED or name == _FORWARDED:
            if name in headers:
                return None  # said twice: the usual way decides
            headers[name] = value.strip(b" \t")
        elif name == _CONNECTION and value.strip(b" \t").lower() != _KEEP_ALIVE:
            return None
    return QuickRequest(method, uri, *route, headers)


#: How many requests' parses a L{Parses} keeps.
MAX_PARSES = 256


class Parses:
    """
    L{parse}, remembering the quick requests seen lately by their bytes:
    the clients of a proxy send the same requests again and again (one
    tool, one project page), and parsing is a quarter of a warm page's
    Python.  A pure function's memo, so there is nothing to invalidate;
    what it returns is shared, and never changed.

    Bound: L{MAX_PARSES} requests of at most L{MAX_QUICK_REQUEST} bytes
    (2 MiB, and the parses' copies of their parts, at the very worst), all
    forgotten at once when full.
    """

    def __init__(self, limit: int = MAX_PARSES) -> None:
        self._limit = limit
        self._known: dict[bytes, QuickRequest] = {}

    def __len__(self) -> int:
        return len(self._known)

    def __call__(self, data: bytes) -> QuickRequest | None:
        asked = self._known.get(data)
        if asked is not None:
            return asked
        asked = parse(data)
        if asked is not None:
            if len(self._known) >= self._limit:
                self._known.clear()
            self._known[data] = asked
        return asked


def _route(uri: bytes) -> tuple[bytes, bytes, bytes, bytes] | None:
    """
    What C{/simple/<p>/}, C{/files/<p>/<f>} (or either under C{/<group>/})
    asks for: its kind, group (C{b""}: the default one), project and file
    name; L{None} for any other path.
    """
    page = _PAGE_PATH.fullmatch(uri)
    if page is not None:
        group, project = page.groups()
        kind, filename = b"simple", b""
    else:
        found = _FILE_PATH.fullmatch(uri)
        if found is None:
            return None
        group, project, filename = found.groups()
        kind = b"files"
    if group is None:
        return kind, b"", project, filename
    if group in _KINDS:
        return None  # /simple/simple/x/: no group of that name
    return kind, group, project, filename


class FileBody(NamedTuple):
    """
    A quick answer's body left in its file on the local disk: the C{size}
    bytes of C{reader} (an L{txpypi.storage.stores.ILocalFile}), which
    L{send_now} sends by C{sendfile} (no copy of it in the proxy's memory)
    and closes, whatever happens.
    """

    reader: Any
    size: int


def send_now(transport: Any, head: bytes, body: bytes | FileBody = b"") -> None:
    """
    Write an answer's C{head} and C{body} to a client: straight into a
    plain TCP socket when its transport holds nothing yet (Twisted's
    transport would keep every write until the socket says it is writable,
    one readiness registration per answer: a sixth of a warm page's time),
    in one call without joining them, or for a L{FileBody} the head then
    the file by C{sendfile}; the rest, if the socket took only part,
    through the transport as usual; any other transport (TLS) as usual.
    """
    if isinstance(body, FileBody):
        try:
            _send_file_now(transport, head, body)
        finally:
            body.reader.close()
        return
    if _writable_now(transport):
        try:
            sent = transport.socket.sendmsg((head, body)) if body else transport.socket.send(head)
        except BlockingIOError:
            sent = 0
        except OSError:
            sent = 0  # the transport finds out and closes as usual
        if sent == len(head) + len(body):
            return
        if sent < len(head):
            head = head[sent:]
        else:
            head, body = b"", body[sent - len(head) :]
    if head:
        transport.write(head)
    if body:
        transport.write(body)


def _writable_now(transport: Any) -> bool:
    """
    Whether C{transport} is a plain TCP connection, open, that holds
    nothing to write yet: its socket may be written straight away.
    """
    return bool(
        isinstance(transport, tcp.Connection)
        and not getattr(transport, "TLS", False)
        and transport.connected
        and not transport.disconnecting
        and not transport.dataBuffer
        and not transport._tempDataBuffer
    )


def _send_file_now(transport: Any, head: bytes, body: FileBody) -> None:
    fd, size = body.reader.fd, body.size
    offset = 0
    if _writable_now(transport) and size:
        sock = transport.socket
        try:
            # MSG_MORE: the head goes out with the file's first bytes.
            sent = sock.send(head, socket.MSG_MORE)
            head = head[sent:]
            while not head and offset < size:
                step = os.sendfile(sock.fileno(), fd, offset, size - offset)
                if not step:
                    break  # shorter than it was: read below, and cut off
                offset += step
        except BlockingIOError:
            pass  # the socket is full: the transport sends the rest
        except OSError:
            return  # the client is gone: the transport finds out and closes
    if head:
        transport.write(head)
    if offset < size:
        rest = os.pread(fd, size - offset, offset)
        transport.write(rest)
        if len(rest) != size - offset:
            # The file shrank under us: never a short answer that looks whole.
            transport.abortConnection()


#: How Twisted writes the names of the headers quick answers carry.
_CANONICAL = {
    b"content-type": b"Content-Type",
    b"vary": b"Vary",
    b"x-cache": b"X-Cache",
    b"cache-control": b"Cache-Control",
    b"etag": b"ETag",
    b"x-pypi-last-serial": b"X-Pypi-Last-Serial",
    b"accept-ranges": b"Accept-Ranges",
    b"content-encoding": b"Content-Encoding",
    b"content-length": b"Content-Length",
}


def header_lines(headers: list[tuple[bytes, bytes]]) -> bytes:
    """
    Header lines as Twisted writes them, for headers named in lower case.
    """
    return b"".join(_CANONICAL[name] + b": " + value + b"\r\n" for name, value in headers)


#: The status lines the quick lane sends.
OK = b"HTTP/1.1 200 OK\r\n"
NOT_MODIFIED = b"HTTP/1.1 304 Not Modified\r\n"


class Dates:
    """
    The C{Server} and C{Date} header lines, made once a second.
    """

    def __init__(self) -> None:
        self._second = -1
        self._lines = b""

    def __call__(self, now: float | None = None) -> bytes:
        now = time.time() if now is None else now
        second = int(now)
        if second != self._second:
            self._second = second
            date = datetimeToString(second)
            self._lines = b"Server: " + server_version + b"\r\nDate: " + date + b"\r\n"
        return self._lines

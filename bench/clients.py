"""
The bench's HTTP clients, on L{http.client} with a fresh connection per
request: L{fetch} (the whole body, timed), L{stream} (big bodies read into
one buffer and thrown away, optionally hashed), L{head} and L{delete}.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urljoin, urlsplit

READ_CHUNK = 1024 * 1024  # what the streaming clients read at a time
REDIRECTS = (301, 302, 303, 307, 308)


@contextmanager
def _answer(
    url: str, accept: str | None, max_redirects: int, timeout: float
) -> Iterator[tuple[http.client.HTTPResponse, int]]:
    """
    GET C{url} on a fresh connection, following up to C{max_redirects}
    redirects (each on a fresh connection too): the final response, its
    body unread, and how many redirects led there.
    """
    redirects = 0
    while True:
        parts = urlsplit(url)
        conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=timeout)
        try:
            headers = {"Accept-Encoding": "identity", "User-Agent": "txpypi-bench"}
            if accept:
                headers["Accept"] = accept
            conn.request("GET", parts.path + (f"?{parts.query}" if parts.query else ""), headers=headers)
            response = conn.getresponse()
            if response.status in REDIRECTS and redirects < max_redirects:
                response.read()
                redirects += 1
                url = urljoin(url, response.getheader("location") or "")
                continue
            yield response, redirects
            return
        finally:
            conn.close()


def _headers(response: http.client.HTTPResponse) -> dict[str, str]:
    return {k.lower(): v for k, v in response.getheaders()}


@dataclass
class Fetched:
    status: int
    headers: dict[str, str]
    body: bytes
    ttfb: float  # seconds to the first body byte
    total: float
    redirects: int


def fetch(url: str, accept: str | None = None, max_redirects: int = 5, timeout: float = 120.0) -> Fetched:
    """
    GET C{url} on a fresh connection, following redirects, timing the first
    body byte of the final response from the moment we started connecting.
    """
    start = time.perf_counter()
    with _answer(url, accept, max_redirects, timeout) as (response, redirects):
        first = response.read(1)
        ttfb = time.perf_counter() - start
        body = first + response.read()
        total = time.perf_counter() - start
        return Fetched(response.status, _headers(response), body, ttfb, total, redirects)


def get_json(url: str) -> Any:
    return json.loads(fetch(url).body)


def expect_200(url: str, accept: str | None = None) -> Fetched:
    """
    GET C{url} without following redirects; it must answer 200 directly.
    """
    got = fetch(url, accept, max_redirects=0)
    if got.status != 200:
        raise RuntimeError(f"{url} answered {got.status}, not 200: {got.body[:200]!r}")
    return got


@dataclass
class Streamed:
    status: int
    headers: dict[str, str]
    size: int  # body bytes received
    ttfb: float  # seconds to the first body byte, from the moment we started connecting
    total: float
    redirects: int
    sha256: str | None  # of the body, when asked for


def stream(
    url: str,
    digest: bool = False,
    max_redirects: int = 5,
    timeout: float = 120.0,
    on_first_byte: Callable[[], object] | None = None,
) -> Streamed:
    """
    GET C{url} like L{fetch}, but read the body in L{READ_CHUNK} reads into
    one buffer and throw it away (hashing it on the way when C{digest}):
    memory stays flat whatever the file size.  C{on_first_byte} is called
    as soon as the first body byte is in.
    """
    start = time.perf_counter()
    buffer = memoryview(bytearray(READ_CHUNK))
    with _answer(url, None, max_redirects, timeout) as (response, redirects):
        hasher = hashlib.sha256() if digest else None
        first = response.read(1)
        ttfb = time.perf_counter() - start
        if on_first_byte is not None:
            on_first_byte()
        size = len(first)
        if hasher is not None:
            hasher.update(first)
        while n := response.readinto(buffer):
            size += n
            if hasher is not None:
                hasher.update(buffer[:n])
        return Streamed(
            response.status,
            _headers(response),
            size,
            ttfb,
            time.perf_counter() - start,
            redirects,
            None if hasher is None else hasher.hexdigest(),
        )


def _bodiless(method: str, url: str, headers: dict[str, str]) -> tuple[int, dict[str, str]]:
    """
    C{method url} on a fresh connection: the status and the headers (the body is read and dropped).
    """
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=30)
    try:
        conn.request(method, parts.path, headers=headers)
        response = conn.getresponse()
        response.read()
        return response.status, _headers(response)
    finally:
        conn.close()


def head(url: str) -> dict[str, str]:
    """
    C{HEAD url}: the headers, and the status as C{":status"}.
    """
    status, headers = _bodiless("HEAD", url, {})
    return headers | {":status": str(status)}


def delete(url: str, token: str) -> int:
    """
    C{DELETE url} with an admin bearer token; the status.
    """
    return _bodiless("DELETE", url, {"Authorization": f"Bearer {token}"})[0]

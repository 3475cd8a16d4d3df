"""
Fetching an index page: a conditional GET, asking for JSON first and gzip,
sent under the response timeout; the answer classified; the body collected
by L{txpypi.fetch.pagebody.PageBody}.
"""

from __future__ import annotations

import attrs
from twisted.internet.interfaces import IReactorTime
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IResponse

from txpypi.core.simple.media import UPSTREAM_ACCEPT
from txpypi.fetch.exchange import (
    USER_AGENT,
    Credentials,
    Discard,
    Health,
    Timeouts,
    UpstreamError,
    UpstreamNotFound,
    answered_within,
    outcome_of,
    page_credentials,
)
from txpypi.fetch.pagebody import GZIP, PLAIN, PageBody, content_coding, page_error


@attrs.frozen
class FetchedPage:
    url: str
    body: bytes
    content_type: str
    etag: str | None
    last_modified: str | None
    #: The upstream answered 304 to our validators: there is no body.
    not_modified: bool = False
    #: Its C{X-PyPI-Last-Serial} header, when it sent a number.
    last_serial: int | None = None


def page_request_headers(etag: str | None, last_modified: str | None) -> Headers:
    """
    The headers of a page GET: JSON first, gzip, and the validators of the
    copy we hold (a conditional GET).
    """
    headers = Headers(
        {
            b"Accept": [UPSTREAM_ACCEPT.encode()],
            b"Accept-Encoding": [b"gzip"],
            b"User-Agent": [USER_AGENT],
        }
    )
    if etag is not None:
        headers.setRawHeaders(b"If-None-Match", [etag.encode("latin-1")])
    if last_modified is not None:
        headers.setRawHeaders(b"If-Modified-Since", [last_modified.encode("latin-1")])
    return headers


def fetched(response: IResponse, body: bytes) -> FetchedPage:
    """
    The page a 200 answered, at the URL it came from (after redirects).
    """
    h = response.headers
    return FetchedPage(
        url=str(response.request.absoluteURI.decode()),
        body=body,
        content_type=(h.getRawHeaders("content-type") or ["text/html"])[0],
        etag=(h.getRawHeaders("etag") or [None])[0],
        last_modified=(h.getRawHeaders("last-modified") or [None])[0],
        last_serial=_serial((h.getRawHeaders("x-pypi-last-serial") or [""])[0]),
    )


def _serial(value: str) -> int | None:
    value = value.strip()
    return int(value) if value.isdigit() and len(value) < 20 else None


@attrs.define
class PageFetcher:
    """
    GETs index pages through one agent (which follows redirects, and drops
    C{Authorization} on a redirect to another origin).
    """

    _clock: IReactorTime
    _agent: IAgent
    _timeouts: Timeouts
    _health: Health
    #: The credentials of the upstreams that have some, by upstream URL.
    _credentials: dict[str, Credentials] = attrs.Factory(dict)

    async def fetch(self, url: str, etag: str | None, last_modified: str | None, limit: int) -> FetchedPage:
        """
        GET the page at C{url}; see L{txpypi.fetch.upstream.UpstreamClient.fetch_page}.

        @param limit: the most bytes the body may have, decompressed.
        """
        started = self._health.now()
        headers = page_request_headers(etag, last_modified)
        credentials = page_credentials(self._credentials, url)
        if credentials is not None:
            credentials.add_to(headers, credentials.origin)
        try:
            response, body = await self._exchange(url, headers, limit)
        except UpstreamError as e:
            self._health.record("page", "error", started, e.reason)
            raise
        except Exception as e:
            error = page_error(e, url)
            self._health.record("page", outcome_of(error), started, error.reason)
            raise error from e
        return self._answer(url, response, body, etag, last_modified, started)

    async def _exchange(self, url: str, headers: Headers, limit: int) -> tuple[IResponse, bytes]:
        """
        Send the GET under the response timeout, then read a 200's body
        (any other answer's is thrown away).
        """
        d = self._agent.request(b"GET", url.encode(), headers)
        response: IResponse = await answered_within(self._clock, self._timeouts.response, d)
        if response.code != 200:
            response.deliverBody(Discard())
            return response, b""
        return response, await self._body(url, response, limit)

    async def _body(self, url: str, response: IResponse, limit: int) -> bytes:
        """
        Collect a 200's body, inflated when gzip, under the read timeout
        and the minimum rate.

        @raise UpstreamError: when it comes in an unknown encoding.
        """
        coding = content_coding(response.headers)
        if coding not in PLAIN | GZIP:
            response.deliverBody(Discard())
            name = coding.decode("latin-1")
            raise UpstreamError(502, f"upstream sent {url} in an unknown encoding: {name}")
        collector = PageBody(
            self._clock,
            self._timeouts.read,
            gzipped=coding in GZIP,
            limit=limit,
            min_rate=self._timeouts.min_rate,
        )
        response.deliverBody(collector)
        body: bytes = await collector.done
        return body

    def _answer(
        self,
        url: str,
        response: IResponse,
        body: bytes,
        etag: str | None,
        last_modified: str | None,
        started: float,
    ) -> FetchedPage:
        """
        What the answer means: the page, not modified, not found, or a
        failure; recorded as such.
        """
        if response.code in (404, 410):
            self._health.record("page", "not_found", started)
            raise UpstreamNotFound(url)
        if response.code == 304 and (etag is not None or last_modified is not None):
            self._health.record("page", "not_modified", started)
            return FetchedPage(url, b"", "", etag, last_modified, not_modified=True)
        if response.code != 200:
            reason = f"upstream answered {response.code} for {url}"
            self._health.record("page", "error", started, reason)
            raise UpstreamError(502, reason)
        self._health.record("page", "ok", started)
        return fetched(response, body)

"""
The legacy JSON API (C{/pypi/<project>/json}, C{/pypi/<project>/<version>/json}),
which poetry, pip-audit, renovate, dependabot and many scripts read:
proxied from the upstream that owns the project in the group, cached for
the index TTL (single flight, stale while the upstream fails), and
answered with the file URLs on the proxy and the group's policy applied.

The upstream's body is kept as it came (in memory, at most
L{MAX_JSON_BYTES} of them, least recently used out; and in the metadata
store, for a restart); each answer is made from it on the way out, in the
thread pool: the file URLs depend on the host the client asked, and the
policy on the time.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote

import attrs
from packaging.version import InvalidVersion, Version
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger

from txpypi.cache.groups import Group
from txpypi.cache.pages import NotFound, PageCache
from txpypi.cache.policy import PolicedGroup, PolicyRefused, ProjectBlocked
from txpypi.cache.provenance import is_json_object
from txpypi.concurrency.waiters import SingleFlight, in_thread_now
from txpypi.core.policy import NO_POLICY, Policy, Refusal
from txpypi.core.simple.links import local_href
from txpypi.core.simple.model import DistFile
from txpypi.fetch.upstream import UpstreamClient, UpstreamError, UpstreamNotFound
from txpypi.storage.metadata import IMetadata, PageRecord
from txpypi.storage.outages import Unavailable

log = Logger(namespace="txpypi.pages")

#: The most bytes of upstream JSON API bodies kept in memory, together.
MAX_JSON_BYTES = 64 * 1024 * 1024

#: The most JSON API URLs remembered as unknown to their upstream.
MAX_NEGATIVE = 10_000

#: The largest JSON API body fetched (PyPI's biggest are tens of MB).
MAX_JSON_BODY = 128 * 1024 * 1024


class NoJsonApi(NotFound):
    """
    No member of the group offers a JSON API for the project.
    """


@attrs.frozen
class Stored:
    body: bytes
    fetched_at: float
    etag: str | None


def _dist(entry: Mapping[str, Any]) -> DistFile:
    """
    A JSON API file entry as a L{DistFile}, for the policy's verdict.
    """
    digests = entry.get("digests")
    yanked = entry.get("yanked") is True
    reason = entry.get("yanked_reason")
    return DistFile(
        filename=str(entry.get("filename", "")),
        url=str(entry.get("url", "")),
        hashes=dict(digests) if isinstance(digests, dict) else {},
        yanked=(reason or True) if yanked else False,
        upload_time=entry.get("upload_time_iso_8601")
        if isinstance(entry.get("upload_time_iso_8601"), str)
        else None,
    )


def _newest(versions: list[str]) -> str | None:
    """
    The newest final release, as PyPI's C{info} describes it; without
    one, the newest of any.
    """

    def key(v: str) -> tuple[int, int, Version | str]:
        try:
            parsed = Version(v)
        except InvalidVersion:
            return (0, 0, v)
        return (1, 0 if parsed.is_prerelease or parsed.is_devrelease else 1, parsed)

    return max(versions, key=key, default=None)


@attrs.define
class Answer:
    """
    One JSON API answer, made: its body, and how long it is fresh.
    """

    body: bytes
    remaining: float
    stale: bool


@attrs.define
class LegacyAPI:
    """
    The JSON API of every upstream, by cache prefix, and its answers per group.
    """

    _clock: IReactorTime
    _metadata: IMetadata
    #: Each upstream's client, by upstream URL.
    _clients: Mapping[str, UpstreamClient]
    #: Each upstream's JSON API base (C{.../pypi/}), by upstream name; an
    #: upstream missing here has none.
    _bases: Mapping[str, str]
    _blocking: Callable[..., Any] = in_thread_now
    _kept: OrderedDict[str, Stored] = attrs.field(factory=OrderedDict)
    _bytes: int = 0
    _flights: SingleFlight[str, Stored] = attrs.field(factory=SingleFlight)
    #: The JSON API URLs an upstream answered 404 for, and when (at most
    #: L{MAX_NEGATIVE}, for C{--negative-ttl}): a client asking for made-up
    #: versions costs one upstream request each per negative TTL, no more.
    _unknown: OrderedDict[str, float] = attrs.field(factory=OrderedDict)

    # -- the upstream's bodies

    def _keep(self, key: str, stored: Stored) -> None:
        old = self._kept.pop(key, None)
        if old is not None:
            self._bytes -= len(old.body)
        if len(stored.body) <= MAX_JSON_BYTES:
            self._kept[key] = stored
            self._bytes += len(stored.body)
        while self._bytes > MAX_JSON_BYTES and self._kept:
            _, gone = self._kept.popitem(last=False)
            self._bytes -= len(gone.body)

    async def _body(self, pages: PageCache, project: str, version: str | None) -> tuple[Stored, bool]:
        """
        The upstream's body, fresh or (while it fails) stale, and whether stale.

        @raise NoJsonApi: the upstream offers none, or not for this project.
        """
        base = self._bases.get(pages.upstream.name)
        if base is None:
            raise NoJsonApi(project)
        path = f"{quote(project)}/json" if version is None else f"{quote(project)}/{quote(version)}/json"
        key = f"legacy/{pages.group}/{path}"
        stored = self._kept.get(key)
        if stored is None:
            try:
                record = await self._metadata.get_page(key)
            except Unavailable:
                record = None
            if record is not None:
                stored = Stored(record.body, record.fetched_at, record.etag)
                self._keep(key, stored)
        now: float = self._clock.seconds()
        learned = self._unknown.get(key)
        if learned is not None and now - learned < pages.negative_ttl:
            raise NoJsonApi(project)
        if stored is not None and (pages.offline or now - stored.fetched_at < pages.ttl):
            self._kept.move_to_end(key)
            return stored, pages.offline
        try:
            fresh = await self._flights.run(key, lambda: self._fetch(pages, key, base + path, stored))
        except UpstreamError:
            if (
                stored is not None
                and pages.stale_ttl > 0
                and now - stored.fetched_at < pages.ttl + pages.stale_ttl
            ):
                return stored, True
            raise
        return fresh, False

    async def _fetch(self, pages: PageCache, key: str, url: str, stored: Stored | None) -> Stored:
        client = self._clients[pages.upstream.url]
        try:
            fetched = await client.fetch_page(
                url, None if stored is None else stored.etag, None, MAX_JSON_BODY
            )
        except UpstreamNotFound:
            self._unknown[key] = self._clock.seconds()
            self._unknown.move_to_end(key)
            while len(self._unknown) > MAX_NEGATIVE:
                self._unknown.popitem(last=False)
            raise NoJsonApi(url) from None
        now: float = self._clock.seconds()
        if fetched.not_modified and stored is not None:
            fresh = attrs.evolve(stored, fetched_at=now)
        else:
            if not is_json_object(fetched.body):
                raise UpstreamError(502, f"the JSON API at {url} did not answer a JSON object")
            fresh = Stored(fetched.body, now, fetched.etag)
        self._keep(key, fresh)
        try:
            await self._metadata.put_page(
                PageRecord(key, pages.upstream.url, url, fresh.body, now, fresh.etag)
            )
        except Unavailable:
            pass
        return fresh

    # -- a group's answers

    async def answer(
        self, group: Group, policed: PolicedGroup | None, project: str, version: str | None, base_url: str
    ) -> Answer:
        """
        The group's JSON API answer for C{project} (and C{version}), its
        file URLs under C{base_url} (the proxy as the client reached it).

        @raise NoJsonApi: no member that may be asked offers it.
        @raise PolicyRefused: C{version} is hidden by the policy.
        """
        members = await self._members(group, project)
        for member in members:
            try:
                stored, stale = await self._body(member, project, version)
            except NoJsonApi:
                continue
            policy = (
                NO_POLICY if policed is None or not policed.active else policed.policy(member.upstream.name)
            )
            blocked = policy.project_refusal(project)
            if blocked is not None:
                if policed is not None:
                    policed.on_refusal(blocked)
                raise ProjectBlocked(blocked)  # the whole project, as its page: a 404
            href = f"{base_url}/{group.name}/files/"
            now: float = self._clock.seconds()
            made = await self._blocking(_render, stored.body, project, version, policy, href, now)
            if isinstance(made, Refusal):
                if policed is not None:
                    policed.on_refusal(made)
                raise PolicyRefused(made)
            if made[1] is not None:
                # The newest version is hidden: its info is the newest visible one's.
                try:
                    newest, _ = await self._body(member, project, made[1])
                except NoJsonApi:
                    newest = Stored(b"{}", now, None)  # info as it was; urls none
                made = await self._blocking(
                    _render, stored.body, project, None, policy, href, now, newest.body
                )
                assert not isinstance(made, Refusal)
            remaining = member.ttl - (now - stored.fetched_at)
            return Answer(made[0], max(0.0, remaining), stale)
        raise NoJsonApi(project)

    async def _members(self, group: Group, project: str) -> list[PageCache]:
        """
        Whom to ask: the members whose Simple API pages the group's page is
        made of (first-index: the owner alone; merge: those that know the
        project, in priority order).  A member that does not know the
        project is never asked, as for pages.
        """
        if not group.candidates(project):
            raise NoJsonApi(project)
        page, _ = await group.get(project)
        return await group.contributors(project, page)


def _rewrite(entry: dict[str, Any], project: str, href: str) -> dict[str, Any]:
    filename = str(entry.get("filename", ""))
    return {**entry, "url": href + local_href(project, filename).removeprefix("../../files/")}


def _render(
    body: bytes,
    project: str,
    version: str | None,
    policy: Policy,
    href: str,
    now: float,
    newest: bytes | None = None,
) -> tuple[bytes, str | None] | Refusal:
    """
    The answer made from the upstream's body: file URLs on the proxy,
    hidden files (and releases left with none) removed.  Pure.

    @return: the body and L{None}; or, when the newest version has no file
        left, L{None}'s place holds the newest visible version, whose own
        body (C{newest}) gives C{info} and C{urls} on a second call; or the
        refusal of a C{version} the policy hides.
    """
    data = json.loads(body)

    def visible(entries: Any) -> list[dict[str, Any]]:
        kept = []
        for entry in entries if isinstance(entries, list) else []:
            if isinstance(entry, dict) and policy.verdict(project, _dist(entry), now).refusal is None:
                kept.append(_rewrite(entry, project, href))
        return kept

    def refusal(entries: Any) -> Refusal | None:
        for entry in entries if isinstance(entries, list) else []:
            if isinstance(entry, dict):
                found = policy.verdict(project, _dist(entry), now).refusal
                if found is not None:
                    return found
        return None

    policy_hides = policy.active  # a project it blocks whole is refused before (LegacyAPI.answer)
    urls = data.get("urls")
    shown_urls = visible(urls)
    if version is not None:
        if policy_hides and isinstance(urls, list) and urls and not shown_urls:
            found = refusal(urls)
            if found is not None:
                return found
        data["urls"] = shown_urls
        return json.dumps(data).encode(), None
    releases = data.get("releases")
    if isinstance(releases, dict):
        shown: dict[str, Any] = {}
        for name, entries in releases.items():
            files = visible(entries)
            if files or not entries:
                shown[name] = files
        data["releases"] = shown
        info = data.get("info")
        current = info.get("version") if isinstance(info, dict) else None
        if policy_hides and isinstance(current, str) and current not in shown:
            if newest is None:
                candidate = _newest([v for v, files in shown.items() if files])
                if candidate is not None:
                    return b"", candidate
                data["urls"] = []
                return json.dumps(data).encode(), None
            other = json.loads(newest)
            data["info"] = other.get("info", info)
            data["urls"] = visible(other.get("urls"))
            return json.dumps(data).encode(), None
    data["urls"] = shown_urls
    return json.dumps(data).encode(), None

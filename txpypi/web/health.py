"""
C{/health}: the proxy's state, for load balancers and monitoring: the
upstream's, the file store's and the metadata store's.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attrs
from twisted.internet.defer import Deferred, DeferredList
from twisted.internet.interfaces import IReactorTime

from txpypi import __version__
from txpypi.cache.files import FileCache
from txpypi.cache.pages import PageCache
from txpypi.core.policy import PolicyTable, format_instant
from txpypi.fetch.upstream import UpstreamClient
from txpypi.storage.outages import CHECK_WAIT, Outage
from txpypi.web.memo import Memo

#: How soon an exemption must end for C{/health} to list it.
EXPIRING_WITHIN = 7 * 24 * 3600.0

#: The state of a part: C{{"state": "ok"}}, or with a C{reason}.
Part = dict[str, Any]


@attrs.define
class Health:
    """
    Works out the proxy's health from its parts.  The stores are probed
    once a second at most (a L{Memo}), however many ask.
    """

    _clock: IReactorTime
    _pages: PageCache
    _files: FileCache
    _client: UpstreamClient
    #: The stores watched for outages (L{txpypi.storage.outages}).
    _outages: tuple[Outage, ...] = ()
    #: Every upstream's pages and client, by name (by default the one).
    _upstreams: Mapping[str, tuple[PageCache, UpstreamClient]] = attrs.field(kw_only=True)
    #: The policies in force (for the exemptions about to expire).
    _policy: Callable[[], PolicyTable] = attrs.field(default=PolicyTable, kw_only=True)
    _probed: Memo[None, Part | None] = attrs.field(init=False)

    @_upstreams.default
    def _one(self) -> Mapping[str, tuple[PageCache, UpstreamClient]]:
        return {self._pages.upstream.name: (self._pages, self._client)}

    def __attrs_post_init__(self) -> None:
        self._probed = Memo(self._clock)

    async def report(self) -> tuple[bool, dict[str, Any]]:
        """
        Whether the proxy can serve, and its state as JSON values.  It
        serves while degraded (the upstream or a store failing: files then
        come from the upstream uncached, and a Redis outage must not take
        every instance out of a load balancer at once), not when a store it
        cannot do without (its local SQLite database) fails.
        """
        upstream = self._upstream(self._pages, self._client)
        upstreams = {name: self._upstream(*parts) for name, parts in self._upstreams.items()}
        unwatched_metadata = await self._probed.get(None, self._probe_stores)
        watched = {o.store: o for o in self._outages}
        file_store = self._file_store(watched.get("files"))
        if "metadata" in watched:
            metadata = watched["metadata"].health()
        else:
            metadata = unwatched_metadata or {"state": "ok"}
        fatal = watched["metadata"].fatal if "metadata" in watched else True
        serving = metadata["state"] == "ok" or not fatal
        failing = any(u["state"] == "degraded" for u in upstreams.values())
        degraded = (
            upstream["state"] == "degraded"
            or failing
            or file_store["state"] != "ok"
            or metadata["state"] != "ok"
        )
        files = self._files
        return serving, {
            "status": "failing" if not serving else "degraded" if degraded else "ok",
            "version": __version__,
            "upstream": upstream,
            "upstreams": upstreams,
            "file_store": file_store,
            "metadata_store": metadata,
            "exemptions_expiring": self._expiring(),
            "cache": {
                "bytes": files.usage.size,
                "files": files.usage.count,
                "max_bytes": files.usage.max_size,
            },
        }

    def _expiring(self) -> list[dict[str, str]]:
        """
        The policy exemptions that end within L{EXPIRING_WITHIN}, by group
        or upstream, soonest first.
        """
        now: float = self._clock.seconds()
        table = self._policy()
        found = []
        for kind, policies in (("group", table.groups), ("upstream", table.upstreams)):
            for name, policy in policies.items():
                for e in policy.exempt or ():
                    if now <= e.until < now + EXPIRING_WITHIN:
                        found.append(
                            (
                                e.until,
                                {
                                    kind: name,
                                    "rule": e.text,
                                    "until": format_instant(e.until),
                                    "reason": e.reason,
                                },
                            )
                        )
        return [entry for _, entry in sorted(found, key=lambda pair: pair[0])]

    def _upstream(self, pages: PageCache, client: UpstreamClient) -> Part:
        error = client.last_error
        return {
            "url": pages.upstream.url,
            "state": "offline" if pages.offline else client.state(),
            "last_success": client.last_success,
            "last_error": None if error is None else {"at": error[0], "reason": error[1]},
        }

    def _file_store(self, watched: Outage | None) -> Part:
        file_store: Part = {"state": "ok"} if watched is None else watched.health()
        spool_error = self._files.spool_error()
        if spool_error and file_store["state"] == "ok":
            return {"state": "degraded", "reason": spool_error}
        return file_store

    async def _probe_stores(self) -> Part | None:
        """
        Ask each watched store now (waiting 1 s at most, and not at all for
        one known down), so that one that just failed shows at once; and
        ping an unwatched metadata store, whose state this returns.
        """
        await DeferredList([Deferred.fromCoroutine(o.check(CHECK_WAIT)) for o in self._outages])
        if any(o.store == "metadata" for o in self._outages):
            return None
        try:
            await self._files.metadata_ping()
        except Exception as e:
            return {"state": "failing", "reason": repr(e)}
        return {"state": "ok"}

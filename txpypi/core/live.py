"""
The settings that may change while the proxy runs (SIGHUP): one L{Live}
object that every part holds by reference and reads when it needs a value,
so that a reload changes them in one place and nobody writes another part's
fields.  A part that must act on a change (wake the downloads waiting for a
slot, trim the page cache, evict) says so with L{Live.on_change}.

The defaults here are the options' defaults (L{txpypi.config.Settings}
takes them from here); the rows marked live in L{txpypi.options.OPTIONS}
are exactly these fields, which a test checks.  In a proxy of several
indexes, each index's parts may hold a L{Live} of their own.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import attrs

from txpypi.core.policy import PolicyTable


@attrs.define(eq=False)
class Live:
    """
    The live settings, by their option's attribute name.
    """

    index_ttl: float = 600.0
    stale_ttl: float = 7 * 24 * 3600.0
    offline: bool = False
    negative_ttl: float = 60.0
    max_upstream_requests: int = 32
    page_cache_size: int = 256 * 1024 * 1024
    response_timeout: float = 30.0
    read_timeout: float = 60.0
    min_download_rate: float = 1024.0
    max_cache_size: int | None = None
    max_downloads: int = 16
    admin_token: str | None = attrs.field(default=None, repr=False)
    s3_redirect: bool = False
    s3_redirect_ttl: float = 300.0
    accel_redirect: str | None = None
    log_format: str = "combined"
    access_log: str = "-"
    trusted_proxies: tuple[str, ...] = ()
    shutdown_grace: float = 30.0
    max_connections: int = 1024
    send_timeout: float = 60.0
    #: The groups' and upstreams' supply-chain policies (their C{policy:}
    #: keys, not rows of their own: see L{txpypi.upstreams.policy_table}).
    policy: PolicyTable = attrs.field(factory=PolicyTable, metadata={"nested": True})
    _hooks: list[Callable[[], object]] = attrs.field(factory=list, repr=False)

    @property
    def redirect_ttl(self) -> float | None:
        """
        How long a presigned URL given to a client lasts, or L{None} when
        hits are not redirected (C{--s3-redirect} off).
        """
        return self.s3_redirect_ttl if self.s3_redirect else None

    def on_change(self, hook: Callable[[], object]) -> None:
        """
        Call C{hook} after each L{update}.
        """
        self._hooks.append(hook)

    def update(self, values: Mapping[str, Any]) -> None:
        """
        Take new values (by attribute name; any other name is a
        L{KeyError}), then tell the parts that asked.
        """
        unknown = set(values) - set(names()) - {"policy"}
        if unknown:
            raise KeyError(f"not a live setting: {', '.join(sorted(unknown))}")
        for name, value in values.items():
            setattr(self, name, value)
        for hook in list(self._hooks):
            hook()


def names() -> tuple[str, ...]:
    """
    The live settings' names: one per live row of the options (the
    nested policies are not one).
    """
    return tuple(
        field.name
        for field in attrs.fields(Live)
        if not field.name.startswith("_") and not field.metadata.get("nested")
    )

"""
Access log lines, pure: the client's address (honouring X-Forwarded-For
only from trusted proxies), and the line in the combined format or as JSON.
"""

from __future__ import annotations

import json
import time
from collections.abc import Collection
from typing import Any

import attrs

FORMATS = ("combined", "json", "none")


def client_address(peer: str, forwarded_for: str | None, trusted: Collection[str]) -> str:
    """
    The address of the client: the peer, unless the peer is a trusted proxy,
    in which case C{X-Forwarded-For} is walked from the right past every
    trusted proxy.
    """
    if peer not in trusted or not forwarded_for:
        return peer
    hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
    address = peer
    while hops and address in trusted:
        address = hops.pop()
    return address


@attrs.frozen
class Entry:
    client: str
    method: str
    path: str
    protocol: str
    status: int
    size: int
    duration: float
    cache: str
    referer: str
    user_agent: str
    time: float


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"')


def combined(entry: Entry) -> str:
    """
    The Apache/nginx combined format, plus the cache state and the duration.
    """
    when = time.strftime("%d/%b/%Y:%H:%M:%S +0000", time.gmtime(entry.time))
    return (
        f'{entry.client} - - [{when}] "{_quote(entry.method)} {_quote(entry.path)} {_quote(entry.protocol)}" '
        f'{entry.status} {entry.size} "{_quote(entry.referer)}" "{_quote(entry.user_agent)}" '
        f"{entry.cache or '-'} {entry.duration:.6f}"
    )


def json_line(entry: Entry) -> str:
    fields: dict[str, Any] = attrs.asdict(entry)
    fields["duration"] = round(entry.duration, 6)
    return json.dumps(fields, separators=(",", ":"))

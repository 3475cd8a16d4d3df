"""
The human status page, rendered from plain figures: pure, no I/O, no
JavaScript.
"""

from __future__ import annotations

from html import escape

import attrs


def human_size(n: int) -> str:
    """
    A byte count for people, in powers of 1024.
    """
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


@attrs.frozen
class StatusFigures:
    version: str
    upstream: str
    upstream_state: str
    files: int | None
    size: int
    max_size: int | None
    hit_ratio: float | None
    saved: int
    in_flight: int
    top: list[tuple[str, int]]
    index_url: str
    #: Every upstream (name, URL, state) when there are several.
    upstreams: tuple[tuple[str, str, str], ...] = ()
    #: The groups other than the default one, by name.
    groups: tuple[str, ...] = ()
    #: Each group's policy in force, in words, when it has one.
    policies: tuple[tuple[str, str], ...] = ()


_STYLE = """
body { font-family: sans-serif; margin: 2em auto; max-width: 48em; color: #222; }
table { border-collapse: collapse; } td, th { padding: .2em .8em; text-align: left; }
td.n { text-align: right; } .ok { color: #060; } .degraded, .offline { color: #a50; }
pre { background: #f4f4f4; padding: .6em; }
"""


def render_status(f: StatusFigures) -> bytes:
    size = (
        f"{human_size(f.size)} (no limit)"
        if f.max_size is None
        else f"{human_size(f.size)} of {human_size(f.max_size)}"
    )
    ratio = "no requests yet" if f.hit_ratio is None else f"{100 * f.hit_ratio:.1f} %"
    files = "?" if f.files is None else str(f.files)
    rows = "".join(f"<tr><td>{escape(p)}</td><td class=n>{n}</td></tr>" for p, n in f.top)
    index = escape(f.index_url)
    state = escape(f.upstream_state)
    lines = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>txpypi status</title>',
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>txpypi {escape(f.version)}</h1>",
        "<h2>Upstream</h2>",
        f'<p><code>{escape(f.upstream)}</code>: <span id="upstream-state" class="{state}">{state}</span></p>',
        *_upstreams(f),
        "<h2>Cache</h2>",
        "<table>",
        f'<tr><th>Files cached</th><td class=n id="cache-files">{files}</td></tr>',
        f'<tr><th>Size</th><td class=n id="cache-size">{size}</td></tr>',
        f'<tr><th>Hit ratio</th><td class=n id="hit-ratio">{ratio}</td></tr>',
        f'<tr><th>Bandwidth saved</th><td class=n id="saved">{human_size(f.saved)}</td></tr>',
        f'<tr><th>Downloads in progress</th><td class=n id="in-flight">{f.in_flight}</td></tr>',
        "</table>",
        "<h2>Most downloaded</h2>",
        '<table id="top"><tr><th>Project</th><th>Downloads</th></tr>',
        rows or "<tr><td colspan=2>none yet</td></tr>",
        "</table>",
        "<h2>Use it</h2>",
        f"<pre>pip install --index-url {index} PACKAGE",
        f"uv pip install --index-url {index} PACKAGE",
        f"poetry source add --priority=primary txpypi {index}",
        f"pdm config pypi.url {index}</pre>",
        *_groups(f),
        *_policies(f),
        '<p><a href="/metrics">metrics</a> &middot; <a href="/health">health</a>',
        ' &middot; <a href="/stats">stats</a></p>',
        "</body></html>",
        "",
    ]
    return "\n".join(lines).encode()


def _upstreams(f: StatusFigures) -> list[str]:
    if len(f.upstreams) < 2:
        return []
    rows = "".join(
        f'<tr><td>{escape(name)}</td><td><code>{escape(url)}</code></td><td class="{escape(state)}">'
        f"{escape(state)}</td></tr>"
        for name, url, state in f.upstreams
    )
    return ['<table id="upstreams"><tr><th>Upstream</th><th>URL</th><th>State</th></tr>', rows, "</table>"]


def _groups(f: StatusFigures) -> list[str]:
    if not f.groups:
        return []
    base = f.index_url.removesuffix("simple/")
    items = "".join(f"<li><code>{escape(base + name)}/simple/</code></li>" for name in f.groups)
    return ["<p>The other groups:</p>", f'<ul id="groups">{items}</ul>']


def _policies(f: StatusFigures) -> list[str]:
    if not f.policies:
        return []
    rows = "".join(
        f"<tr><td>{escape(group)}</td><td>{escape(words)}</td></tr>" for group, words in f.policies
    )
    return [
        "<h2>Policy</h2>",
        '<table id="policy"><tr><th>Group</th><th>In force</th></tr>',
        rows,
        "</table>",
        "<p>Per group, as JSON: <code>/&lt;group&gt;/policy</code>.</p>",
    ]

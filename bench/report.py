"""
What the bench prints: section headings, ratios, verdicts against
txpypi's targets, C{!!} alarms and the summary tables.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from clients import Streamed

#: A summary row: measure, txpypi, proxpi, txpypi/proxpi and, optionally, txpypi's target.
Row = tuple[str, ...]

# txpypi's targets.
DOWNLOAD_TARGET = 1.10  # cold huge download, as a multiple of the direct download's time
TTFB_TARGET_MS = 10.0  # TTFB on a miss, over the upstream's own
RSS_TARGET_MB = 150.0  # peak RSS while a crowd streams a huge file


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def verdict(target: str, actual: str, ok: bool) -> str:
    """
    A target cell: the target, what was measured, and whether it was met.
    """
    return f"{target} ({actual}): {'ok' if ok else 'MISSED'}"


def download_verdict(slower: float) -> str:
    """
    The verdict on a cold download that took C{slower} times the direct one.
    """
    return verdict(f"<= {DOWNLOAD_TARGET:.2f}x direct", f"{slower:.2f}x", slower <= DOWNLOAD_TARGET)


def ttfb_verdict(added_ms: float) -> str:
    """
    The verdict on a miss whose first byte came C{added_ms} after the upstream's own.
    """
    return verdict(f"<= +{TTFB_TARGET_MS:.0f} ms", f"+{added_ms:.2f} ms", added_ms <= TTFB_TARGET_MS)


def section(title: str) -> None:
    print(f"\n== {title}", flush=True)


def alarm(problems: list[str]) -> list[str]:
    """
    Print each of C{problems} (what txpypi did wrong) with C{!!}; return them.
    """
    for problem in problems:
        print(f"!! {problem}")
    return problems


def seconds_list(runs: Sequence[Streamed]) -> str:
    """
    The seconds each of C{runs} took, for a C{(runs: ...)} note.
    """
    return ", ".join(f"{r.total:.2f}" for r in runs)


def load() -> str:
    """
    The load average (this bench included): how busy the machine was while it measured.
    """
    one, five, _ = os.getloadavg()
    return f"load average {one:.2f} over 1 min, {five:.2f} over 5, on {os.cpu_count()} CPUs"


@dataclass
class Table:
    """
    A summary table: its rows have the columns of C{header} (the first a
    measure, the last a target, which may be left out).
    """

    title: str
    header: tuple[str, str, str, str, str]
    rows: list[Row] = field(default_factory=list)
    note: str = ""


def print_table(table: Table) -> None:
    rows = [(*row, "", "")[:5] for row in table.rows]
    columns = 5 if any(row[4] for row in [table.header, *rows]) else 4  # no targets: no target column
    widths = [max(len(row[i]) for row in [table.header, *rows]) for i in range(columns)]
    rule = "-+-".join("-" * w for w in widths)
    print(f"\n== {table.title}")
    print(" | ".join(h.ljust(w) for h, w in zip(table.header[:columns], widths, strict=True)).rstrip())
    print(rule)
    for row in rows:
        cells = [row[0].ljust(widths[0])]
        cells += [c.rjust(w) for c, w in zip(row[1:4], widths[1:4], strict=True)]
        cells += row[4:columns]
        print(" | ".join(cells).rstrip())
    if table.note:
        print(table.note)

"""
The bench's sections, one module each (C{huge} and C{link} share the huge
wheels; C{page} and C{file} are both in L{sections.warm}, as C{run_page}
and C{run_file}).  Each has a C{run(ctx: Run) -> list[str]} that
measures, prints, adds its rows to the summary or its own table, and
returns what txpypi did wrong.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from harness import Backends, Service, Services
from proxies import Proxy
from report import Row, Table


@dataclass
class Run:
    """
    What the sections of one bench run share: its options, its processes
    and what it has measured so far.
    """

    args: argparse.Namespace
    work: Path
    services: Services
    backends: Backends
    upstream: Service
    txpypi: Proxy | None  # the main txpypi, for the sections that compare it with proxpi, and link
    proxpi: Proxy | None
    wrk: str | None
    uv: list[str]
    accept: str  # of the index page that the page section loads
    summary: list[Row]  # txpypi against proxpi
    tables: list[Table]  # the sections that compare txpypi with itself

    @property
    def proxies(self) -> tuple[Proxy, Proxy]:
        assert self.txpypi is not None and self.proxpi is not None
        return self.txpypi, self.proxpi

    @property
    def wrk_binary(self) -> str:
        assert self.wrk is not None
        return self.wrk

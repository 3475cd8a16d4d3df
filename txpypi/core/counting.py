"""
What the lower layers count, as types: the fetch and cache layers record
upstream exchanges and store errors in the proxy's metrics, which live a
layer above (L{txpypi.web.metrics.Metrics}, prometheus-client's counters
and histograms).  These protocols say which parts of it they touch, so that
mypy checks the calls without those layers importing the web layer.
"""

from __future__ import annotations

from typing import Protocol, TypeVar

T_co = TypeVar("T_co", covariant=True)


class Count(Protocol):
    """
    One counter's series (a counter with its labels given).
    """

    def inc(self, amount: float = 1) -> None: ...


class Observe(Protocol):
    """
    One histogram's series.
    """

    def observe(self, amount: float) -> None: ...


class Labelled(Protocol[T_co]):
    """
    A metric with labels: C{labels(*values)} is one series of it.
    """

    def labels(self, *values: str) -> T_co: ...


class UpstreamCounts(Protocol):
    """
    What an upstream's health records (L{txpypi.fetch.exchange.Health}):
    exchanges by upstream, kind and outcome, and their latency by upstream
    and kind.
    """

    @property
    def upstream(self) -> Labelled[Count]: ...

    @property
    def upstream_latency(self) -> Labelled[Observe]: ...


class StoreCounts(Protocol):
    """
    What the file cache records: failed calls to a store, by store.
    """

    @property
    def store_errors(self) -> Labelled[Count]: ...

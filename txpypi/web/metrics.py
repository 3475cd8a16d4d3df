"""
Prometheus metrics on a registry that is passed in.  Label sets are
bounded: routes, status codes, cache results and outcomes, the configured
upstream and group names, never a project or a file name.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterator
from typing import Any

import attrs
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample
from prometheus_client.utils import floatToGoString

from txpypi.concurrency.stalls import BUCKETS, StallMeter

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

_LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)

#: The routes requests are counted under.
ROUTES = ("simple", "project", "file", "metadata", "admin", "metrics", "health", "stats", "home", "other")


_OWN = (b"simple", b"files", b"cache", b"_peer")


def route_of(path: bytes) -> str:
    """
    The bounded route label for a request path (a group's C{/<group>/simple/}
    counts as C{/simple/} does: the label never names the group).
    """
    group, sep, rest = path[1:].partition(b"/")
    if sep and group not in _OWN and rest.startswith((b"simple", b"files/", b"cache/")):
        path = b"/" + rest
    if path.startswith(b"/simple/") or path == b"/simple":
        return "simple" if path in (b"/simple/", b"/simple") else "project"
    if path.startswith(b"/files/"):
        return "metadata" if path.endswith(b".metadata") else "file"
    if path.startswith(b"/_peer/"):
        return "peer"
    if path.startswith(b"/cache/"):
        return "admin"
    if path in (b"/metrics", b"/health", b"/stats"):
        return path[1:].decode()
    if path == b"/":
        return "home"
    return "other"


class _State(Collector):
    """
    Gauges and counters read from live objects at scrape time.
    """

    def __init__(self, read: Callable[[], dict[str, float]]) -> None:
        self._read = read

    def collect(self) -> Iterator[Any]:
        state = self._read()
        gauges = {
            "txpypi_cache_bytes": "Bytes of files in the cache.",
            "txpypi_cache_files": "Files in the cache.",
            "txpypi_cache_max_bytes": "The cache's size limit in bytes (0: none).",
            "txpypi_downloads_in_flight": "Upstream file downloads in progress.",
            "txpypi_download_clients": "Clients reading downloads in progress.",
            "txpypi_connections_open": "Client connections open, on all listeners together.",
        }
        for name, help_text in gauges.items():
            yield GaugeMetricFamily(name, help_text, value=state.get(name, 0))
        yield CounterMetricFamily(
            "txpypi_evictions", "Files evicted to keep under the size limit.", value=state.get("evictions", 0)
        )


class _Stalls(Collector):
    """
    The reactor's lateness (C{--stall-meter}), read from a L{StallMeter}.
    """

    def __init__(self, meter: StallMeter) -> None:
        self._meter = meter

    def collect(self) -> Iterator[Any]:
        meter = self._meter
        yield GaugeMetricFamily(
            "txpypi_reactor_stall_seconds_max",
            "The longest the reactor thread ran late (a timer due every 10 ms fired that long after"
            " its time) since the process started.",
            value=meter.longest,
        )
        cumulative, buckets = 0, []
        for bound, n in zip((*(str(b) for b in BUCKETS), "+Inf"), meter.counts, strict=True):
            cumulative += n
            buckets.append((bound, cumulative))
        yield HistogramMetricFamily(
            "txpypi_reactor_lateness_seconds",
            "How late each tick of the 10 ms timer fired.",
            buckets=buckets,
            sum_value=meter.total,
        )


class _Tally:
    """
    What L{Finished} counted of one route, status code and cache result.
    """

    __slots__ = ("buckets", "created", "observed", "requests", "seconds", "sent")

    def __init__(self, created: float) -> None:
        self.requests = 0
        self.observed = 0
        self.buckets = [0] * (len(_LATENCY_BUCKETS) + 1)
        self.seconds = 0.0
        self.sent = 0
        self.created = created


class Finished(Collector):
    """
    The metrics of finished requests: C{txpypi_requests_total{route,code}},
    C{txpypi_request_duration_seconds{route}},
    C{txpypi_cache_answers_total{kind,result}} and
    C{txpypi_served_bytes_total{source}}, counted in plain numbers on the
    reactor thread and exported at each scrape (which runs there too:
    nothing else touches the tallies).

    prometheus-client's own counters take a lock and a few calls for each
    increment: four of them for every request were a fifth of a warm page's
    time in the quick lane.  The tallies are as many as the label sets (a
    route of L{ROUTES}, a status code txpypi sends, a cache result of its
    own), so they are bounded as the labels are.
    """

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._tallies: dict[tuple[str, str, str], _Tally] = {}

    def count(self, route: str, code: str, duration: float | None, state: str = "", sent: int = 0) -> None:
        """
        Count a finished request: its route, its status code, its latency
        (L{None}: a request refused before it was read, counted but not
        timed), for a cache answer its C{X-Cache} (C{state}) and the body
        bytes C{sent}.
        """
        key = (route, code, state)
        tally = self._tallies.get(key)
        if tally is None:
            tally = self._tallies[key] = _Tally(self._clock())
        tally.requests += 1
        if duration is not None:
            tally.observed += 1
            tally.buckets[bisect_left(_LATENCY_BUCKETS, duration)] += 1
            tally.seconds += duration
        tally.sent += sent

    def collect(self) -> Iterator[Any]:
        requests: dict[tuple[str, ...], list[float]] = {}
        latency: dict[str, _Tally] = {}
        answers: dict[tuple[str, ...], list[float]] = {}
        served: dict[tuple[str, ...], list[float]] = {}

        def add(
            into: dict[tuple[str, ...], list[float]], labels: tuple[str, ...], n: float, created: float
        ) -> None:
            got = into.setdefault(labels, [0.0, created])
            got[0] += n
            got[1] = min(got[1], created)

        for (route, code, state), tally in self._tallies.items():
            add(requests, (route, code), tally.requests, tally.created)
            if tally.observed:
                into = latency.setdefault(route, _Tally(tally.created))
                into.buckets = [a + b for a, b in zip(into.buckets, tally.buckets, strict=True)]
                into.seconds += tally.seconds
                into.created = min(into.created, tally.created)
            if state:
                kind = "file" if route in ("file", "metadata") else "page"
                add(answers, (kind, state.lower()), tally.requests, tally.created)
                if code in ("200", "206"):
                    add(served, ("upstream" if state == "MISS" else "cache",), tally.sent, tally.created)
        yield _counters(
            "txpypi_requests", "Requests answered, by route and status.", ["route", "code"], requests
        )
        histogram = HistogramMetricFamily(
            "txpypi_request_duration_seconds",
            "Time from request to the end of the response, by route.",
            labels=["route"],
        )
        for route, tally in latency.items():
            cumulative, buckets = 0, []
            for bound, n in zip(
                (*(floatToGoString(b) for b in _LATENCY_BUCKETS), "+Inf"), tally.buckets, strict=True
            ):
                cumulative += n
                buckets.append((bound, cumulative))
            histogram.add_metric([route], buckets, tally.seconds)
            histogram.samples.append(Sample(histogram.name + "_created", {"route": route}, tally.created))
        yield histogram
        yield _counters(
            "txpypi_cache_answers",
            "Pages and files answered, by kind and cache result (hit, miss, stale).",
            ["kind", "result"],
            answers,
        )
        yield _counters(
            "txpypi_served_bytes",
            "Body bytes sent to clients, by source: cache (bandwidth saved) or upstream.",
            ["source"],
            served,
        )


def _counters(
    name: str, documentation: str, labels: list[str], values: dict[tuple[str, ...], list[float]]
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, documentation, labels=labels)
    for label_values, (value, created) in values.items():
        family.add_metric(list(label_values), value, created=created)
    return family


@attrs.define
class Metrics:
    """
    Every metric txpypi exports.
    """

    registry: CollectorRegistry
    finished: Finished
    upstream: Counter
    upstream_latency: Histogram
    store_errors: Counter
    store_up: Gauge
    connections_refused: Counter
    client_timeouts: Counter
    conflicts: Counter
    policy_refusals: Counter

    @classmethod
    def create(cls, registry: CollectorRegistry | None = None) -> Metrics:
        registry = CollectorRegistry() if registry is None else registry
        finished = Finished()
        registry.register(finished)
        return cls(
            registry=registry,
            finished=finished,
            upstream=Counter(
                "txpypi_upstream_requests",
                "Requests to an upstream, by its configured name, kind (page, file; peer: to another"
                " instance) and outcome.",
                ["upstream", "kind", "outcome"],
                registry=registry,
            ),
            upstream_latency=Histogram(
                "txpypi_upstream_duration_seconds",
                "Time to an upstream's response headers, by its configured name and kind.",
                ["upstream", "kind"],
                buckets=_LATENCY_BUCKETS,
                registry=registry,
            ),
            store_errors=Counter(
                "txpypi_store_errors",
                "Errors of the file store (files, spool writes included) and the metadata store"
                " (metadata), counting calls refused at once during an outage.",
                ["store"],
                registry=registry,
            ),
            store_up=Gauge(
                "txpypi_store_up",
                "1 while the store (files, metadata) works, 0 during an outage.",
                ["store"],
                registry=registry,
            ),
            connections_refused=Counter(
                "txpypi_connections_refused",
                "Client connections closed at once because max-connections were open.",
                registry=registry,
            ),
            client_timeouts=Counter(
                "txpypi_client_timeouts",
                "Client connections closed by send-timeout, by kind: send (the client took no bytes)"
                " or request (its request did not arrive in time).",
                ["kind"],
                registry=registry,
            ),
            conflicts=Counter(
                "txpypi_conflicts",
                "Files left out of a merged group page: the same file name with another hash on a"
                " lower member.",
                ["group"],
                registry=registry,
            ),
            policy_refusals=Counter(
                "txpypi_policy_refusals",
                "Files (403) and projects (404) a group's policy refused, by rule.",
                ["rule"],
                registry=registry,
            ),
        )

    def watch(self, read: Callable[[], dict[str, float]]) -> None:
        """
        Export the live state that C{read} returns at each scrape.
        """
        self.registry.register(_State(read))

    def watch_stalls(self, meter: StallMeter) -> None:
        """
        Export C{meter}'s figures (the reactor's lateness) at each scrape.
        """
        self.registry.register(_Stalls(meter))

    def render(self) -> bytes:
        return generate_latest(self.registry)


#: Gauges of what the workers share (the one cache, the stores): the same
#: in every worker, so the whole's value is not their sum.
_SHARED_MOST = frozenset(
    {"txpypi_cache_bytes", "txpypi_cache_files", "txpypi_cache_max_bytes", "txpypi_reactor_stall_seconds_max"}
)
_SHARED_LEAST = frozenset({"txpypi_store_up"})

#: The kinds of metric that only grow: what a worker started again carries
#: on from the one before it (see L{txpypi.web.carried}).
GROWING = frozenset({"counter", "histogram", "summary"})


def merge(texts: list[bytes], answering: int | None = None, kinds: frozenset[str] | None = None) -> bytes:
    """
    The metrics of several workers as one proxy's: each sample summed over
    the workers (counters, histograms, the gauges of each worker's own
    state), except the gauges of what they share (the largest value: the
    cache's size and files and the longest reactor stall; for
    C{txpypi_store_up}, the least) and the creation times (the earliest).
    With C{answering}, a gauge C{txpypi_workers_answering} says how many
    workers answered just now (one that did not counts with its last
    answer, see L{txpypi.web.siblings}).  With C{kinds}, only the
    families of those types (C{"counter"}, C{"gauge"}, ...) are kept.
    """
    from prometheus_client.core import Metric
    from prometheus_client.parser import text_string_to_metric_families

    families: dict[str, Metric] = {}
    values: dict[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]] = {}
    for text in texts:
        for family in text_string_to_metric_families(text.decode("utf-8")):
            if kinds is not None and family.type not in kinds:
                continue
            if family.name not in families:
                families[family.name] = Metric(family.name, family.documentation, family.type, family.unit)
                values[family.name] = {}
            into = values[family.name]
            for sample in family.samples:
                key = (sample.name, tuple(sorted(sample.labels.items())))
                if key not in into:
                    into[key] = sample.value
                elif sample.name.endswith("_created"):
                    into[key] = min(into[key], sample.value)
                elif family.name in _SHARED_MOST:
                    into[key] = max(into[key], sample.value)
                elif family.name in _SHARED_LEAST:
                    into[key] = min(into[key], sample.value)
                else:
                    into[key] += sample.value
    for name, metric in families.items():
        for (sample_name, labels), value in values[name].items():
            metric.add_sample(sample_name, dict(labels), value)
    merged = list(families.values())
    if answering is not None:
        workers = GaugeMetricFamily(
            "txpypi_workers_answering", "Worker processes whose metrics are in this total.", value=answering
        )
        merged.append(workers)

    class _Merged(Collector):
        def collect(self) -> Iterator[Any]:
            return iter(merged)

    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Merged())
    return generate_latest(registry)

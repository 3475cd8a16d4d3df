"""
L{Finished} counts finished requests in plain numbers and exports what
prometheus-client's own counters and histogram would.
"""

from __future__ import annotations

import re

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from txpypi.web.metrics import _LATENCY_BUCKETS, Finished, Metrics

ROUTE = st.sampled_from(["project", "file", "metadata", "simple", "health"])
CODE = st.sampled_from(["200", "206", "304", "404", "502"])
STATE = st.sampled_from(["", "HIT", "MISS", "STALE"])
# Exactly on a bound, between bounds, past the last; None: refused untimed.
DURATION = st.one_of(st.none(), st.sampled_from([*_LATENCY_BUCKETS, 0.0]), st.floats(0, 100))
REQUEST = st.tuples(ROUTE, CODE, DURATION, STATE, st.integers(0, 10**9))


def by_prometheus_client(requests: list[tuple[str, str, float | None, str, int]]) -> str:
    """
    The same requests counted as txpypi counted them before L{Finished}.
    """
    registry = CollectorRegistry()
    counted = Counter(
        "txpypi_requests", "Requests answered, by route and status.", ["route", "code"], registry=registry
    )
    latency = Histogram(
        "txpypi_request_duration_seconds",
        "Time from request to the end of the response, by route.",
        ["route"],
        buckets=_LATENCY_BUCKETS,
        registry=registry,
    )
    answers = Counter(
        "txpypi_cache_answers",
        "Pages and files answered, by kind and cache result (hit, miss, stale).",
        ["kind", "result"],
        registry=registry,
    )
    served = Counter(
        "txpypi_served_bytes",
        "Body bytes sent to clients, by source: cache (bandwidth saved) or upstream.",
        ["source"],
        registry=registry,
    )
    for route, code, duration, state, sent in requests:
        counted.labels(route, code).inc()
        if duration is not None:
            latency.labels(route).observe(duration)
        if state:
            answers.labels("file" if route in ("file", "metadata") else "page", state.lower()).inc()
            if code in ("200", "206"):
                served.labels("upstream" if state == "MISS" else "cache").inc(sent)
    return generate_latest(registry).decode()


def by_finished(requests: list[tuple[str, str, float | None, str, int]]) -> str:
    metrics = Metrics.create()
    for request in requests:
        metrics.finished.count(*request)
    text = generate_latest(metrics.registry).decode()
    # Only the four metrics of finished requests, in their order.
    return text[: text.index("# HELP txpypi_upstream_requests_total")]


def samples(text: str) -> list[str]:
    """
    The exposition's lines, each label set's in a stable order, the
    creation times blanked (they differ by microseconds) and the sums of
    latency to 9 digits (added in another order).
    """
    lines = [re.sub(r"(_created\{[^}]*\}) .*", r"\1 -", line) for line in text.splitlines()]
    lines = [re.sub(r"(_sum\{[^}]*\}) (.*)", lambda m: f"{m[1]} {float(m[2]):.9g}", line) for line in lines]
    families: list[list[str]] = []
    for line in lines:
        if line.startswith("# HELP"):
            families.append([])
        families[-1].append(line)
    return [line for family in families for line in family[:2] + sorted(family[2:])]


@given(st.lists(REQUEST, max_size=40))
def test_the_same_exposition_as_prometheus_clients_own_metrics(
    requests: list[tuple[str, str, float | None, str, int]],
) -> None:
    assert samples(by_finished(requests)) == samples(by_prometheus_client(requests))


def test_a_count_is_read_at_once() -> None:
    metrics = Metrics.create()
    metrics.finished.count("file", "200", 0.002, "HIT", 1000)
    read = metrics.registry.get_sample_value
    assert read("txpypi_requests_total", {"route": "file", "code": "200"}) == 1
    assert read("txpypi_served_bytes_total", {"source": "cache"}) == 1000
    assert read("txpypi_request_duration_seconds_bucket", {"route": "file", "le": "0.001"}) == 0
    assert read("txpypi_request_duration_seconds_bucket", {"route": "file", "le": "0.0025"}) == 1
    metrics.finished.count("file", "200", 0.002, "HIT", 24)
    assert read("txpypi_served_bytes_total", {"source": "cache"}) == 1024


def test_creation_times_are_each_label_sets_first() -> None:
    now = [100.0]
    finished = Finished(clock=lambda: now[0])
    finished.count("project", "200", 0.001, "HIT")
    now[0] = 200.0
    finished.count("project", "200", 0.001, "MISS")
    finished.count("file", "200", 0.001, "MISS")
    registry = CollectorRegistry()
    registry.register(finished)
    read = registry.get_sample_value
    assert read("txpypi_requests_created", {"route": "project", "code": "200"}) == 100.0
    assert read("txpypi_requests_created", {"route": "file", "code": "200"}) == 200.0
    assert read("txpypi_cache_answers_created", {"kind": "page", "result": "miss"}) == 200.0
    assert read("txpypi_request_duration_seconds_created", {"route": "project"}) == 100.0

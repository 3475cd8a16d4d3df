"""
L{txpypi.web.carried}: a worker's counters across its restarts.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.threads import deferToThread

from txpypi.web.carried import CarriedCounters, carried_path
from txpypi.web.metrics import Metrics


def worker(requests: int, in_flight: float) -> Metrics:
    """
    The metrics of a worker that answered C{requests} files and has
    C{in_flight} downloads going on.
    """
    metrics = Metrics.create()
    for _ in range(requests):
        metrics.finished.count("file", "200", 0.002, "HIT", 100)
    metrics.upstream.labels("upstream", "file", "ok").inc(requests)
    metrics.watch(lambda: {"txpypi_downloads_in_flight": in_flight, "txpypi_cache_bytes": 1000.0})
    return metrics


def sample(text: bytes, name: str) -> float:
    found = re.search(rb"^" + re.escape(name.encode()) + rb" (\S+)$", text, re.M)
    assert found is not None, name
    return float(found.group(1))


REQUESTS = 'txpypi_requests_total{code="200",route="file"}'
LATENCY = 'txpypi_request_duration_seconds_count{route="file"}'
UPSTREAM = 'txpypi_upstream_requests_total{kind="file",outcome="ok",upstream="upstream"}'


@pytest_twisted.ensureDeferred
async def test_a_worker_started_again_carries_on_from_the_last_report(tmp_path: Path) -> None:
    """
    Each report is written before it is given; the next worker in the same
    place adds the counters and histograms of the last one (not its
    gauges) to its own, and so on down the restarts.
    """
    path = carried_path(str(tmp_path), 1)
    assert path == tmp_path / "tmp" / "metrics" / "w1"
    first = CarriedCounters.load(path, deferToThread)
    assert first.before is None
    given = await first.report(worker(3, 4.0).render)
    assert path.read_bytes() == given
    assert sample(given, REQUESTS) == 3.0

    second = CarriedCounters.load(path, deferToThread)
    given = await second.report(worker(1, 1.0).render)
    assert path.read_bytes() == given
    assert sample(given, REQUESTS) == 4.0
    assert sample(given, LATENCY) == 4.0
    assert sample(given, UPSTREAM) == 4.0
    assert sample(given, "txpypi_downloads_in_flight") == 1.0  # this worker's own, not 5
    assert sample(given, "txpypi_cache_bytes") == 1000.0

    third = CarriedCounters.load(path, deferToThread)
    given = await third.report(worker(0, 0.0).render)
    assert sample(given, REQUESTS) == 4.0
    assert sample(given, "txpypi_downloads_in_flight") == 0.0


@pytest_twisted.ensureDeferred
async def test_reports_are_written_one_after_the_other(tmp_path: Path) -> None:
    """
    A report waits for the write of the one before it, so that the file
    ends with the latest: a worker started again never starts below what
    was given.
    """
    writes: list[tuple[Deferred[None], Any, tuple[Any, ...]]] = []

    def run(f: Any, *args: Any) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        writes.append((d, f, args))
        return d

    path = carried_path(str(tmp_path), 0)
    carried = CarriedCounters.load(path, run)
    made: list[int] = []

    def own(n: int) -> Any:
        return lambda: made.append(n) or worker(n, 0.0).render()

    one = Deferred.fromCoroutine(carried.report(own(1)))
    two = Deferred.fromCoroutine(carried.report(own(2)))
    assert made == [1] and len(writes) == 1  # the second waits
    d, f, args = writes.pop()
    f(*args)
    d.callback(None)
    assert sample(await one, REQUESTS) == 1.0
    assert made == [1, 2] and len(writes) == 1
    d, f, args = writes.pop()
    f(*args)
    d.callback(None)
    assert sample(await two, REQUESTS) == 2.0
    assert sample(path.read_bytes(), REQUESTS) == 2.0


@pytest_twisted.ensureDeferred
async def test_an_unreadable_file_or_a_failed_write_costs_only_the_carrying(tmp_path: Path) -> None:
    """
    A file that is not metrics starts the worker from zero; a write that
    fails still gives the figures.
    """
    path = carried_path(str(tmp_path), 0)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"\xff not metrics\n")
    carried = CarriedCounters.load(path, deferToThread)
    assert carried.before is None

    def failing(f: Any, *args: Any) -> Deferred[None]:
        return deferToThread(_fail)

    carried = CarriedCounters(path, failing)
    given = await carried.report(worker(2, 0.0).render)
    assert sample(given, REQUESTS) == 2.0
    assert path.read_bytes() == b"\xff not metrics\n"


def _fail() -> None:
    raise OSError(28, "No space left on device")


@pytest_twisted.ensureDeferred
async def test_the_others_count_with_the_last_figures_they_gave(tmp_path: Path) -> None:
    """
    For the totals, each other worker counts with its file (the last
    figures it gave anyone), even when the answer gathered here is older
    (a sibling that did not answer now, or a gathering reused); with no
    file, with the answer; with neither, not at all.
    """
    here = carried_path(str(tmp_path), 0)
    others = tuple(carried_path(str(tmp_path), i) for i in (1, 2, 3))
    one = CarriedCounters.load(others[0], deferToThread)
    given = await one.report(worker(5, 0.0).render)  # to someone else, after...
    old_answer = worker(3, 0.0).render()  # ...this answer was gathered here
    carried = CarriedCounters.load(here, deferToThread, others)
    answers = [(old_answer, False), (worker(2, 0.0).render(), False), (None, False)]
    found = await carried.latest(answers)
    assert [sample(text, REQUESTS) for text in found] == [5.0, 2.0]
    assert found[0] == given

"""
Downloads are bounded: at most --max-downloads at a time (the rest wait
for a slot, then 503 with Retry-After), their bytes count towards
--max-cache-size before they land, and an upstream that sends slower than
--min-download-rate is given up.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.task import Clock
from twisted.web.client import Agent, HTTPConnectionPool, ResponseDone, readBody

from tests.conftest import Served, get_reactor
from tests.fetch.test_flight import DATA, harness
from tests.integration.test_proxy import find, header
from tests.web.test_file_answers import fetch
from txpypi.cache.slots import Busy, Slots
from txpypi.testing import Dist

GAMMA = "gamma-0.5-py3-none-any.whl"
BIG = "big-1.0-py3-none-any.whl"
BETA = "beta-1.1-py3-none-any.whl"


def fired(d: Deferred[Any]) -> list[Any]:
    out: list[Any] = []
    d.addBoth(out.append)
    return out


def test_slots_queue_in_order_and_time_out() -> None:
    clock = Clock()
    slots = Slots(clock, limit=2)
    a, b = fired(slots.acquire(5)), fired(slots.acquire(5))
    c, d, e = fired(slots.acquire(5)), fired(slots.acquire(5)), fired(slots.acquire(1))
    assert a == [None] and b == [None] and c == d == e == []
    slots.release()
    assert c == [None] and d == []  # first come, first served
    clock.advance(1)
    assert len(e) == 1 and e[0].check(Busy)  # waited its timeout
    assert e[0].value.retry_after > 0
    slots.limit = 3
    assert d == [None] and slots.running == 3
    for _ in range(3):
        slots.release()
    assert slots.running == 0 and clock.getDelayedCalls() == []


def test_a_waiter_that_leaves_leaves_the_queue() -> None:
    clock = Clock()
    slots = Slots(clock, limit=1)
    slots.acquire(5)
    waiting = slots.acquire(5)
    waiting.addErrback(lambda f: f.trap(CancelledError, Busy))
    waiting.cancel()
    assert slots.waiting == 0  # out of the line at once
    slots.release()
    assert slots.running == 0 and clock.getDelayedCalls() == []


@pytest_twisted.ensureDeferred
async def test_over_max_downloads_a_client_waits_then_gets_503(
    json_upstream: Served, proxy_factory: Any, dists: list[Dist]
) -> None:
    """
    With one download slot: a second file waits for it; when the first
    download takes longer than --response-timeout the second client gets a
    one-line 503 with Retry-After (and no cache headers), and once the slot
    is free the file downloads.  A client joining the running download
    needs no slot.
    """
    running = proxy_factory(json_upstream.url, max_downloads=1, response_timeout=1.0)
    gate: Deferred[None] = Deferred()
    json_upstream.fake.holds[BIG] = gate
    agent = Agent(get_reactor(), pool=HTTPConnectionPool(get_reactor(), persistent=False))
    first = await agent.request(b"GET", f"{running.url}/files/big/{BIG}".encode())
    joined = await agent.request(b"GET", f"{running.url}/files/big/{BIG}".encode())
    response, body = await fetch(f"{running.url}/files/gamma/{GAMMA}")
    assert response.code == 503 and b"downloads are in progress" in body
    assert header(response, "retry-after") == "5" and header(response, "cache-control") == "no-store"
    assert json_upstream.fake.requests["/packages/" + GAMMA] == 0
    queued = fetch(f"{running.url}/files/beta/{BETA}")  # waits for the slot...
    gate.callback(None)  # ...which the first download gives back
    assert await readBody(first) == find(dists, BIG).content
    assert await readBody(joined) == find(dists, BIG).content
    response, body = await queued
    assert response.code == 200 and body == find(dists, BETA).content


@pytest_twisted.ensureDeferred
async def test_a_download_counts_towards_the_size_limit_before_it_lands(
    json_upstream: Served, proxy_factory: Any, dists: list[Dist]
) -> None:
    """
    The cache holds one file; a download starts whose size would take the
    cache over --max-cache-size: the old file is evicted while the new one
    is still downloading, not after it landed.
    """
    gamma, big = find(dists, GAMMA).content, find(dists, BIG).content
    running = proxy_factory(json_upstream.url, max_cache_size=len(gamma) + len(big) - 1)
    files = running.proxy.files
    await fetch(f"{running.url}/files/gamma/{GAMMA}")
    await files.wait_idle()
    assert files.usage.size == len(gamma)
    gate: Deferred[None] = Deferred()
    json_upstream.fake.holds[BIG] = gate
    agent = Agent(get_reactor(), pool=HTTPConnectionPool(get_reactor(), persistent=False))
    response = await agent.request(b"GET", f"{running.url}/files/big/{BIG}".encode())
    await files.usage.wait_evicted()
    assert (
        files.downloads.flights and files.usage.evictions == 1 and files.usage.size == 0
    )  # big has not landed
    assert files.usage.spooling() == len(big)
    gate.callback(None)
    assert await readBody(response) == big
    await files.wait_idle()
    assert files.usage.size == len(big) and files.usage.spooling() == 0


def test_an_upstream_slower_than_the_minimum_rate_is_given_up(tmp_path: Path) -> None:
    """
    A slow drip (a few bytes per --read-timeout, so the idle timer never
    fires) fails after one window with a 504 naming the rate; nothing is
    cached.
    """
    h = harness(tmp_path, min_rate=100.0)  # 500 bytes per 5 s window
    for _ in range(5):
        h.response.send(DATA[:1])
        h.clock.advance(0.9)
    assert h.flight.failure is None
    h.clock.advance(0.6)
    assert h.flight.failure is not None and h.flight.failure.status == 504
    assert "too slow" in h.flight.failure.reason and h.landed == [None]


def test_an_upstream_at_the_minimum_rate_goes_on(tmp_path: Path) -> None:
    h = harness(tmp_path, min_rate=50.0)  # 250 bytes per 5 s window
    for second in range(10):  # 60 bytes a second, over two windows
        h.response.send(DATA[second * 60 : second * 60 + 60])
        h.clock.advance(1)
    assert h.flight.failure is None
    h.response.send(DATA[600:])
    h.response.end(ResponseDone())
    assert h.flight.verified and h.landed and h.landed[0] is not None


@pytest.mark.parametrize("value, expected", [("0", 0.0), ("1K", 1024.0), ("100", 100.0)])
def test_min_download_rate_option(value: str, expected: float) -> None:
    from txpypi.tap import Options

    options = Options()
    options.parseOptions(["--min-download-rate", value, "--max-downloads", "3"])
    assert options.settings.min_download_rate == expected and options.settings.max_downloads == 3


def test_a_download_that_cannot_start_gives_its_slot_back(tmp_path: Path, dists: list[Dist]) -> None:
    """
    The spool file cannot be created (no directory, no descriptors left):
    the request fails, and the slot is given back once, not twice.
    """
    from tests.web.test_file_answers import world

    w = world(tmp_path, dists)
    w.files.downloads.slots.limit = 1
    os.rmdir(w.spool)
    request, _ = w.get(f"/files/gamma/{GAMMA}")
    assert request.finished and request.code == 503
    assert w.files.downloads.slots.running == 0 and not w.files.downloads.flights
    w.spool.mkdir()
    request, _ = w.get(f"/files/gamma/{GAMMA}")
    assert request.finished and request.code == 200 and w.files.downloads.slots.running == 0


def test_a_client_that_leaves_leaves_the_queue_for_a_slot(tmp_path: Path, dists: list[Dist]) -> None:
    """
    With one slot busy, a request for another file waits; its client leaves:
    it is out of the queue, and no download starts for it when the slot is
    free again.
    """
    from tests.web.test_file_answers import gone, world

    w = world(tmp_path, dists)
    w.files.downloads.slots.limit = 1
    rest: Deferred[None] = Deferred()
    w.fake.holds[BIG] = rest
    first, _ = w.get(f"/files/big/{BIG}")
    waiting, _ = w.get(f"/files/gamma/{GAMMA}")
    assert w.files.downloads.slots.running == 1 and w.files.downloads.slots.waiting == 1
    gone(waiting)
    assert w.files.downloads.slots.waiting == 0
    rest.callback(None)
    w.agent.flush()
    assert first.finished and w.files.downloads.slots.running == 0
    assert w.fake.requests["/packages/" + GAMMA] == 0  # nobody wanted it any more


def test_a_page_that_drips_is_given_up() -> None:
    """
    An index page that comes a byte a second (the idle timer never fires)
    fails after one --read-timeout window under --min-download-rate.
    """
    from twisted.internet.error import TimeoutError as Timeout

    from txpypi.fetch.pagebody import PageBody

    clock = Clock()
    collect = PageBody(clock, 5.0, min_rate=100.0)
    out = fired(collect.done)
    for _ in range(4):
        collect.dataReceived(b"x")
        clock.advance(1)
    assert out == []
    clock.advance(1)
    assert len(out) == 1 and out[0].check(Timeout) and "under 100 bytes/s" in str(out[0].value)
    assert clock.getDelayedCalls() == []
    fast = PageBody(clock, 5.0, min_rate=100.0)
    for _ in range(10):
        fast.dataReceived(b"x" * 200)
        clock.advance(1)
    assert not fast.done.called

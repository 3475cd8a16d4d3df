"""
Worker processes share pages through the metadata store and one lock per
page (L{txpypi.storage.filelocks.FileLocks}): here two page caches stand
for two workers, each with its own locks on one directory (so that their
C{flock}s exclude each other as two processes' do), on a L{Clock}.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
from treq.testing import RequestTraversalAgent
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from txpypi.cache.coordinator import SharedCoordinator
from txpypi.cache.pages import HIT, MISS, SHARED_WAIT_MOST, PageCache
from txpypi.fetch.upstream import Upstream, UpstreamClient, UpstreamError
from txpypi.storage.filelocks import FileLocks
from txpypi.storage.metadata import MemoryMetadata
from txpypi.testing import FakeUpstream, build_wheel

UPSTREAM = "http://upstream.test/simple/"
PAGE = "/simple/alpha/"


class Worker:
    def __init__(
        self, fake: FakeUpstream, clock: Clock, metadata: MemoryMetadata, locks: Path, n: int
    ) -> None:
        self.agent = RequestTraversalAgent(fake)
        client = UpstreamClient(clock, agent=self.agent)
        shared = SharedCoordinator(FileLocks(locks, owner=f"worker {n}"), metadata, clock)
        self.pages = PageCache(clock, client, metadata, Upstream("test", UPSTREAM), shared=shared)


@pytest.fixture
def two(tmp_path: Path) -> tuple[FakeUpstream, Clock, Worker, Worker]:
    fake = FakeUpstream([build_wheel("alpha", "1.0")])
    clock, metadata = Clock(), MemoryMetadata()
    return fake, clock, *(Worker(fake, clock, metadata, tmp_path / "locks", n) for n in (0, 1))  # type: ignore[return-value]


def outcome(d: Deferred[Any]) -> list[Any]:
    out: list[Any] = []
    d.addBoth(out.append)
    return out


def test_one_fetch_while_the_other_worker_waits(two: tuple[FakeUpstream, Clock, Worker, Worker]) -> None:
    """
    The second worker's client waits while the first fetches, then takes
    the stored copy: the upstream is asked once.
    """
    fake, clock, first, second = two
    gate: Deferred[None] = Deferred()
    fake.page_holds["alpha"] = gate
    a = outcome(Deferred.fromCoroutine(first.pages.get("alpha")))
    b = outcome(Deferred.fromCoroutine(second.pages.get("alpha")))
    for _ in range(20):
        clock.advance(SHARED_WAIT_MOST)
    assert (a, b) == ([], [])  # the second waits as long as the first fetches
    assert fake.requests[PAGE] == 1
    gate.callback(None)
    first.agent.flush()
    assert a and a[0][1] == MISS
    clock.advance(SHARED_WAIT_MOST)
    assert b and b[0][1] == MISS  # answered from the other worker's fetch
    assert b[0][0].model == a[0][0].model
    assert fake.requests[PAGE] == 1
    # And it is in the second worker's memory now: a hit.
    again = outcome(Deferred.fromCoroutine(second.pages.get("alpha")))
    assert again[0][1] == HIT


def test_a_failed_fetch_is_tried_again_by_the_waiting_worker(
    two: tuple[FakeUpstream, Clock, Worker, Worker],
) -> None:
    """
    The first worker's fetch fails: the second, which waited, fetches the
    page itself (the failure does not spread), and the lock is free after.
    """
    fake, clock, first, second = two
    fake.page_faults["alpha"] = "500"
    a = outcome(Deferred.fromCoroutine(first.pages.get("alpha")))
    assert a and a[0].check(UpstreamError)
    del fake.page_faults["alpha"]
    gate: Deferred[None] = Deferred()
    fake.page_holds["alpha"] = gate
    b = outcome(Deferred.fromCoroutine(second.pages.get("alpha")))
    c = outcome(Deferred.fromCoroutine(first.pages.get("alpha")))
    gate.callback(None)
    second.agent.flush()
    assert b and b[0][1] == MISS
    clock.advance(SHARED_WAIT_MOST)
    assert c and c[0][1] == MISS
    assert fake.requests[PAGE] == 2  # the failed one, and the second worker's


def test_file_locks_exclude_each_other_and_die_with_the_holder(tmp_path: Path) -> None:
    """
    Two holders on one directory: one at a time; the other reads who holds
    it; released, it is free again; a holder's closed descriptor (as at a
    process's death) frees it too.
    """
    one, two = FileLocks(tmp_path, owner="one http://a/"), FileLocks(tmp_path, owner="two")
    assert outcome(one.acquire("k", 30)) == [True]
    assert outcome(two.acquire("k", 30)) == [False]
    assert outcome(one.acquire("k", 30)) == [False]  # held here already
    assert outcome(two.holder("k")) == ["one http://a/"]
    assert outcome(one.renew("k", 30)) == [True] and outcome(two.renew("k", 30)) == [False]
    one.release("k")
    assert outcome(two.holder("k")) == [None]
    assert outcome(two.acquire("k", 30)) == [True]
    # A process that dies closes its descriptors: the kernel lets go.
    os.close(two._held.pop("k"))
    assert outcome(one.acquire("k", 30)) == [True]
    one.release_all()
    assert list(tmp_path.iterdir()) == []


def test_a_waiting_worker_fetches_itself_past_the_response_timeout(
    two: tuple[FakeUpstream, Clock, Worker, Worker],
) -> None:
    """
    The first worker's fetch hangs: the second waits at most a response
    timeout, then fetches the page itself.
    """
    fake, clock, first, second = two
    gate: Deferred[None] = Deferred()
    fake.page_holds["alpha"] = gate
    outcome(Deferred.fromCoroutine(first.pages.get("alpha")))
    b = outcome(Deferred.fromCoroutine(second.pages.get("alpha")))
    timeout = second.pages._client.response_timeout
    clock.pump([SHARED_WAIT_MOST] * int(timeout / SHARED_WAIT_MOST - 2))
    assert fake.requests[PAGE] == 1  # still waiting
    clock.pump([SHARED_WAIT_MOST] * 4)
    assert fake.requests[PAGE] == 2  # its own fetch
    gate.callback(None)
    first.agent.flush()
    second.agent.flush()
    assert b and b[0][1] == MISS

"""
Index freshness on a L{Clock}: fresh, revalidated with its validators,
stale if the upstream fails, and offline.
"""

from __future__ import annotations

import pytest
from treq.testing import RequestTraversalAgent
from twisted.internet.task import Clock

from tests.cache.test_pages import result
from txpypi.cache.pages import PageCache
from txpypi.fetch.upstream import Upstream, UpstreamClient
from txpypi.storage.metadata import IMetadata, MemoryMetadata
from txpypi.testing import FakeUpstream, build_wheel


def page_cache(fake: FakeUpstream, clock: Clock, metadata: IMetadata) -> PageCache:
    client = UpstreamClient(clock, agent=RequestTraversalAgent(fake))
    return PageCache(clock, client, metadata, Upstream("test", "http://upstream.test/simple"))


def test_page_freshness_follows_the_clock() -> None:
    """
    A page is a hit until C{index-ttl} seconds passed, then fetched again.
    """
    fake = FakeUpstream([build_wheel("alpha", "1.0")])
    clock = Clock()
    pages = page_cache(fake, clock, MemoryMetadata())
    page, state = result(pages.get("alpha"))
    assert state == "MISS" and fake.requests["/simple/alpha/"] == 1
    assert pages.remaining(page) == 600
    clock.advance(599)
    assert result(pages.get("alpha"))[1] == "HIT"
    assert pages.remaining(page) == 1
    assert pages.fresh_left("alpha") == (page, 1)  # the quick lane's one call for both
    clock.advance(2)
    assert pages.fresh("alpha") is None and pages.fresh_left("alpha") is None
    again, state = result(pages.get("alpha"))
    assert state == "MISS" and again is not page and fake.requests["/simple/alpha/"] == 2


def test_stored_pages_are_used_after_a_restart() -> None:
    fake = FakeUpstream([build_wheel("alpha", "1.0")])
    clock = Clock()
    metadata = MemoryMetadata()
    result(page_cache(fake, clock, metadata).get("alpha"))
    clock.advance(100)
    fresh_process = page_cache(fake, clock, metadata)
    page, state = result(fresh_process.get("alpha"))
    assert state == "HIT" and fresh_process.remaining(page) == 500
    assert fake.requests["/simple/alpha/"] == 1


def test_expired_page_is_revalidated_with_its_validators() -> None:
    fake = FakeUpstream([build_wheel("alpha", "1.0")])
    clock = Clock()
    metadata = MemoryMetadata()
    pages = page_cache(fake, clock, metadata)
    first, _ = result(pages.get("alpha"))
    clock.advance(601)
    again, state = result(pages.get("alpha"))
    assert state == "MISS" and fake.not_modified == 1 and fake.requests["/simple/alpha/"] == 2
    assert again.json is first.json and pages.remaining(again) == 600
    assert metadata.pages[again.key].fetched_at == 601


def test_stale_if_error_then_give_up() -> None:
    from txpypi.fetch.upstream import UpstreamError

    fake = FakeUpstream([build_wheel("alpha", "1.0")])
    clock = Clock()
    pages = page_cache(fake, clock, MemoryMetadata())
    pages.stale_ttl = 3600
    first, _ = result(pages.get("alpha"))
    fake.page_faults["alpha"] = "500"
    clock.advance(600 + 3599)
    page, state = result(pages.get("alpha"))
    assert state == "STALE" and page is first and pages.age(page) == 4199
    clock.advance(2)
    with pytest.raises(UpstreamError):
        result(pages.get("alpha"))
    pages.stale_ttl = 0  # off: errors are never hidden
    clock.advance(-2000)
    with pytest.raises(UpstreamError):
        result(pages.get("alpha"))


def test_offline_serves_what_is_cached_and_asks_nobody() -> None:
    from txpypi.cache.pages import NotFound

    fake = FakeUpstream([build_wheel("alpha", "1.0"), build_wheel("beta", "1.0")])
    clock = Clock()
    metadata = MemoryMetadata()
    result(page_cache(fake, clock, metadata).get("alpha"))
    offline = page_cache(fake, clock, metadata)
    offline.offline = True
    clock.advance(10**7)
    page, state = result(offline.get("alpha"))
    assert state == "STALE"
    with pytest.raises(NotFound):
        result(offline.get("beta"))
    assert fake.requests["/simple/alpha/"] == 1 and "/simple/beta/" not in fake.requests

"""
The coordinator decides who downloads each file: one contract that the
local coordinator and the Redis one (on a real redis-server) both keep,
then what only a cluster does (follow the holder, wait for the landing,
take over from a peer that failed, one evicting instance at a time).

Redis answers over real sockets; the coordinator's own waiting (its lock
polls, how long a failed peer is avoided) runs on a L{Clock} advanced by
hand.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock, deferLater
from zope.interface.verify import verifyObject

from tests.conftest import get_reactor
from txpypi.cache.coordinator import ICoordinator, LocalCoordinator, SharedCoordinator
from txpypi.core.peer import owner_id
from txpypi.fetch.wanted import Peer
from txpypi.storage.metadata import FileRecord, MemoryMetadata

KEY = "default/alpha/alpha-1.0-py3-none-any.whl"
PATH = "/_peer/default/alpha/alpha-1.0-py3-none-any.whl"
SECRET = "0123456789abcdef-cluster"
RECORD = FileRecord(KEY, "u", "u/alpha-1.0.whl", "aa" * 32, 3, "aa/x/alpha-1.0.whl", 1.0)


@attrs.define
class Here:
    """
    What the instance knows without asking: records in memory, downloads
    in progress.
    """

    records: dict[str, FileRecord] = attrs.field(factory=dict)
    downloading: set[str] = attrs.field(factory=set)

    def remembered(self, key: str) -> FileRecord | None:
        return self.records.get(key)

    def fetching(self, key: str) -> bool:
        return key in self.downloading


async def settled(d: Deferred[Any], clock: Clock | None = None, step: float = 0.0) -> Any:
    """
    The result of C{d}, letting the real reactor carry the Redis I/O and
    advancing C{clock} by C{step} (0: not at all) whenever it has a timer;
    fails the test when C{d} does not fire within a bounded number of turns.
    """
    from twisted.internet import reactor

    for _ in range(2000):
        if d.called:
            return await d
        if clock is not None and step and clock.getDelayedCalls():
            clock.advance(step)
        await deferLater(reactor, 0.001)  # type: ignore[arg-type]
    raise AssertionError("it never fired")


@attrs.define
class Cluster:
    """
    Coordinators on one Redis (or local ones), on one clock and one
    metadata store.
    """

    clock: Clock
    metadata: MemoryMetadata
    url: str | None = None
    connections: list[Any] = attrs.field(factory=list)

    def coordinator(self, name: str = "one", peer_url: str | None = None, **kwargs: Any) -> Any:
        if self.url is None:
            return LocalCoordinator()
        from txpypi.storage.redismeta import RedisLocks, connect

        redis = connect(self.url)
        self.connections.append(redis)
        # The Redis calls are bounded in real time; the coordinator waits on the test clock.
        locks = RedisLocks(redis, owner=owner_id(name, peer_url), clock=get_reactor())
        return SharedCoordinator(locks, self.metadata, self.clock, peer_url, **kwargs)


@pytest.fixture(params=["local", "redis"])
def cluster(request: pytest.FixtureRequest) -> Iterator[Cluster]:
    url = request.getfixturevalue("redis_server").url if request.param == "redis" else None
    running = Cluster(Clock(), MemoryMetadata(), url)
    yield running
    for redis in running.connections:
        pytest_twisted.blockon(redis.disconnect())


# -- the contract


def test_it_provides_the_interface(cluster: Cluster) -> None:
    assert verifyObject(ICoordinator, cluster.coordinator())


def test_only_the_file_locks_of_workers_take_notes(cluster: Cluster, tmp_path: Path) -> None:
    """
    Alone or over Redis nobody reads a download's spool note (so its start
    is not waited for to leave one); over the workers' file locks, the
    followers of this machine do.
    """
    from txpypi.storage.filelocks import FileLocks

    assert not cluster.coordinator().takes_notes
    workers = SharedCoordinator(FileLocks(tmp_path, owner="w0"), cluster.metadata, cluster.clock)
    assert workers.takes_notes


@pytest_twisted.ensureDeferred
async def test_a_claim_of_a_file_nobody_fetches_leads(cluster: Cluster) -> None:
    assert await settled(cluster.coordinator().claim(KEY, PATH, Here())) is None


@pytest_twisted.ensureDeferred
async def test_claims_made_at_once_share_one_answer(cluster: Cluster) -> None:
    """
    Two requests of this instance for one file: one lead, not one lead
    and one waiting for itself.
    """
    coordinator, here = cluster.coordinator(), Here()
    first, second = coordinator.claim(KEY, PATH, here), coordinator.claim(KEY, PATH, here)
    assert [await settled(first), await settled(second)] == [None, None]


@pytest_twisted.ensureDeferred
async def test_a_claim_while_the_file_downloads_here_joins_it(cluster: Cluster) -> None:
    coordinator, here = cluster.coordinator(), Here()
    assert await settled(coordinator.claim(KEY, PATH, here)) is None
    here.downloading.add(KEY)  # the leader started its download
    assert await settled(coordinator.claim(KEY, PATH, here)) is None


@pytest_twisted.ensureDeferred
async def test_a_released_claim_can_be_claimed_again(cluster: Cluster) -> None:
    coordinator, here = cluster.coordinator(), Here()
    assert await settled(coordinator.claim(KEY, PATH, here)) is None
    coordinator.release(KEY)  # its download is over, and did not land
    again = coordinator.claim(KEY, PATH, here)
    assert await settled(again, cluster.clock, 0.2) is None
    assert not cluster.clock.getDelayedCalls()  # it did not wait for anyone


@pytest_twisted.ensureDeferred
async def test_a_name_is_taken_once_until_released(cluster: Cluster) -> None:
    coordinator = cluster.coordinator()
    assert await settled(coordinator.take("evict/default")) is True
    assert await settled(coordinator.take("evict/default")) is False
    assert await settled(coordinator.take("evict/other")) is True
    coordinator.renew()  # what is held stays held
    assert await settled(coordinator.take("evict/default")) is False
    coordinator.release("evict/default")
    coordinator.release("never-taken")  # harmless
    for _ in range(100):  # a release on Redis is sent, not waited for
        if await settled(coordinator.take("evict/default")):
            break
    else:
        raise AssertionError("never released")


# -- only a cluster


@pytest.fixture
def redis_cluster(redis_server: Any) -> Iterator[Cluster]:
    running = Cluster(Clock(), MemoryMetadata(), redis_server.url)
    yield running
    for redis in running.connections:
        pytest_twisted.blockon(redis.disconnect())


@pytest_twisted.ensureDeferred
async def test_a_file_that_landed_is_told_not_fetched(redis_cluster: Cluster) -> None:
    await redis_cluster.metadata.put_file(RECORD)
    assert await settled(redis_cluster.coordinator().claim(KEY, PATH, Here())) == RECORD


@attrs.define
class CountedMetadata(MemoryMetadata):
    """
    The metadata store, counting the look-ups of files.
    """

    looks: int = 0

    def get_file(self, key: str) -> Deferred[FileRecord | None]:
        self.looks += 1
        return super().get_file(key)


@pytest_twisted.ensureDeferred
async def test_a_claim_after_a_look_skips_its_own_first_look(redis_server: Any) -> None:
    """
    A claim told that its caller just looked the store up goes to the lock
    at once (one trip to the store less before a miss's first byte), and
    still tells a record that landed in between once it holds the lock.
    """
    metadata = CountedMetadata()
    running = Cluster(Clock(), metadata, redis_server.url)
    try:
        assert await settled(running.coordinator().claim(KEY, PATH, Here(), looked=True)) is None
        assert metadata.looks == 1  # only the look once the lock was taken
        landed = attrs.evolve(RECORD, key=KEY + ".2")
        await metadata.put_file(landed)  # landed after the caller's look
        metadata.looks = 0
        assert (
            await settled(running.coordinator("two").claim(landed.key, PATH, Here(), looked=True)) == landed
        )
        assert metadata.looks == 1
        metadata.looks = 0
        assert await settled(running.coordinator("three").claim(landed.key, PATH, Here())) == landed
        assert metadata.looks == 1  # not told: it looks first, and the record is there
    finally:
        for redis in running.connections:
            await redis.disconnect()


@pytest_twisted.ensureDeferred
async def test_without_peers_the_others_wait_for_the_landing(redis_cluster: Cluster) -> None:
    one, two = redis_cluster.coordinator("one"), redis_cluster.coordinator("two", lock_poll=0.5)
    assert await settled(one.claim(KEY, PATH, Here())) is None
    waiting = two.claim(KEY, PATH, Here())
    for _ in range(3):  # it polls the lock on its clock, and waits
        await settled(deferLater(redis_cluster.clock, 0.5), redis_cluster.clock, 0.5)
    assert not waiting.called
    await redis_cluster.metadata.put_file(RECORD)  # one's download landed
    assert await settled(waiting, redis_cluster.clock, 0.5) == RECORD


@pytest_twisted.ensureDeferred
async def test_with_peers_the_others_follow_the_holder_unless_it_just_failed(redis_cluster: Cluster) -> None:
    one = redis_cluster.coordinator("one", peer_url="http://10.0.0.1:5000/", peer_secret=SECRET)
    two = redis_cluster.coordinator("two", peer_url="http://10.0.0.2:5000", peer_secret=SECRET, lock_ttl=30.0)
    assert await settled(one.claim(KEY, PATH, Here())) is None
    peer = await settled(two.claim(KEY, PATH, Here()))
    assert peer == Peer("http://10.0.0.1:5000" + PATH, PATH, SECRET)
    two.follow_failed(KEY)
    retry = two.claim(KEY, PATH, Here())
    await settled(deferLater(redis_cluster.clock, 10.0), redis_cluster.clock, 0.2)
    assert not retry.called  # not the failed peer again, not yet
    assert await settled(retry, redis_cluster.clock, 1.0) == peer  # past the lock TTL: again
    # The holder never follows itself: it waits (for its own download to
    # start here, or to land).
    mine = one.claim(KEY, PATH, Here())
    await settled(deferLater(redis_cluster.clock, 2.0), redis_cluster.clock, 0.2)
    assert not mine.called


@pytest_twisted.ensureDeferred
async def test_one_instance_at_a_time_takes_a_name(redis_cluster: Cluster) -> None:
    one, two = redis_cluster.coordinator("one"), redis_cluster.coordinator("two")
    assert await settled(one.take("evict/default")) is True
    assert await settled(two.take("evict/default")) is False
    one.release("evict/default")
    for _ in range(100):
        if await settled(two.take("evict/default")):
            break
    else:
        raise AssertionError("never released")


@pytest_twisted.ensureDeferred
async def test_renewing_extends_the_locks_held(redis_cluster: Cluster) -> None:
    one = redis_cluster.coordinator("one", lock_ttl=1.0)
    assert await settled(one.take("evict/default")) is True
    one.lock_ttl = 600.0
    one.renew()
    redis = redis_cluster.connections[0]
    for _ in range(100):
        left = await settled(redis.execute_command("PTTL", "txpypi:lock:evict/default"))
        if left > 1000:
            break
    else:
        raise AssertionError(f"not renewed: {left} ms left")


def test_a_loopback_peer_is_followed_only_from_its_own_machine() -> None:
    """
    A worker with --redis but no --peer-url publishes a loopback URL: the
    workers of its machine follow it, other machines wait for the landing.
    """
    import socket

    from txpypi.cache.coordinator import _reachable

    here, url = socket.gethostname(), "http://127.0.0.1:4000/"
    assert _reachable(url, f"{here}:12:abc {url}")
    assert not _reachable(url, f"elsewhere:12:abc {url}")
    assert not _reachable("http://localhost:4000/", "elsewhere:1:x http://localhost:4000/")
    assert _reachable("http://10.0.0.1:5000/", "elsewhere:1:x http://10.0.0.1:5000/")

"""
The cache's size against C{max-cache-size}, and eviction: the least
recently served files, only as many as it takes, their deletions asked of
the metadata store all at once rather than one round trip at a time.
"""

from __future__ import annotations

from pathlib import Path
from typing import cast

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from txpypi.cache.coordinator import LocalCoordinator
from txpypi.cache.pages import PageCache
from txpypi.cache.records import Records
from txpypi.cache.stats import DownloadStats
from txpypi.cache.usage import Usage
from txpypi.core.live import Live
from txpypi.storage.memory import MemoryStore
from txpypi.storage.metadata import FileRecord, MemoryMetadata


@attrs.define
class HeldDeletes(MemoryMetadata):
    """
    Memory metadata whose deletions wait until released, to see how many
    are asked for at once.
    """

    held: list[tuple[Deferred[FileRecord | None], str, FileRecord | None]] = attrs.field(factory=list)

    def delete_file(self, key: str, expected: FileRecord | None = None) -> Deferred[FileRecord | None]:
        d: Deferred[FileRecord | None] = Deferred()
        self.held.append((d, key, expected))
        return d

    def release(self) -> None:
        held, self.held = self.held, []
        for d, key, expected in held:
            MemoryMetadata.delete_file(self, key, expected).chainDeferred(d)


@attrs.frozen
class Group:
    group: str = "default"


def usage_of(metadata: MemoryMetadata, store: MemoryStore, max_size: int) -> tuple[Usage, Records]:
    records = Records()
    live = Live()
    live.max_cache_size = max_size
    usage = Usage(
        metadata,
        store,
        records,
        DownloadStats(Clock(), metadata),
        LocalCoordinator(),
        {},
        cast(PageCache, Group()),
        live=live,
    )
    return usage, records


def fill(metadata: MemoryMetadata, store: MemoryStore, records: Records | None, n: int) -> list[FileRecord]:
    made = []
    for i in range(n):
        record = FileRecord(f"default/p/p-{i}.whl", "up", "http://u/", "ab" * 32, 10, f"k{i}", float(i))
        metadata.files[record.key] = record
        metadata.accessed[record.key] = float(i)
        store.files[record.store_key] = b"x" * 10
        if records is not None:
            records.remember(record)
        made.append(record)
    return made


def test_only_what_it_takes_is_evicted_least_recent_first(tmp_path: Path) -> None:
    metadata, store = MemoryMetadata(), MemoryStore(str(tmp_path))
    usage, records = usage_of(metadata, store, max_size=75)
    made = fill(metadata, store, records, 10)
    usage.size, usage.count = 100, 10
    usage.maybe_evict()
    assert not usage.busy
    assert usage.size == 70 and usage.count == 7 and usage.evictions == 3
    assert sorted(metadata.files) == sorted(r.key for r in made[3:])
    assert sorted(store.files) == sorted(r.store_key for r in made[3:])
    assert [r.key for r in made[:3] if r.key in records] == []


def test_a_batchs_deletions_are_asked_for_at_once(tmp_path: Path) -> None:
    """
    All the deletions a batch needs are asked of the metadata store before
    the first answers: its thread runs them back to back.
    """
    metadata, store = HeldDeletes(), MemoryStore(str(tmp_path))
    usage, _ = usage_of(metadata, store, max_size=500)
    fill(metadata, store, None, 100)
    usage.size, usage.count = 1000, 100
    usage.maybe_evict()
    assert len(metadata.held) == 50
    metadata.release()
    assert not usage.busy
    assert usage.size == 500 and usage.evictions == 50


def test_a_record_replaced_meanwhile_is_not_counted_and_eviction_goes_on(tmp_path: Path) -> None:
    """
    A file that landed again while it was chosen is kept (its new record),
    and the next least recent one goes instead.
    """
    metadata, store = HeldDeletes(), MemoryStore(str(tmp_path))
    usage, _ = usage_of(metadata, store, max_size=95)
    made = fill(metadata, store, None, 3)
    usage.size, usage.count = 30 + 70, 3  # and 70 bytes elsewhere
    usage.maybe_evict()
    assert [key for _, key, _ in metadata.held] == [made[0].key]
    newer = attrs.evolve(made[0], cached_at=99.0)
    metadata.files[newer.key] = newer
    metadata.accessed[newer.key] = 99.0
    metadata.release()
    assert [key for _, key, _ in metadata.held] == [made[1].key]
    metadata.release()
    assert not usage.busy
    assert usage.size == 90 and usage.evictions == 1
    assert metadata.files[newer.key] == newer and made[1].key not in metadata.files


def test_a_failed_deletion_ends_the_eviction_after_the_others(tmp_path: Path) -> None:
    """
    One deletion failing does not leave the others of its batch unawaited:
    they are counted, then the eviction ends (logged) and may start again.
    """
    metadata, store = HeldDeletes(), MemoryStore(str(tmp_path))
    usage, _ = usage_of(metadata, store, max_size=80)
    fill(metadata, store, None, 10)
    usage.size, usage.count = 100, 10
    usage.maybe_evict()
    (d0, *_), *rest = metadata.held
    metadata.held = rest
    d0.errback(RuntimeError("disk I/O error"))
    metadata.release()
    assert not usage.busy
    assert usage.evictions == 1 and usage.size == 90


@attrs.define
class CountedUsage(MemoryMetadata):
    """
    Memory metadata that counts how often the size is read.
    """

    reads: int = 0

    def usage(self) -> Deferred[tuple[int, int]]:
        self.reads += 1
        return MemoryMetadata.usage(self)


def test_a_burst_of_landings_reads_the_shared_size_once_a_second(tmp_path: Path) -> None:
    """
    With a shared size (Redis, or the workers' one database), landings are
    counted here at once and the size read again at most once every
    SHARED_READ_EVERY seconds, not once per landing (each reading sums
    every record).
    """
    from txpypi.cache.usage import SHARED_READ_EVERY

    metadata, store, clock = CountedUsage(), MemoryStore(str(tmp_path)), Clock()
    usage = Usage(
        metadata,
        store,
        Records(),
        DownloadStats(clock, metadata),
        LocalCoordinator(),
        {},
        cast(PageCache, Group()),
        live=Live(),
        shared=True,
        clock=clock,
    )
    usage.size, usage.count = 0, 0
    made = fill(metadata, store, None, 10)
    for record in made[:5]:
        usage.landed(record, None)
    assert (usage.size, usage.count) == (50, 5)  # counted at once
    assert usage.busy
    clock.advance(0)
    assert metadata.reads == 1 and (usage.size, usage.count) == (100, 10)  # the database says
    for record in made[5:]:
        usage.landed(record, None)
    clock.advance(SHARED_READ_EVERY / 2)
    assert metadata.reads == 1  # not yet: a second after the last reading
    clock.advance(SHARED_READ_EVERY / 2)
    assert metadata.reads == 2 and not usage.busy

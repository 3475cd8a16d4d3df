"""
The records of the files served last, in memory: bounded, the oldest
forgotten first, and kept in a form the garbage collector need not walk.
"""

from __future__ import annotations

import gc

from txpypi.cache.records import Records
from txpypi.storage.metadata import FileRecord


def record(name: str, cached_at: float = 1.0) -> FileRecord:
    return FileRecord(f"g/{name}/{name}-1.whl", "up", f"http://u/{name}-1.whl", "ab" * 32, 10, "k", cached_at)


def test_a_remembered_record_reads_back_equal() -> None:
    records = Records()
    a = record("a")
    records.remember(a)
    assert records.get(a.key) == a
    assert records[a.key] == a
    assert a.key in records
    assert records.get("g/b/b-1.whl") is None
    assert dict(records) == {a.key: a}


def test_the_least_recently_remembered_go_first() -> None:
    records = Records(limit=2)
    a, b, c = record("a"), record("b"), record("c")
    records.remember(a)
    records.remember(b)
    records.remember(a)  # remembered again: now the newest
    records.remember(c)
    assert list(records) == [a.key, c.key]
    assert len(records) == 2


def test_forget_keeps_a_record_that_landed_meanwhile() -> None:
    records = Records()
    old, new = record("a", 1.0), record("a", 2.0)
    records.remember(new)
    records.forget(old)
    assert records.get(new.key) == new
    records.forget(new)
    assert new.key not in records
    records.remember(old)
    assert records.pop(old.key, None) == old
    assert records == {}


def test_kept_records_are_not_walked_by_the_collector() -> None:
    """
    What is kept holds only strings and numbers, which the collector stops
    tracking: a full collection does not visit each of 100,000 records.
    """
    records = Records()
    for i in range(100):
        records.remember(record(f"p{i}"))
    gc.collect()
    kept = records._rows
    assert not any(gc.is_tracked(row) for row in kept.values())

"""
The SQLite metadata database's schema: the upgrade of databases written by
earlier versions, the indexes the big queries use, and the connection's
settings.  (What every metadata store answers is in C{test_metadata.py}.)
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
import pytest_twisted
from twisted.python.threadpool import ThreadPool

from txpypi.storage.metadata import VERSION, FileRecord, SqliteMetadata, connect

#: The schema of version 1: no last_access.
V1 = """
CREATE TABLE pages (key TEXT PRIMARY KEY, upstream TEXT NOT NULL, url TEXT NOT NULL,
    body BLOB NOT NULL, fetched_at REAL NOT NULL, etag TEXT, last_modified TEXT);
CREATE TABLE files (key TEXT PRIMARY KEY, upstream TEXT NOT NULL, url TEXT NOT NULL,
    sha256 TEXT NOT NULL, size INTEGER NOT NULL, store_key TEXT NOT NULL, cached_at REAL NOT NULL);
CREATE TABLE downloads (project TEXT NOT NULL, version TEXT NOT NULL, filename TEXT NOT NULL,
    count INTEGER NOT NULL, PRIMARY KEY (project, version, filename));
PRAGMA user_version = 1;
"""

#: Version 2: last_access, indexed alone.
V2 = """
CREATE TABLE pages (key TEXT PRIMARY KEY, upstream TEXT NOT NULL, url TEXT NOT NULL,
    body BLOB NOT NULL, fetched_at REAL NOT NULL, etag TEXT, last_modified TEXT);
CREATE TABLE files (key TEXT PRIMARY KEY, upstream TEXT NOT NULL, url TEXT NOT NULL,
    sha256 TEXT NOT NULL, size INTEGER NOT NULL, store_key TEXT NOT NULL, cached_at REAL NOT NULL,
    last_access REAL NOT NULL DEFAULT 0);
CREATE INDEX files_by_access ON files (last_access);
CREATE TABLE downloads (project TEXT NOT NULL, version TEXT NOT NULL, filename TEXT NOT NULL,
    count INTEGER NOT NULL, PRIMARY KEY (project, version, filename));
PRAGMA user_version = 2;
"""


def old_database(path: Path, schema: str) -> None:
    """
    Write a database of an earlier version at C{path}, with three files and
    their downloads.
    """
    db = sqlite3.connect(path)
    db.executescript(schema)
    for name in ("c", "a", "b"):
        db.execute(
            "INSERT INTO files (key, upstream, url, sha256, size, store_key, cached_at)"
            " VALUES (?, 'up', 'http://u/', ?, 10, ?, 1.0)",
            (f"g/{name}/{name}-1.whl", name * 64, f"{name}/{name}-1.whl"),
        )
    db.executemany(
        "INSERT INTO downloads VALUES (?, ?, ?, ?)",
        [("a", "1", "a-1.whl", 2), ("a", "2", "a-2.whl", 3), ("b", "1", "b-1.whl", 4)],
    )
    db.commit()
    db.close()


def indexes(db: sqlite3.Connection) -> set[str]:
    return {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}


@pytest.fixture
def pool() -> Iterator[ThreadPool]:
    pool = ThreadPool(1, 1)
    pool.start()
    yield pool
    pool.stop()


def store(path: Path, pool: ThreadPool) -> SqliteMetadata:
    from twisted.internet import reactor

    return SqliteMetadata(path, pool, reactor)


@pytest.mark.parametrize("schema", [V1, V2], ids=["v1", "v2"])
def test_an_old_database_is_upgraded(tmp_path: Path, schema: str) -> None:
    """
    A database of version 1 or 2 gets last_access (1), the index on
    (last_access, key) instead of 2's, and each project's total from the
    downloads it holds; its records are kept.
    """
    path = tmp_path / "m.sqlite"
    old_database(path, schema)
    db = connect(path)
    assert db.execute("PRAGMA user_version").fetchone() == (VERSION,)
    assert "files_by_access_key" in indexes(db)
    assert "files_by_access" not in indexes(db)
    assert db.execute("SELECT project, count FROM project_downloads ORDER BY project").fetchall() == [
        ("a", 5),
        ("b", 4),
    ]
    assert db.execute("SELECT COUNT(*), SUM(last_access) FROM files").fetchone() == (3, 0)
    db.close()
    # Opened again: nothing is counted twice.
    again = connect(path)
    assert again.execute("SELECT SUM(count) FROM project_downloads").fetchone() == (9,)
    again.close()


@pytest_twisted.ensureDeferred
async def test_an_upgraded_database_answers(tmp_path: Path, pool: ThreadPool) -> None:
    """
    Through the store: the top projects of an upgraded database, counts
    added since included, and its files least recently served first, ties
    (every file of a version 1 database was never served) by key.
    """
    path = tmp_path / "m.sqlite"
    old_database(path, V1)
    metadata = store(path, pool)
    try:
        assert await metadata.top_projects(10) == [("a", 5), ("b", 4)]
        await metadata.add_downloads({("b", "1", "b-1.whl"): 2, ("c", "1", "c-1.whl"): 1})
        assert await metadata.top_projects(10) == [("b", 6), ("a", 5), ("c", 1)]
        assert await metadata.top_projects(1) == [("b", 6)]
        assert [r.key for r in await metadata.least_recent(2)] == ["g/a/a-1.whl", "g/b/b-1.whl"]
        await metadata.touch_files({"g/a/a-1.whl": 5.0})
        assert [r.key for r in await metadata.least_recent(3)] == [
            "g/b/b-1.whl",
            "g/c/c-1.whl",
            "g/a/a-1.whl",
        ]
    finally:
        await metadata.close()


def plan(db: sqlite3.Connection, query: str, *args: object) -> str:
    return " / ".join(row[-1] for row in db.execute("EXPLAIN QUERY PLAN " + query, args))


def test_the_big_queries_read_an_index_and_sort_nothing(tmp_path: Path) -> None:
    """
    The least recently served files and the top projects are read in order
    from an index: no sort of the whole table (or of a run of equal access
    times) on each call, however big the cache.
    """
    db = connect(tmp_path / "m.sqlite")
    least = plan(
        db,
        "SELECT key, upstream, url, sha256, size, store_key, cached_at FROM files"
        " ORDER BY last_access, key LIMIT ?",
        64,
    )
    assert "files_by_access_key" in least
    assert "TEMP B-TREE" not in least
    top = plan(db, "SELECT project, count FROM project_downloads ORDER BY count DESC, project LIMIT ?", 20)
    assert "project_downloads_by_count" in top
    assert "TEMP B-TREE" not in top
    db.close()


def test_a_locked_database_is_waited_for(tmp_path: Path) -> None:
    """
    The connection waits up to 5 s for another process's lock, rather than
    failing at once with "database is locked".
    """
    db = connect(tmp_path / "m.sqlite")
    assert db.execute("PRAGMA busy_timeout").fetchone() == (5000,)
    db.close()


def test_a_new_database_is_of_the_current_version(tmp_path: Path) -> None:
    db = connect(tmp_path / "m.sqlite")
    assert db.execute("PRAGMA user_version").fetchone() == (VERSION,)
    assert {"files_by_access_key", "project_downloads_by_count"} <= indexes(db)
    db.close()


def test_records_survive_a_reopening(tmp_path: Path) -> None:
    """
    A database of the current version opened again is not upgraded again.
    """
    path = tmp_path / "m.sqlite"
    db = connect(path)
    record = FileRecord("g/a/a-1.whl", "up", "http://u/", "ab" * 32, 10, "ab/a-1.whl", 1.0)
    db.execute(
        "INSERT INTO files VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (*(getattr(record, f) for f in ("key", "upstream", "url", "sha256", "size", "store_key")), 1.0, 1.0),
    )
    # A total that the downloads no longer add up to (a count added twice, say): an
    # upgrade run again would recompute it.
    db.execute("INSERT INTO downloads VALUES ('a', '1', 'a-1.whl', 1)")
    db.execute("INSERT INTO project_downloads VALUES ('a', 7)")
    db.close()
    again = connect(path)
    assert again.execute("SELECT count FROM project_downloads").fetchall() == [(7,)]
    assert again.execute("SELECT COUNT(*) FROM files").fetchone() == (1,)
    again.close()

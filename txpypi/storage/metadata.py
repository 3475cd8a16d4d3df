"""
Metadata stores: what we know about cached index pages and files.

L{IMetadata} is the interface; L{SqliteMetadata} is the embedded default (one
SQLite database in the cache directory, used from a pool of exactly one
thread), L{MemoryMetadata} a fake for tests.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any, TypeVar

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.threads import deferToThreadPool
from twisted.python.threadpool import ThreadPool
from zope.interface import Interface, implementer

T = TypeVar("T")


@attrs.frozen
class PageRecord:
    """
    A cached index page, as the upstream sent it (parsed and re-serialized
    with upstream URLs by L{txpypi.core.simple.formats.dump_page}).
    """

    key: str
    upstream: str
    url: str
    body: bytes
    fetched_at: float
    etag: str | None = None
    last_modified: str | None = None


@attrs.frozen
class FileRecord:
    """
    A verified, stored file: which upstream and URL it came from, its hash,
    size, and where the file store keeps it.
    """

    key: str
    upstream: str
    url: str
    sha256: str
    size: int
    store_key: str
    cached_at: float


def same_file(a: FileRecord, b: FileRecord) -> bool:
    """
    Whether two records are one landing of one file (not merely the same
    key): same bytes, cached at the same moment.
    """
    return a.key == b.key and a.sha256 == b.sha256 and a.cached_at == b.cached_at


class IMetadata(Interface):
    """
    Persistent records of pages and files.
    """

    def get_page(key: str) -> Deferred[PageRecord | None]:
        """
        The page stored under C{key}, or L{None}.
        """

    def put_page(record: PageRecord) -> Deferred[None]:
        """
        Store (replace) a page record.
        """

    def delete_page(key: str) -> Deferred[None]:
        """
        Forget a page.
        """

    def ping() -> Deferred[None]:
        """
        Fail if the store cannot be used.
        """

    def touch_page(key: str, fetched_at: float) -> Deferred[None]:
        """
        Mark a stored page as fetched at C{fetched_at} (it was revalidated).
        """

    def get_file(key: str) -> Deferred[FileRecord | None]:
        """
        The file record stored under C{key}, or L{None}.
        """

    def put_file(record: FileRecord) -> Deferred[FileRecord | None]:
        """
        Store (replace) a file record, and give the record it replaced, if
        any (so that whoever counts the cache's size can count exactly).
        """

    def delete_file(key: str, expected: FileRecord | None = None) -> Deferred[FileRecord | None]:
        """
        Forget the file record under C{key} -- with C{expected}, only if it
        is still that record (same sha256 and time of caching), so that a
        record that landed meanwhile is kept -- and give the record deleted,
        or L{None} if none was.
        """

    def add_downloads(counts: dict[tuple[str, str, str], int]) -> Deferred[None]:
        """
        Add download counts, keyed by C{(project, version, filename)}.
        """

    def top_projects(limit: int) -> Deferred[list[tuple[str, int]]]:
        """
        The most downloaded projects with their counts, most first.
        """

    def project_downloads(project: str) -> Deferred[list[tuple[str, str, int]]]:
        """
        A project's downloads as C{(version, filename, count)}.
        """

    def touch_files(accessed: dict[str, float]) -> Deferred[None]:
        """
        Record when files were last served (key to time), for eviction.
        """

    def usage() -> Deferred[tuple[int, int]]:
        """
        The total size in bytes and the number of the recorded files.
        """

    def least_recent(limit: int) -> Deferred[list[FileRecord]]:
        """
        Up to C{limit} file records, least recently served first.
        """


@implementer(IMetadata)
@attrs.define
class MemoryMetadata:
    """
    Records in dictionaries; for tests.
    """

    pages: dict[str, PageRecord] = attrs.field(factory=dict)
    files: dict[str, FileRecord] = attrs.field(factory=dict)
    accessed: dict[str, float] = attrs.field(factory=dict)
    downloads: dict[tuple[str, str, str], int] = attrs.field(factory=dict)

    def add_downloads(self, counts: dict[tuple[str, str, str], int]) -> Deferred[None]:
        for key, n in counts.items():
            self.downloads[key] = self.downloads.get(key, 0) + n
        return succeed(None)

    def top_projects(self, limit: int) -> Deferred[list[tuple[str, int]]]:
        totals: dict[str, int] = {}
        for (project, _, _), n in self.downloads.items():
            totals[project] = totals.get(project, 0) + n
        return succeed(sorted(totals.items(), key=lambda t: (-t[1], t[0]))[:limit])

    def project_downloads(self, project: str) -> Deferred[list[tuple[str, str, int]]]:
        rows = [(v, f, n) for (p, v, f), n in self.downloads.items() if p == project]
        return succeed(sorted(rows))

    def get_page(self, key: str) -> Deferred[PageRecord | None]:
        return succeed(self.pages.get(key))

    def put_page(self, record: PageRecord) -> Deferred[None]:
        self.pages[record.key] = record
        return succeed(None)

    def delete_page(self, key: str) -> Deferred[None]:
        self.pages.pop(key, None)
        return succeed(None)

    def ping(self) -> Deferred[None]:
        return succeed(None)

    def touch_page(self, key: str, fetched_at: float) -> Deferred[None]:
        if key in self.pages:
            self.pages[key] = attrs.evolve(self.pages[key], fetched_at=fetched_at)
        return succeed(None)

    def get_file(self, key: str) -> Deferred[FileRecord | None]:
        return succeed(self.files.get(key))

    def put_file(self, record: FileRecord) -> Deferred[FileRecord | None]:
        old = self.files.get(record.key)
        self.files[record.key] = record
        return succeed(old)

    def delete_file(self, key: str, expected: FileRecord | None = None) -> Deferred[FileRecord | None]:
        old = self.files.get(key)
        if old is None or (expected is not None and not same_file(old, expected)):
            return succeed(None)
        del self.files[key]
        self.accessed.pop(key, None)
        return succeed(old)

    def touch_files(self, accessed: dict[str, float]) -> Deferred[None]:
        self.accessed.update((k, v) for k, v in accessed.items() if k in self.files)
        return succeed(None)

    def usage(self) -> Deferred[tuple[int, int]]:
        return succeed((sum(r.size for r in self.files.values()), len(self.files)))

    def least_recent(self, limit: int) -> Deferred[list[FileRecord]]:
        def when(r: FileRecord) -> tuple[float, str]:
            return self.accessed.get(r.key, r.cached_at), r.key

        return succeed(sorted(self.files.values(), key=when)[:limit])


_SCHEMA = """
CREATE TABLE IF NOT EXISTS pages (
    key TEXT PRIMARY KEY,
    upstream TEXT NOT NULL,
    url TEXT NOT NULL,
    body BLOB NOT NULL,
    fetched_at REAL NOT NULL,
    etag TEXT,
    last_modified TEXT
);
CREATE TABLE IF NOT EXISTS files (
    key TEXT PRIMARY KEY,
    upstream TEXT NOT NULL,
    url TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    store_key TEXT NOT NULL,
    cached_at REAL NOT NULL,
    last_access REAL NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS files_by_access_key ON files (last_access, key);
CREATE TABLE IF NOT EXISTS downloads (
    project TEXT NOT NULL,
    version TEXT NOT NULL,
    filename TEXT NOT NULL,
    count INTEGER NOT NULL,
    PRIMARY KEY (project, version, filename)
);
CREATE TABLE IF NOT EXISTS project_downloads (
    project TEXT PRIMARY KEY,
    count INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS project_downloads_by_count ON project_downloads (count DESC, project);
"""

#: The schema's version (C{PRAGMA user_version}): 1 had no C{last_access};
#: 2 ordered the least recently served files with a sort of each run of
#: equal access times (every file of a database upgraded from 1), and
#: summed the downloads of every file for the top projects; 3 has an index
#: on C{(last_access, key)} and each project's total in
#: C{project_downloads}.
VERSION = 3

#: How long a connection waits for another process's lock on the database
#: before its query fails (several processes may share one file).
BUSY_TIMEOUT_MS = 5000


def connect(path: Path) -> sqlite3.Connection:
    """
    Open (creating or upgrading its schema) the database at C{path}, in
    autocommit mode: a transaction is an explicit C{BEGIN}.  The
    connection may be used from one thread at a time.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    connection.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
    connection.execute("PRAGMA journal_mode=WAL")
    connection.execute("PRAGMA synchronous=NORMAL")
    (version,) = connection.execute("PRAGMA user_version").fetchone()
    if version < VERSION:
        _upgrade(connection)
    return connection


def _upgrade(connection: sqlite3.Connection) -> None:
    """
    Bring the schema to L{VERSION}, in one transaction that holds the
    write lock from its start, so that of several processes opening one
    old database at once one upgrades it and the others find it done.
    """
    connection.execute("BEGIN IMMEDIATE")
    try:
        (version,) = connection.execute("PRAGMA user_version").fetchone()
        if version == 1:  # before last_access existed
            connection.execute("ALTER TABLE files ADD COLUMN last_access REAL NOT NULL DEFAULT 0")
        if version < VERSION:
            for statement in _SCHEMA.split(";"):
                if statement.strip():
                    connection.execute(statement)
            # 2's index on last_access alone: the new one on (last_access, key) serves instead.
            connection.execute("DROP INDEX IF EXISTS files_by_access")
            connection.execute(
                "INSERT OR REPLACE INTO project_downloads"
                " SELECT project, SUM(count) FROM downloads GROUP BY project"
            )
            connection.execute(f"PRAGMA user_version = {VERSION}")
        connection.execute("COMMIT")
    except BaseException:
        connection.execute("ROLLBACK")
        raise


@implementer(IMetadata)
@attrs.define
class SqliteMetadata:
    """
    Records in one SQLite database.  Every query runs on C{pool}, which must
    have exactly one thread: the connection is made and used only there.
    """

    path: Path
    _pool: ThreadPool
    _reactor: IReactorFromThreads
    _connection: sqlite3.Connection | None = None

    def _db(self) -> sqlite3.Connection:
        if self._connection is None:
            self._connection = connect(self.path)
        return self._connection

    def _run(self, f: Any, *args: Any) -> Deferred[Any]:
        return deferToThreadPool(self._reactor, self._pool, f, *args)

    def close(self) -> Deferred[None]:
        def close() -> None:
            if self._connection is not None:
                self._connection.close()
                self._connection = None

        return self._run(close)

    def _get_page(self, key: str) -> PageRecord | None:
        row = (
            self._db()
            .execute(
                "SELECT key, upstream, url, body, fetched_at, etag, last_modified FROM pages WHERE key = ?",
                (key,),
            )
            .fetchone()
        )
        if row is None:
            return None
        key, upstream, url, body, fetched_at, etag, last_modified = row
        return PageRecord(key, upstream, url, bytes(body), fetched_at, etag, last_modified)

    def get_page(self, key: str) -> Deferred[PageRecord | None]:
        return self._run(self._get_page, key)

    def _put_page(self, r: PageRecord) -> None:
        self._db().execute(
            "INSERT OR REPLACE INTO pages VALUES (?, ?, ?, ?, ?, ?, ?)",
            (r.key, r.upstream, r.url, r.body, r.fetched_at, r.etag, r.last_modified),
        )

    def put_page(self, record: PageRecord) -> Deferred[None]:
        return self._run(self._put_page, record)

    def _delete_page(self, key: str) -> None:
        self._db().execute("DELETE FROM pages WHERE key = ?", (key,))

    def delete_page(self, key: str) -> Deferred[None]:
        return self._run(self._delete_page, key)

    def _ping(self) -> None:
        self._db().execute("SELECT 1").fetchone()

    def ping(self) -> Deferred[None]:
        return self._run(self._ping)

    def _touch_page(self, key: str, fetched_at: float) -> None:
        self._db().execute("UPDATE pages SET fetched_at = ? WHERE key = ?", (fetched_at, key))

    def touch_page(self, key: str, fetched_at: float) -> Deferred[None]:
        return self._run(self._touch_page, key, fetched_at)

    def _get_file(self, key: str) -> FileRecord | None:
        row = (
            self._db()
            .execute(
                "SELECT key, upstream, url, sha256, size, store_key, cached_at FROM files WHERE key = ?",
                (key,),
            )
            .fetchone()
        )
        return None if row is None else FileRecord(*row)

    def get_file(self, key: str) -> Deferred[FileRecord | None]:
        return self._run(self._get_file, key)

    def _put_file(self, r: FileRecord) -> FileRecord | None:
        db = self._db()
        with db:
            db.execute("BEGIN")
            old = self._get_file(r.key)
            db.execute(
                "INSERT OR REPLACE INTO files VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (r.key, r.upstream, r.url, r.sha256, r.size, r.store_key, r.cached_at, r.cached_at),
            )
        return old

    def put_file(self, record: FileRecord) -> Deferred[FileRecord | None]:
        return self._run(self._put_file, record)

    def _delete_file(self, key: str, expected: FileRecord | None) -> FileRecord | None:
        db = self._db()
        with db:
            db.execute("BEGIN")
            old = self._get_file(key)
            if old is None or (expected is not None and not same_file(old, expected)):
                return None
            db.execute("DELETE FROM files WHERE key = ?", (key,))
        return old

    def delete_file(self, key: str, expected: FileRecord | None = None) -> Deferred[FileRecord | None]:
        return self._run(self._delete_file, key, expected)

    def _touch_files(self, accessed: dict[str, float]) -> None:
        db = self._db()
        with db:
            db.execute("BEGIN")
            db.executemany(
                "UPDATE files SET last_access = ? WHERE key = ?", [(t, k) for k, t in accessed.items()]
            )

    def touch_files(self, accessed: dict[str, float]) -> Deferred[None]:
        return self._run(self._touch_files, dict(accessed))

    def _add_downloads(self, counts: dict[tuple[str, str, str], int]) -> None:
        db = self._db()
        with db:
            db.execute("BEGIN")
            db.executemany(
                "INSERT INTO downloads VALUES (?, ?, ?, ?)"
                " ON CONFLICT (project, version, filename) DO UPDATE SET count = count + excluded.count",
                [(p, v, f, n) for (p, v, f), n in counts.items()],
            )
            totals: dict[str, int] = {}
            for (project, _, _), n in counts.items():
                totals[project] = totals.get(project, 0) + n
            db.executemany(
                "INSERT INTO project_downloads VALUES (?, ?)"
                " ON CONFLICT (project) DO UPDATE SET count = count + excluded.count",
                list(totals.items()),
            )

    def add_downloads(self, counts: dict[tuple[str, str, str], int]) -> Deferred[None]:
        return self._run(self._add_downloads, dict(counts))

    def _top_projects(self, limit: int) -> list[tuple[str, int]]:
        # Each project's total is kept as its downloads are added: this
        # reads C{limit} rows of an index, not every file's count.
        rows = self._db().execute(
            "SELECT project, count FROM project_downloads ORDER BY count DESC, project LIMIT ?",
            (limit,),
        )
        return [(p, int(n)) for p, n in rows]

    def top_projects(self, limit: int) -> Deferred[list[tuple[str, int]]]:
        return self._run(self._top_projects, limit)

    def _project_downloads(self, project: str) -> list[tuple[str, str, int]]:
        rows = self._db().execute(
            "SELECT version, filename, count FROM downloads WHERE project = ? ORDER BY version, filename",
            (project,),
        )
        return [(v, f, int(n)) for v, f, n in rows]

    def project_downloads(self, project: str) -> Deferred[list[tuple[str, str, int]]]:
        return self._run(self._project_downloads, project)

    def _usage(self) -> tuple[int, int]:
        total, count = self._db().execute("SELECT COALESCE(SUM(size), 0), COUNT(*) FROM files").fetchone()
        return int(total), int(count)

    def usage(self) -> Deferred[tuple[int, int]]:
        return self._run(self._usage)

    def _least_recent(self, limit: int) -> list[FileRecord]:
        rows = self._db().execute(
            "SELECT key, upstream, url, sha256, size, store_key, cached_at FROM files"
            " ORDER BY last_access, key LIMIT ?",
            (limit,),
        )
        return [FileRecord(*row) for row in rows]

    def least_recent(self, limit: int) -> Deferred[list[FileRecord]]:
        return self._run(self._least_recent, limit)

"""
The records of the files served last, kept in memory (bounded: at most
C{limit}, the oldest forgotten first), so that a hit needs no call to the
metadata store.  The lookup, the usage and the downloads share one.

They are kept as plain tuples of strings and numbers, which the garbage
collector stops tracking, and made into L{FileRecord}s when read: 100,000
records kept as objects added 40 ms to every full collection (a stall of
the reactor thread), as tuples 5 ms.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator, MutableMapping

from txpypi.storage.metadata import FileRecord

#: A record as kept: its fields, in L{FileRecord}'s order.
Row = tuple[str, str, str, str, int, str, float]


def _row(r: FileRecord) -> Row:
    return (r.key, r.upstream, r.url, r.sha256, r.size, r.store_key, r.cached_at)


class Records(MutableMapping[str, FileRecord]):
    """
    The records of the files served last, by key, at most C{limit}.
    """

    def __init__(self, limit: int = 100_000) -> None:
        self.limit = limit
        self._rows: OrderedDict[str, Row] = OrderedDict()

    def __getitem__(self, key: str) -> FileRecord:
        return FileRecord(*self._rows[key])

    def __setitem__(self, key: str, record: FileRecord) -> None:
        self._rows[key] = _row(record)

    def __delitem__(self, key: str) -> None:
        del self._rows[key]

    def __contains__(self, key: object) -> bool:
        return key in self._rows

    def __iter__(self) -> Iterator[str]:
        return iter(self._rows)

    def __len__(self) -> int:
        return len(self._rows)

    def clear(self) -> None:
        self._rows.clear()

    def remember(self, record: FileRecord) -> None:
        self._rows[record.key] = _row(record)
        self._rows.move_to_end(record.key)
        while len(self._rows) > self.limit:
            self._rows.popitem(last=False)

    def forget(self, record: FileRecord) -> None:
        """
        Forget C{record}, if it is still the one kept for its key (not one
        that landed meanwhile).
        """
        if self._rows.get(record.key) == _row(record):
            del self._rows[record.key]

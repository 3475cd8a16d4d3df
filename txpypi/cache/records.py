"""
The records of the files served last, kept in memory (bounded: at most
C{limit}, the oldest forgotten first), so that a hit needs no call to the
metadata store.  The lookup, the usage and the downloads share one.
"""

from __future__ import annotations

from collections import OrderedDict

from txpypi.storage.metadata import FileRecord


class Records(OrderedDict[str, FileRecord]):
    """
    The records of the files served last, by key, at most C{limit}.
    """

    def __init__(self, limit: int = 100_000) -> None:
        super().__init__()
        self.limit = limit

    def remember(self, record: FileRecord) -> None:
        self[record.key] = record
        self.move_to_end(record.key)
        while len(self) > self.limit:
            self.popitem(last=False)

    def forget(self, record: FileRecord) -> None:
        """
        Forget C{record}, if it is still the one kept for its key (not one
        that landed meanwhile).
        """
        if self.get(record.key) == record:
            del self[record.key]

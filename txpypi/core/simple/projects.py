"""
The list of all projects an index knows, compactly: one bytes object
rather than one Python object per project (PyPI lists some 700,000).
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable, Iterator
from itertools import islice

import attrs

#: How many project names are packed, rendered or parsed at a time, so
#: that a list of 700,000 never exists as 700,000 Python objects at once.
LIST_BATCH = 10_000


#: A batch of names (joined by newlines) that needs no escaping in HTML or
#: JSON, no quoting in a URL, and holds no empty name: the common case,
#: which is packed and rendered with a few string operations per batch
#: rather than a few function calls per name.
_PLAIN = re.compile(r"[A-Za-z0-9._-]+(?:\n[A-Za-z0-9._-]+)*")


def plain(batch: list[str]) -> str | None:
    """
    The batch joined by newlines, if it is plain (see L{_PLAIN}).
    """
    text = "\n".join(batch)
    if _PLAIN.fullmatch(text) is None or text.count("\n") != len(batch) - 1:
        return None
    return text


def _chunks(names: Iterable[str]) -> Iterator[list[str]]:
    """
    C{names}, L{LIST_BATCH} at a time.
    """
    it = iter(names)
    while batch := list(islice(it, LIST_BATCH)):
        yield batch


def pack(names: Iterable[str]) -> tuple[bytes, int]:
    """
    Names as one UTF-8 blob, each followed by a newline, and their count.
    An empty name, one that holds a newline, or one that cannot be encoded
    (a lone surrogate from JSON) is left out: it could not be a project
    anyone installs.
    """
    out = io.BytesIO()
    count = pack_into(out, names)
    return out.getvalue(), count


def pack_into(out: io.BytesIO, names: Iterable[str]) -> int:
    """
    L{pack} into C{out}, a batch at a time: big results grow in one
    buffer rather than as pieces joined at the end, which would leave the
    allocator with as much again in freed pieces.
    """
    count = 0
    for batch in _chunks(names):
        text = plain(batch)
        if text is not None:
            out.write(text.encode("ascii"))
            out.write(b"\n")
            count += len(batch)
            continue
        for name in batch:
            if name and "\n" not in name:
                try:
                    out.write((name + "\n").encode("utf-8"))
                    count += 1
                except UnicodeEncodeError:
                    pass
    return count


def _unpack(blob: bytes, size: int = 256 * 1024) -> Iterator[list[str]]:
    """
    The names packed in C{blob}, about C{size} bytes of them at a time.
    """
    start = 0
    while start < len(blob):
        end = blob.find(b"\n", start + size)
        end = len(blob) if end < 0 else end + 1
        yield blob[start:end].decode("utf-8").split("\n")[:-1]
        start = end


@attrs.frozen
class ProjectList:
    """
    The list of all projects an index knows, compactly: C{names} holds them
    in UTF-8, each followed by a newline, in one bytes object rather than
    one Python object per project.  Build it with L{ProjectList.of}.
    """

    names: bytes = b""
    count: int = 0
    api_version: str = "1.0"

    @classmethod
    def of(cls, names: Iterable[str], api_version: str = "1.0") -> ProjectList:
        blob, count = pack(names)
        return cls(blob, count, api_version)

    def batches(self) -> Iterator[list[str]]:
        """
        The names, a batch at a time.
        """
        return _unpack(self.names)

    def __iter__(self) -> Iterator[str]:
        for batch in self.batches():
            yield from batch

    @property
    def projects(self) -> tuple[str, ...]:
        """
        All the names as a tuple (for small lists: tests, debugging).
        """
        return tuple(self)


def batches(names: Iterable[str]) -> Iterator[list[str]]:
    """
    Names a batch at a time: a L{ProjectList}'s own batches, any other
    iterable's L{LIST_BATCH} at a time.  Never an empty batch.
    """
    if isinstance(names, ProjectList):
        return names.batches()
    return _chunks(names)

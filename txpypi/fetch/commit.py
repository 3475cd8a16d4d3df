"""
Committing a verified file: its object into the file store, its record into
the metadata, with a L{CommitJournal} marker around the two so that a crash
in between leaves no unrecorded object for good.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable
from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.logger import Logger

from txpypi.fetch.wanted import Wanted
from txpypi.storage.metadata import FileRecord, IMetadata
from txpypi.storage.outages import Unavailable
from txpypi.storage.stores import IFileStore, IStreamingUpload, IUpload, file_key

log = Logger(namespace="txpypi.download")


def start_upload(store: IFileStore, wanted: Wanted, spool_path: str) -> IUpload | None:
    """
    Let the store take the file while it downloads, if it can and the key
    is known (L{IStreamingUpload}): the upload hears of the spooled bytes,
    is completed once the file is verified, else aborted.
    """
    expected = wanted.expected_hash
    if expected is None or expected[0] != "sha256" or not IStreamingUpload.providedBy(store):
        return None
    key = file_key(expected[1], wanted.filename)
    try:
        return IStreamingUpload(store).start_upload(spool_path, key, expected[1])
    except Unavailable:
        pass  # the store is down (logged once): the file is not cached
    except Exception:
        log.failure("cannot upload {key} while it downloads; uploading it afterwards", key=key)
    return None


@attrs.define
class CommitJournal:
    """
    Markers of the commits in progress, one small file each in
    C{directory}: written before a verified file goes into the store,
    removed once its record is written (or the object removed again).  A
    marker left behind (a crash, or a store that closed under the commit)
    names an object that may have no record; start-up looks each one up and
    removes such objects.  The methods block: run them in a worker thread.
    """

    directory: str
    #: This process's mark on its markers (a process id may repeat across
    #: restarts, in a container always): its own are never recovered.
    owner: str = attrs.field(factory=lambda: uuid.uuid4().hex)

    def begin(self, record: FileRecord) -> str:
        os.makedirs(self.directory, exist_ok=True)
        name = f"{self.owner}-{record.sha256}-{time.time_ns()}.json"
        path = os.path.join(self.directory, name)
        entry = {"key": record.key, "store_key": record.store_key, "sha256": record.sha256}
        partial = os.path.join(self.directory, f".{name}")
        with open(partial, "w", encoding="utf-8") as f:
            json.dump(entry, f)
        os.replace(partial, path)  # whole, or not there: never read half-written
        return path

    def end(self, path: str) -> None:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass

    def pending(self) -> list[tuple[str, dict[str, str]]]:
        """
        The markers other processes left, with what each names (unreadable
        ones are dropped).
        """
        try:
            names = sorted(os.listdir(self.directory))
        except FileNotFoundError:
            return []
        found = []
        for name in names:
            if name.startswith((".", self.owner)):
                continue  # one being written, or one of this process's commits in progress
            path = os.path.join(self.directory, name)
            try:
                with open(path, encoding="utf-8") as f:
                    entry = json.load(f)
                if not all(isinstance(entry.get(k), str) for k in ("key", "store_key", "sha256")):
                    raise ValueError("not a commit marker")
            except (OSError, ValueError):
                self.end(path)
                continue
            found.append((path, entry))
        return found


@attrs.frozen
class Landed:
    """
    How a commit went: whether the file is C{cached}, and the record its
    record C{replaced}, if any.
    """

    cached: bool
    replaced: FileRecord | None = None


@attrs.frozen
class Commit:
    """
    Puts one verified file into the stores: from its C{upload} in progress
    if there is one, else from its spool file at C{spool_path}.
    """

    store: IFileStore
    metadata: IMetadata
    #: Where commits in progress are written down (L{None}: nowhere).
    journal: CommitJournal | None
    #: Runs the journal's blocking calls (in a worker thread).
    run: Callable[..., Deferred[Any]]
    #: Called with "files" when the file store fails us (for metrics).
    on_store_error: Callable[[str], None]

    async def land(
        self, record: FileRecord, filename: str, spool_path: str, upload: IUpload | None
    ) -> Landed:
        # Written down first: if the process dies (or the metadata store
        # closes) between the object and its record, start-up finds the
        # object unrecorded and removes it.
        marker = None if self.journal is None else await self.run(self.journal.begin, record)
        try:
            if upload is not None:
                await upload.complete(record.size)
            else:
                await self.store.commit(spool_path, record.store_key)
            replaced = await self.metadata.put_file(record)
        except Unavailable as e:
            # A store is down: its outage is logged once, not per file.  The
            # object, if it went in, stays: under its content-addressed key it
            # may be another instance's recorded copy, and the next fetch of
            # the file records it again (the journal's marker stays too: a
            # restart removes the object if nothing recorded it by then).
            log.info("not caching {filename}: {reason}", filename=filename, reason=str(e))
            return Landed(cached=False)
        except Exception:
            self.on_store_error("files")
            log.failure("could not cache {filename}", filename=filename)
            if not await self._remove(record.store_key):
                marker = None  # left to the journal
            self._end_marker(marker)
            return Landed(cached=False)
        self._end_marker(marker)
        return Landed(cached=True, replaced=replaced)

    async def _remove(self, store_key: str) -> bool:
        """
        No object without a record: it would never be counted or evicted.
        C{False} if it may still be there.
        """
        try:
            await self.store.delete(store_key)
        except Unavailable:
            return False  # the store is down (logged once)
        except Exception:
            log.failure("could not remove the unrecorded {key}", key=store_key)
            return False
        return True

    def _end_marker(self, marker: str | None) -> None:
        if marker is not None and self.journal is not None:
            self.run(self.journal.end, marker).addErrback(
                lambda f: log.failure("could not remove the commit marker {marker}", f, marker=marker)
            )

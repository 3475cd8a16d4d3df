"""
Which member of a group owns each project: the first, in priority order,
that knew it when it was resolved.  Kept in memory (bounded) and in the
metadata store, so that a restart and a cluster share it; see
L{txpypi.cache.groups} for why it matters.
"""

from __future__ import annotations

from collections import OrderedDict

import attrs
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure

from txpypi.storage.metadata import IMetadata, PageRecord
from txpypi.storage.outages import Unavailable

log = Logger(namespace="txpypi.pages")

#: The most owners a group remembers in memory (the metadata store keeps
#: them all); past it the least recently used are read again when asked.
MAX_OWNERS = 100_000


@attrs.define
class Owners:
    """
    Which member of a group owns each project it resolved: kept in memory
    (at most L{MAX_OWNERS}) and in the metadata store under
    C{owners/<group>/<project>}.
    """

    _metadata: IMetadata
    group: str
    _clock: IReactorTime
    max_entries: int = MAX_OWNERS
    _known: OrderedDict[str, str] = attrs.field(factory=OrderedDict)

    def _key(self, project: str) -> str:
        return f"owners/{self.group}/{project}"

    def known(self, project: str) -> str | None:
        """
        The owner, if it is in memory (the hot path).
        """
        owner = self._known.get(project)
        if owner is not None:
            self._known.move_to_end(project)
        return owner

    def _keep(self, project: str, owner: str) -> None:
        self._known[project] = owner
        self._known.move_to_end(project)
        while len(self._known) > self.max_entries:
            self._known.popitem(last=False)

    async def get(self, project: str) -> str | None:
        """
        The owner, from memory or else the metadata store (L{None} while it
        is down: the group then resolves from its highest member).
        """
        owner = self.known(project)
        if owner is not None:
            return owner
        try:
            record = await self._metadata.get_page(self._key(project))
        except Unavailable:
            return None
        if record is None:
            return None
        owner = record.body.decode("utf-8", "replace")
        self._keep(project, owner)
        return owner

    def set(self, project: str, owner: str) -> Deferred[None]:
        """
        Remember C{owner}: in memory at once, and in the metadata store in
        the background (the answer does not wait for the write; memory
        holds it meanwhile, and while the store is down).

        @return: fires once it is stored (or could not be: logged); never
            fails, so that a caller may leave it.
        """
        if self._known.get(project) == owner:
            return succeed(None)
        self._keep(project, owner)
        record = PageRecord(self._key(project), owner, "", owner.encode(), self._clock.seconds())
        return self._metadata.put_page(record).addErrback(self._not_stored, record.key)

    @staticmethod
    def _not_stored(failure: Failure, key: str) -> None:
        if not failure.check(Unavailable):  # an outage is logged once, elsewhere
            log.failure("could not store the owner {key}", failure, key=key)

    async def forget(self, project: str) -> None:
        self._known.pop(project, None)
        try:
            await self._metadata.delete_page(self._key(project))
        except Unavailable:
            pass

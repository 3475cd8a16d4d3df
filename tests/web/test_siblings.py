"""
The other workers asked for their part: signed, gathered once however
many ask at a time, and a sibling that does not answer in time given by
its last answer (for a while), over real loopback.
"""

from __future__ import annotations

from typing import Any

import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.web.resource import Resource
from twisted.web.server import NOT_DONE_YET, Request, Site

import txpypi.web.siblings as siblings_module
from tests.conftest import get_reactor, listen
from txpypi.core.peer import HEADER, verify
from txpypi.web.siblings import Siblings

SECRET = "s" * 32


class Sibling(Resource):
    isLeaf = True

    def __init__(self) -> None:
        super().__init__()
        self.hang = False
        self.asked = 0
        self.held: list[Request] = []

    def render_GET(self, request: Request) -> bytes | int:
        self.asked += 1
        signature = request.getHeader(HEADER)
        assert verify(
            SECRET,
            request.path.decode(),
            None if signature is None else signature.decode(),
            get_reactor().seconds(),
        )
        if self.hang:
            self.held.append(request)
            return NOT_DONE_YET
        return b"part %d" % self.asked


@pytest.fixture
def sibling() -> Any:
    resource = Sibling()
    port = listen(Site(resource))
    yield resource, f"http://127.0.0.1:{port.getHost().port}/"
    pytest_twisted.blockon(port.stopListening())


@pytest_twisted.ensureDeferred
async def test_gathered_once_then_the_last_answer_stands_in(
    sibling: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    resource, url = sibling
    siblings = Siblings(get_reactor(), (url,), SECRET)
    try:
        first, second = siblings.gather("metrics"), siblings.gather("metrics")
        assert await Deferred.fromCoroutine(first) == [(b"part 1", True)]
        assert await Deferred.fromCoroutine(second) == [(b"part 1", True)]
        assert resource.asked == 1  # one gathering for both, and reused within GATHER_EVERY
        assert await Deferred.fromCoroutine(siblings.gather("metrics")) == [(b"part 1", True)]
        assert resource.asked == 1
        monkeypatch.setattr(siblings_module, "GATHER_EVERY", 0.0)
        resource.hang = True
        # It does not answer within TIMEOUT: its last answer, said to be old.
        assert await Deferred.fromCoroutine(siblings.gather("metrics")) == [(b"part 1", False)]
        monkeypatch.setattr(siblings_module, "LAST_ANSWER_FOR", 0.0)
        assert await Deferred.fromCoroutine(siblings.gather("metrics")) == [(None, False)]
    finally:
        await siblings.close()

"""
What page and file fetches share (L{txpypi.fetch.exchange}): the health
record C{/health} and the metrics read, the wait for an answer under the
response timeout, and the one L{Timeouts} value a SIGHUP changes.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.web.client import ResponseNeverReceived
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent, IBodyProducer, IResponse
from zope.interface import implementer

from txpypi.fetch.exchange import Health, UpstreamError, answered_within, classify
from txpypi.fetch.upstream import Upstream, UpstreamClient
from txpypi.web.metrics import Metrics


def outcomes(metrics: Metrics, kind: str, outcome: str) -> float | None:
    return metrics.registry.get_sample_value(
        "txpypi_upstream_requests_total", {"upstream": "upstream", "kind": kind, "outcome": outcome}
    )


def test_health_is_the_last_exchange_and_peers_do_not_count() -> None:
    """
    The state is C{unknown} before any exchange, C{degraded} while the last
    failure is newer than the last success, C{ok} once one succeeds again;
    an exchange with a peer is counted but leaves the upstream's health.
    """
    clock = Clock()
    metrics = Metrics.create()
    health = Health(clock, metrics)
    assert health.state() == "unknown"
    health.record("peer", "error", clock.seconds(), "the peer is gone")
    assert (health.state(), health.last_error) == ("unknown", None)
    clock.advance(1)
    health.record("page", "ok", 0.0)
    assert (health.state(), health.last_success) == ("ok", 1.0)
    clock.advance(1)
    health.record("file", "timeout", 1.0, "upstream timed out")
    assert (health.state(), health.last_error) == ("degraded", (2.0, "upstream timed out"))
    clock.advance(1)
    health.record("page", "ok", 3.0)
    assert health.state() == "ok"
    health.refused("file")
    assert outcomes(metrics, "peer", "error") == 1
    assert outcomes(metrics, "page", "ok") == 2
    assert outcomes(metrics, "file", "timeout") == 1
    assert outcomes(metrics, "file", "refused") == 1
    latency = {"upstream": "upstream", "kind": "file"}
    assert metrics.registry.get_sample_value("txpypi_upstream_duration_seconds_sum", latency) == 1.0


def test_an_answer_late_is_cancelled_and_one_in_time_stops_the_timer() -> None:
    """
    L{answered_within} cancels a Deferred that has not fired in time (a 504
    for L{classify}), and leaves no timer behind one that has.
    """
    clock = Clock()
    out: list[Any] = []
    late: Deferred[bytes] = Deferred()
    Deferred.fromCoroutine(answered_within(clock, 5, late)).addBoth(out.append)
    clock.advance(4.9)
    assert out == []
    clock.advance(0.1)
    assert out[0].check(CancelledError) and classify(out[0].value, "u").status == 504
    in_time: Deferred[bytes] = Deferred()
    Deferred.fromCoroutine(answered_within(clock, 5, in_time)).addBoth(out.append)
    in_time.callback(b"page")
    assert out[1] == b"page" and clock.getDelayedCalls() == []


@implementer(IAgent)
class _Silent:
    """
    An agent whose requests are never answered.  (Over a real Agent a
    cancelled request fails with C{ResponseNeverReceived}, which is
    classified apart; here the cancel itself is what is asserted.)
    """

    def request(
        self,
        method: bytes,
        uri: bytes,
        headers: Headers | None = None,
        bodyProducer: IBodyProducer | None = None,
    ) -> Deferred[IResponse]:
        return Deferred()


def test_a_changed_response_timeout_reaches_pages_and_files() -> None:
    """
    A SIGHUP sets C{response_timeout} on the client: the page side and the
    file side both wait that long for an answer, and no longer.
    """
    clock = Clock()
    client = UpstreamClient(clock, agent=_Silent())
    client.response_timeout = 2.0
    out: list[Any] = []
    Deferred.fromCoroutine(client.fetch_page("http://upstream.test/simple/a/")).addBoth(out.append)
    Deferred.fromCoroutine(client.open_file("http://peer.test/f", kind="peer")).addBoth(out.append)
    clock.advance(1.9)
    assert out == []
    clock.advance(0.1)
    assert [(f.check(UpstreamError), f.value.status) for f in out] == [(UpstreamError, 504)] * 2
    assert client.state() == "degraded"  # the page timed out; the peer does not count


def test_exchanges_are_counted_under_the_upstreams_configured_name() -> None:
    """
    A client is named in the metrics by its first upstream, and a peer
    exchange it makes counts under the same name; without an upstream it
    is C{upstream}.
    """
    clock = Clock()
    metrics = Metrics.create()
    client = UpstreamClient(
        clock,
        agent=_Silent(),
        metrics=metrics,
        upstreams=(Upstream("private", "http://private.test/simple"),),
    )
    client.response_timeout = 1.0
    out: list[Any] = []
    Deferred.fromCoroutine(client.fetch_page("http://private.test/simple/a/")).addBoth(out.append)
    Deferred.fromCoroutine(client.open_file("http://peer.test/f", kind="peer")).addBoth(out.append)
    clock.advance(1)
    assert len(out) == 2
    sample = metrics.registry.get_sample_value
    labels = {"upstream": "private", "outcome": "timeout"}
    assert sample("txpypi_upstream_requests_total", {**labels, "kind": "page"}) == 1
    assert sample("txpypi_upstream_requests_total", {**labels, "kind": "peer"}) == 1
    assert sample("txpypi_upstream_duration_seconds_count", {"upstream": "private", "kind": "page"}) == 1
    assert (
        sample("txpypi_upstream_requests_total", {**labels, "upstream": "upstream", "kind": "page"}) is None
    )
    Health(clock, metrics).record("page", "ok", 1.0)
    assert (
        sample("txpypi_upstream_requests_total", {"upstream": "upstream", "kind": "page", "outcome": "ok"})
        == 1
    )


def test_conflicts_are_counted_by_group() -> None:
    metrics = Metrics.create()
    metrics.conflicts.labels("default").inc()
    assert metrics.registry.get_sample_value("txpypi_conflicts_total", {"group": "default"}) == 1


def test_a_request_cancelled_on_a_real_connection_is_a_timeout() -> None:
    """
    Over a real connection the response timeout's cancel ends the request
    with C{ResponseNeverReceived([CancelledError])}: a 504, not a 502;
    another reason (a TLS failure, a reset) stays a 502.
    """
    timed_out = ResponseNeverReceived([Failure(CancelledError())])
    assert (classify(timed_out, "u").status, classify(timed_out, "u").reason) == (
        504,
        "upstream timed out: u",
    )
    reset = ResponseNeverReceived([Failure(ConnectionLost())])
    assert classify(reset, "u").status == 502

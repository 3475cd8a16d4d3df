"""
Supply-chain policy through a real proxy over loopback (#13): a group with
a minimum release age shows the old version and refuses the young file
(403 naming the rule, nothing fetched); exemptions, a fixed cut-off, block
and allow lists, missing upload times and per-upstream settings; a policy
changed by SIGHUP takes effect on the next request without an upstream
request.
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import attrs
import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.web.server import Site

from tests.conftest import Running, Served, get_reactor, listen
from tests.integration.test_groups import captured_log, json_accept
from tests.integration.test_http_semantics import get
from tests.integration.test_operations import sample, scrape
from tests.integration.test_proxy import header
from txpypi import options
from txpypi.tap import assemble
from txpypi.testing import FakeUpstream, build_sdist, build_wheel

DAY = 86400


def stamp(seconds_ago: float) -> str:
    return datetime.fromtimestamp(time.time() - seconds_ago, UTC).strftime("%Y-%m-%dT%H:%M:%S.000000Z")


OLD = attrs.evolve(build_wheel("acc-timed", "1.0"), upload_time="2020-01-02T03:04:05.000000Z")
YOUNG = attrs.evolve(build_wheel("acc-timed", "2.0"), upload_time=stamp(DAY))
YOUNG_SDIST = attrs.evolve(build_sdist("acc-timed", "2.0"), upload_time=stamp(DAY))
EVIL = build_wheel("evil-lib", "1.0")


@attrs.define
class Proxy:
    running: Running
    reload: Callable[[str], list[str]]

    @property
    def url(self) -> str:
        return self.running.url


@pytest.fixture
def upstream() -> Iterator[Served]:
    fake = FakeUpstream([OLD, YOUNG, YOUNG_SDIST, EVIL], mode="json")
    port = listen(Site(fake))
    yield Served(fake, port)
    pytest_twisted.blockon(port.stopListening())


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., Proxy]]:
    """
    Start a proxy from YAML text; its C{reload} re-reads other YAML text as
    SIGHUP does.
    """
    running: list[Running] = []

    def factory(text: str, endpoint: str = "tcp:0:interface=127.0.0.1") -> Proxy:
        path = tmp_path / "txpypi.yaml"
        path.write_text(text)
        settings = attrs.evolve(
            options.read(str(path), {}, environ={}), listen=(), cache_dir=str(tmp_path / "cache")
        )
        process = options.Running(settings)
        built = assemble(settings, get_reactor(), process.live)
        built.service.startService()
        r = Running(built.proxy, built.service, listen(built.proxy.site(), endpoint))
        running.append(r)

        def reload(new_text: str) -> list[str]:
            path.write_text(new_text)
            new = options.read(str(path), {}, environ={})
            return process.reload(attrs.evolve(new, listen=settings.listen, cache_dir=settings.cache_dir))

        return Proxy(r, reload)

    yield factory
    for r in reversed(running):
        pytest_twisted.blockon(Deferred.fromCoroutine(r.stop()))


def config(upstream: Served, policy: str, upstream_policy: str = "") -> str:
    text = f"""
upstreams:
  public:
    url: {upstream.url}
{upstream_policy}
groups:
  default:
    members: [public]
    policy: {policy}
  mirror:
    members: [public]
"""
    return text


async def page(proxy: Proxy, project: str, group: str = "") -> tuple[Any, dict[str, Any]]:
    base = f"{proxy.url}/{group + '/' if group else ''}simple/{project}/"
    response, body = await get(base, json_accept())
    return response, json.loads(body) if response.code == 200 else {"text": body.decode()}


def files_of(body: dict[str, Any]) -> list[str]:
    return sorted(f["filename"] for f in body["files"])


@pytest_twisted.ensureDeferred
async def test_a_release_age_hides_the_young_file_and_refuses_it(
    upstream: Served, start: Callable[..., Proxy]
) -> None:
    proxy = start(config(upstream, "{min-release-age: 7d}"))
    response, body = await page(proxy, "acc-timed")
    assert response.code == 200 and files_of(body) == [OLD.filename]
    assert body["versions"] == ["1.0"]
    assert all(f.get("upload-time") for f in body["files"])
    # The mirror group has no policy: the same cached page, all of it.
    _, mirror = await page(proxy, "acc-timed", "mirror")
    assert files_of(mirror) == sorted([OLD.filename, YOUNG.filename, YOUNG_SDIST.filename])
    assert upstream.fake.requests["/simple/acc-timed/"] == 1
    # A lockfile install asks for the young file directly.
    with captured_log() as events:
        for _ in range(2):
            response, text = await get(f"{proxy.url}/files/acc-timed/{YOUNG.filename}")
            assert response.code == 403
            assert text.decode().startswith(
                f"younger than min-release-age 7d: uploaded {YOUNG.upload_time[:19]}Z"
            )
            assert header(response, "cache-control") == "no-store" and header(response, "etag") is None
    assert upstream.fake.requests["/packages/" + YOUNG.filename] == 0
    assert sum("refused" in str(e.get("log_format")) for e in events) == 1  # once per file
    metrics = await scrape(proxy.url)
    assert sample(metrics, "txpypi_policy_refusals_total", rule="min-release-age") == 2
    response, content = await get(f"{proxy.url}/files/acc-timed/{OLD.filename}")
    assert response.code == 200 and content == OLD.content


@pytest_twisted.ensureDeferred
async def test_sighup_changes_the_answer_without_asking_the_upstream(
    upstream: Served, start: Callable[..., Proxy]
) -> None:
    proxy = start(config(upstream, "{min-release-age: 7d}"))
    _, body = await page(proxy, "acc-timed")
    assert files_of(body) == [OLD.filename]
    kept = proxy.reload(config(upstream, "{min-release-age: 1h}"))
    assert kept == []  # a policy is no restart
    _, body = await page(proxy, "acc-timed")
    assert files_of(body) == sorted([OLD.filename, YOUNG.filename, YOUNG_SDIST.filename])
    response, _ = await get(f"{proxy.url}/files/acc-timed/{YOUNG.filename}")
    assert response.code == 200
    assert upstream.fake.requests["/simple/acc-timed/"] == 1


@pytest_twisted.ensureDeferred
async def test_an_exemption_lets_the_young_file_through_and_is_logged(
    upstream: Served, start: Callable[..., Proxy]
) -> None:
    until = datetime.fromtimestamp(time.time() + 3 * DAY, UTC).strftime("%Y-%m-%d")
    exemption = f'{{project: acc-timed, versions: "==2.0", until: {until}, reason: "CVE fix, reviewed"}}'
    policy = f"{{min-release-age: 7d, exempt: [{exemption}]}}"
    proxy = start(config(upstream, policy))
    with captured_log() as events:
        _, body = await page(proxy, "acc-timed")
        await page(proxy, "acc-timed")  # answered from the view: logged again
        response, content = await get(f"{proxy.url}/files/acc-timed/{YOUNG.filename}")
    assert YOUNG.filename in files_of(body)
    assert response.code == 200 and content == YOUNG.content
    lines = [e for e in events if "exemption" in str(e.get("log_format"))]
    assert all(e["reason"] == "CVE fix, reviewed" for e in lines)
    assert [e["filename"] for e in lines].count(YOUNG.filename) == 3  # two pages, one download
    _, health = await get(f"{proxy.url}/health")
    assert json.loads(health)["exemptions_expiring"] == [
        {
            "group": "default",
            "rule": "acc-timed==2.0",
            "until": f"{until}T23:59:59Z",
            "reason": "CVE fix, reviewed",
        }
    ]
    expired = policy.replace(until, "2020-01-01")
    proxy.reload(config(upstream, expired))
    response, _ = await get(f"{proxy.url}/files/acc-timed/{YOUNG.filename}")
    assert response.code == 403


@pytest_twisted.ensureDeferred
async def test_a_fixed_cut_off(upstream: Served, start: Callable[..., Proxy]) -> None:
    proxy = start(config(upstream, "{exclude-newer: 2021-01-01T00:00:00Z}"))
    _, body = await page(proxy, "acc-timed")
    assert files_of(body) == [OLD.filename]
    response, text = await get(f"{proxy.url}/files/acc-timed/{YOUNG_SDIST.filename}")
    assert response.code == 403 and text.startswith(b"uploaded after exclude-newer 2021-01-01T00:00:00Z")


@pytest_twisted.ensureDeferred
async def test_blocks_and_allows(upstream: Served, start: Callable[..., Proxy]) -> None:
    proxy = start(config(upstream, '{block: ["evil-*", "acc-timed==1.0", "sdist:*"]}'))
    response, body = await page(proxy, "evil-lib")
    assert response.code == 404 and body["text"] == "evil-lib is blocked by 'evil-*'\n"
    _, body = await page(proxy, "acc-timed")
    assert files_of(body) == [YOUNG.filename]
    response, text = await get(f"{proxy.url}/files/acc-timed/{YOUNG_SDIST.filename}")
    assert response.code == 403 and text == f"{YOUNG_SDIST.filename} is blocked by 'sdist:*'\n".encode()
    proxy.reload(config(upstream, '{allow: ["acc-timed>=2"]}'))
    response, body = await page(proxy, "evil-lib")
    assert response.code == 404 and "not in the allow list" in body["text"]
    _, body = await page(proxy, "acc-timed")
    assert files_of(body) == sorted([YOUNG.filename, YOUNG_SDIST.filename])
    # Every file hidden: the page stays, with none, so resolvers say "no matching version".
    proxy.reload(config(upstream, '{block: ["acc-timed<99"]}'))
    response, body = await page(proxy, "acc-timed")
    assert response.code == 200 and body["files"] == [] and body["versions"] == []


@pytest_twisted.ensureDeferred
async def test_an_upstreams_own_policy_comes_first(upstream: Served, start: Callable[..., Proxy]) -> None:
    proxy = start(
        config(upstream, "{min-release-age: 7d, block: [sdist:*]}", "    policy: {min-release-age: 0}")
    )
    _, body = await page(proxy, "acc-timed")
    # The age is the upstream's (none); the block list the group's.
    assert files_of(body) == sorted([OLD.filename, YOUNG.filename])


@pytest.fixture
def html_upstream() -> Iterator[Served]:
    fake = FakeUpstream([OLD, YOUNG], mode="html")
    port = listen(Site(fake))
    yield Served(fake, port)
    pytest_twisted.blockon(port.stopListening())


@pytest_twisted.ensureDeferred
async def test_files_without_an_upload_time_are_hidden_unless_allowed(
    html_upstream: Served, start: Callable[..., Proxy]
) -> None:
    proxy = start(config(html_upstream, "{min-release-age: 7d}"))
    response, body = await page(proxy, "acc-timed")
    assert response.code == 200 and body["files"] == []
    response, text = await get(f"{proxy.url}/files/acc-timed/{OLD.filename}")
    assert response.code == 403 and b"has no upload time" in text
    proxy.reload(config(html_upstream, "{min-release-age: 7d, missing-upload-time: allow}"))
    _, body = await page(proxy, "acc-timed")
    assert files_of(body) == sorted([OLD.filename, YOUNG.filename])


@pytest_twisted.ensureDeferred
async def test_the_policy_in_force_is_a_json_route(upstream: Served, start: Callable[..., Proxy]) -> None:
    proxy = start(
        config(upstream, "{min-release-age: P7D, block: [evil-*]}", "    policy: {min-release-age: 0}")
    )
    response, body = await get(f"{proxy.url}/default/policy")
    shown = json.loads(body)
    assert response.code == 200 and shown["group"] == "default"
    assert shown["policy"]["min-release-age"] == "7d" and shown["policy"]["block"] == ["evil-*"]
    assert shown["upstreams"]["public"]["min-release-age"] == "0s"
    response, _ = await get(f"{proxy.url}/nope/policy")
    assert response.code == 404
    _, status = await get(f"{proxy.url}/")
    assert b"<td>default</td><td>min-release-age 7d; block evil-*; public: block evil-*</td>" in status


# -- found in review

OTHER = attrs.evolve(build_wheel("acc-timed", "0.5"), upload_time="2019-01-02T03:04:05.000000Z")


@pytest.fixture
def two(upstream: Served) -> Iterator[tuple[Served, Served]]:
    fake = FakeUpstream([OTHER], mode="json")
    port = listen(Site(fake))
    yield upstream, Served(fake, port)
    pytest_twisted.blockon(port.stopListening())


@pytest.mark.parametrize("size", ["256M", "1"])
@pytest_twisted.ensureDeferred
async def test_an_upstreams_policy_holds_in_a_merged_page_too_big_to_keep(
    two: tuple[Served, Served], start: Callable[..., Proxy], size: str
) -> None:
    public, private = two
    proxy = start(
        f"page-cache-size: {size}\nupstreams:\n  public:\n    url: {public.url}\n"
        f"    policy: {{min-release-age: 7d}}\n  private:\n    url: {private.url}\n"
        "groups:\n  default:\n    members: [private, public]\n    strategy: merge\n"
    )
    _, body = await page(proxy, "acc-timed")
    assert YOUNG.filename not in files_of(body) and OTHER.filename in files_of(body)
    response, _ = await get(f"{proxy.url}/files/acc-timed/{YOUNG.filename}")
    assert response.code == 403


@pytest_twisted.ensureDeferred
async def test_views_hold_no_page_past_the_page_memory(upstream: Served, start: Callable[..., Proxy]) -> None:
    for i in range(30):
        upstream.fake.add(attrs.evolve(build_wheel(f"p{i}", "2.0"), upload_time=stamp(DAY)))
        upstream.fake.add(attrs.evolve(build_wheel(f"p{i}", "1.0"), upload_time="2020-01-01T00:00:00Z"))
    proxy = start(
        config(upstream, "{min-release-age: 7d}").replace("groups:", "page-cache-size: 4K\ngroups:")
    )
    for i in range(30):
        _, body = await page(proxy, f"p{i}")
        assert len(body["files"]) == 1
    gc.collect()
    policed = proxy.running.proxy.groups.policed["default"]
    memory = proxy.running.proxy.pages.memory
    held = [v.page() for v in policed._views.values()]
    assert all(p is None or memory.pages.get(p.key) is p for p in held)
    assert memory.bytes_used <= 4096

"""
Groups of named upstreams (#12), through a real proxy built from YAML and
three fake upstreams on loopback: C{private} (basic auth; C{acme-lib} 1.0),
C{public} (C{acme-lib} 99.0, the dependency confusion attack, and projects
of its own) and C{third} (a file named as one of public's, other bytes).
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, cast
from urllib.parse import urljoin

import attrs
import pytest
import pytest_twisted
from twisted.internet.defer import Deferred
from twisted.logger import ILogObserver, formatEvent, globalLogPublisher
from twisted.web.server import Request, Site

from tests.conftest import Running, Served, get_reactor, listen
from tests.integration.test_http_semantics import get
from tests.integration.test_operations import sample, scrape
from tests.integration.test_proxy import header
from txpypi import options
from txpypi.config import ConfigError
from txpypi.tap import build
from txpypi.testing import JSON_V1, Dist, FakeUpstream, build_wheel

USERNAME = "ci"
PASSWORD = "pw-Zq8tXv3kLm"
AUTHORIZATION = "Basic " + base64.b64encode(f"{USERNAME}:{PASSWORD}".encode()).decode()
ADMIN_TOKEN = "admin-token-0123456789abcdef"

PRIVATE_LIB = build_wheel("acme-lib", "1.0")
ATTACK_LIB = build_wheel("acme-lib", "99.0")
#: Only on private, and listed there on another origin (the files origin).
PRIVATE_TOOLS = build_wheel("acme-tools", "2.0")
ONLY_PUBLIC = build_wheel("widget", "3.0")
SHARED_PUBLIC = build_wheel("shared", "1.0")
#: The same file name as L{SHARED_PUBLIC}, other bytes.
SHARED_THIRD = build_wheel("shared", "1.0", padding=64)
#: Only third has it; it needs public's widget (a merged install takes both).
THIRD_OWN = build_wheel("shared", "1.1", ["widget"])


def json_accept() -> dict[bytes, list[bytes]]:
    return {b"Accept": [JSON_V1.encode()]}


@attrs.define
class Upstreams:
    """
    The fake upstreams, listening on loopback.
    """

    private: Served
    public: Served
    third: Served
    #: Another origin, where private lists C{acme-tools}'s file.
    files: Served
    #: Which upstream was asked for which path, in order.
    arrivals: list[tuple[str, str]]

    def all(self) -> list[Served]:
        return [self.private, self.public, self.third, self.files]

    def origin(self, served: Served) -> str:
        return f"http://127.0.0.1:{served.port.getHost().port}"


class Named(FakeUpstream):
    """
    A fake upstream that also appends its name and each request's path to
    one list that all of them share, which shows the order they were asked in.
    """

    def __init__(self, name: str, arrivals: list[tuple[str, str]], dists: list[Dist], **more: Any) -> None:
        super().__init__(dists, **more)
        self.name = name
        self.arrivals = arrivals

    def render(self, request: Request) -> bytes | int:  # type: ignore[override]
        self.arrivals.append((self.name, request.path.decode()))
        return super().render(request)


def serve(fake: FakeUpstream) -> Served:
    return Served(fake, listen(Site(fake)))


@pytest.fixture
def upstreams() -> Iterator[Upstreams]:
    arrivals: list[tuple[str, str]] = []
    files = serve(Named("files", arrivals, [PRIVATE_TOOLS]))
    private = serve(Named("private", arrivals, [PRIVATE_LIB, PRIVATE_TOOLS], auth=AUTHORIZATION))
    private.fake.urls[PRIVATE_TOOLS.filename] = (
        f"http://127.0.0.1:{files.port.getHost().port}/packages/{PRIVATE_TOOLS.filename}"
    )
    public = serve(Named("public", arrivals, [ATTACK_LIB, ONLY_PUBLIC, SHARED_PUBLIC]))
    third = serve(Named("third", arrivals, [SHARED_THIRD, THIRD_OWN]))
    found = Upstreams(private, public, third, files, arrivals)
    yield found
    for served in found.all():
        if served.port.connected:
            pytest_twisted.blockon(served.port.stopListening())


def yaml_text(up: Upstreams, tmp_path: Path, routes: bool = True, more: str = "", private: str = "") -> str:
    """
    The config: the three upstreams, a default group [private, public], a
    mirror group [public], a merge group [public, third], a solo group
    [third]; with C{routes},
    C{acme-*} only from private.
    """
    secret = tmp_path / "private.password"
    secret.write_text(PASSWORD + "\n")
    text = f"""
admin-token: {ADMIN_TOKEN}
upstreams:
  private:
    url: {up.private.url}
    username: {USERNAME}
    password-file: {secret}
    file-hosts: [{up.origin(up.files)}]
{private}
  public:
    url: {up.public.url}
  third:
    url: {up.third.url}
groups:
  default:
    members: [private, public]
  mirror:
    members: [public]
  merged:
    members: [public, third]
    strategy: merge
  solo:
    members: [third]
default-group: default
"""
    if routes:
        text += '\nroutes:\n  - projects: ["acme-*"]\n    upstreams: [private]\n'
    return text + more


@pytest.fixture
def start(tmp_path: Path) -> Iterator[Callable[..., Running]]:
    """
    Start proxies from YAML text (stopped at the end of the test).
    """
    running: list[Running] = []

    def factory(
        text: str,
        environ: dict[str, str] | None = None,
        endpoint: str = "tcp:0:interface=127.0.0.1",
        cache: str | None = None,
    ) -> Running:
        path = tmp_path / f"txpypi-{len(running)}.yaml"
        path.write_text(text)
        settings = options.read(str(path), {}, environ=environ or {})
        settings = attrs.evolve(
            settings, listen=(), cache_dir=cache or str(tmp_path / f"cache-{len(running)}")
        )
        service, proxy = build(settings, get_reactor())
        service.startService()
        r = Running(proxy, service, listen(proxy.site(), endpoint))
        running.append(r)
        return r

    yield factory
    for r in reversed(running):
        pytest_twisted.blockon(Deferred.fromCoroutine(r.stop()))


def page_files(body: bytes) -> dict[str, str]:
    """
    A JSON project page's files: each name and its sha256.
    """
    return {f["filename"]: f["hashes"]["sha256"] for f in json.loads(body)["files"]}


def page_urls(body: bytes) -> dict[str, str]:
    return {f["filename"]: f["url"] for f in json.loads(body)["files"]}


@contextmanager
def captured_log() -> Iterator[list[dict[str, Any]]]:
    """
    The log events emitted inside the block.
    """
    events: list[dict[str, Any]] = []
    observer = cast(ILogObserver, events.append)
    globalLogPublisher.addObserver(observer)
    try:
        yield events
    finally:
        globalLogPublisher.removeObserver(observer)


def asked(served: Served, path: str) -> int:
    return sum(1 for p, _ in served.fake.seen if p == path)


# -- first-index and routes


@pytest_twisted.ensureDeferred
async def test_default_group_resolves_to_private(
    upstreams: Upstreams, start: Callable[..., Running], tmp_path: Path
) -> None:
    """
    C{acme-lib} is private's 1.0 at C{/simple/}, C{/default/simple/} and
    C{/pypi/simple/}; with a route naming private, public is never asked
    about an C{acme-*} name at all, not even one private does not have.
    """
    running = start(yaml_text(upstreams, tmp_path))
    for prefix in ("/simple/", "/default/simple/", "/pypi/simple/"):
        response, body = await get(running.url + prefix + "acme-lib/", json_accept())
        assert response.code == 200, body
        assert page_files(body) == {PRIVATE_LIB.filename: PRIVATE_LIB.sha256}
    assert upstreams.private.fake.requests["/simple/acme-lib/"] >= 1
    # A routed name private does not know is unknown here: public, which
    # would answer it, is not asked.
    upstreams.public.fake.add(build_wheel("acme-missing", "99.0"))
    response, _ = await get(running.url + "/simple/acme-missing/", json_accept())
    assert response.code == 404
    assert asked(upstreams.private, "/simple/acme-missing/") == 1
    assert [p for p, _ in upstreams.public.fake.seen if "acme" in p] == []


@pytest_twisted.ensureDeferred
async def test_lower_member_asked_only_after_404(
    upstreams: Upstreams, start: Callable[..., Running], tmp_path: Path
) -> None:
    """
    Without a route: acme-lib is private's, and public is not asked about
    it; a project only public has is asked of private first (a 404), then
    of public.
    """
    running = start(yaml_text(upstreams, tmp_path, routes=False))
    response, body = await get(running.url + "/simple/acme-lib/", json_accept())
    assert response.code == 200 and page_files(body) == {PRIVATE_LIB.filename: PRIVATE_LIB.sha256}
    assert asked(upstreams.public, "/simple/acme-lib/") == 0

    response, body = await get(running.url + "/simple/widget/", json_accept())
    assert response.code == 200 and page_files(body) == {ONLY_PUBLIC.filename: ONLY_PUBLIC.sha256}
    order = [name for name, p in upstreams.arrivals if p == "/simple/widget/"]
    assert order == ["private", "public"]


@pytest_twisted.ensureDeferred
async def test_private_down_serves_stale_never_public(
    upstreams: Upstreams, start: Callable[..., Running], tmp_path: Path
) -> None:
    """
    Private fails after acme-lib was served (an injected 500, then its
    port closed): the page is private's stale 1.0, never public's 99.0,
    and public is never asked for 99.0's file.
    """
    running = start(yaml_text(upstreams, tmp_path, routes=False, private="    index-ttl: 0"))
    url = running.url + "/simple/acme-lib/"
    response, fresh = await get(url, json_accept())
    assert response.code == 200 and page_files(fresh) == {PRIVATE_LIB.filename: PRIVATE_LIB.sha256}

    upstreams.private.fake.page_faults["acme-lib"] = "500"
    before = upstreams.private.fake.requests["/simple/acme-lib/"]
    response, body = await get(url, json_accept())
    assert upstreams.private.fake.requests["/simple/acme-lib/"] > before  # it was asked
    assert response.code == 200 and header(response, "x-cache") == "STALE"
    assert page_files(body) == {PRIVATE_LIB.filename: PRIVATE_LIB.sha256}

    await upstreams.private.port.stopListening()
    response, body = await get(url, json_accept())
    assert response.code == 200 and header(response, "x-cache") == "STALE"
    assert page_files(body) == {PRIVATE_LIB.filename: PRIVATE_LIB.sha256}

    response, _ = await get(running.url + "/files/acme-lib/" + ATTACK_LIB.filename)
    assert response.code != 200
    assert [p for p, _ in upstreams.public.fake.seen if "acme" in p] == []


@pytest_twisted.ensureDeferred
async def test_owner_survives_a_restart_while_private_is_down(
    upstreams: Upstreams, start: Callable[..., Running], tmp_path: Path
) -> None:
    """
    A proxy restarted on the same cache while private is down still serves
    private's acme-lib (stale), never public's.
    """
    text = yaml_text(upstreams, tmp_path, routes=False, private="    index-ttl: 0")
    first = start(text, cache=str(tmp_path / "cache"))
    response, _ = await get(first.url + "/simple/acme-lib/", json_accept())
    assert response.code == 200
    await first.stop()
    await upstreams.private.port.stopListening()
    second = start(text, cache=str(tmp_path / "cache"))
    response, body = await get(second.url + "/simple/acme-lib/", json_accept())
    assert response.code == 200 and header(response, "x-cache") == "STALE", body
    assert page_files(body) == {PRIVATE_LIB.filename: PRIVATE_LIB.sha256}
    assert asked(upstreams.public, "/simple/acme-lib/") == 0


@pytest_twisted.ensureDeferred
async def test_routed_names_are_listed_only_from_their_upstreams(
    upstreams: Upstreams, start: Callable[..., Running], tmp_path: Path
) -> None:
    """
    The default group's project list has public's own projects but not an
    C{acme-*} name only public has.
    """
    upstreams.public.fake.add(build_wheel("acme-evil", "1.0"))
    running = start(yaml_text(upstreams, tmp_path))
    response, body = await get(running.url + "/simple/", json_accept())
    assert response.code == 200
    names = {p["name"] for p in json.loads(body)["projects"]}
    assert {"acme-lib", "widget", "shared"} <= names and "acme-evil" not in names


@pytest_twisted.ensureDeferred
async def test_private_down_without_stale_is_a_502_naming_it(
    upstreams: Upstreams, start: Callable[..., Running], tmp_path: Path
) -> None:
    """
    With C{stale-ttl: 0}, private failing is a 502 naming it for the
    project, never a fall through to public.
    """
    text = yaml_text(upstreams, tmp_path, routes=False, private="    index-ttl: 0", more="stale-ttl: 0\n")
    running = start(text)
    url = running.url + "/simple/acme-lib/"
    response, _ = await get(url, json_accept())
    assert response.code == 200
    upstreams.private.fake.page_faults["acme-lib"] = "500"
    response, body = await get(url, json_accept())
    assert response.code == 502
    assert len(body.strip().splitlines()) == 1
    assert "upstream private failed for acme-lib" in body.decode()
    assert ATTACK_LIB.filename.encode() not in body
    assert leaks(body.decode()) == []
    assert asked(upstreams.public, "/simple/acme-lib/") == 0


@pytest_twisted.ensureDeferred
async def test_higher_member_failing_is_no_reason_to_ask_lower(
    upstreams: Upstreams, start: Callable[..., Running], tmp_path: Path
) -> None:
    """
    A project no member was asked about yet: private failing (a 500, then
    refusing connections) is a 502 naming private, and public, which has
    the project, is not asked.
    """
    running = start(yaml_text(upstreams, tmp_path, routes=False))
    upstreams.private.fake.page_faults["widget"] = "500"
    response, body = await get(running.url + "/simple/widget/", json_accept())
    assert response.code == 502 and "upstream private failed for widget" in body.decode()
    assert asked(upstreams.private, "/simple/widget/") >= 1
    await upstreams.private.port.stopListening()
    response, body = await get(running.url + "/simple/widget/", json_accept())
    assert response.code == 502 and "upstream private failed for widget" in body.decode()
    assert asked(upstreams.public, "/simple/widget/") == 0
    health = json.loads((await get(running.url + "/health"))[1])
    assert health["upstreams"]["private"]["state"] == "degraded"


@pytest_twisted.ensureDeferred
async def test_a_lower_owner_is_remembered(
    upstreams: Upstreams, start: Callable[..., Running], tmp_path: Path
) -> None:
    """
    Once public owns widget (private said 404), private going down does not
    stop widget's page from being refreshed from public.
    """
    running = start(yaml_text(upstreams, tmp_path, routes=False, more="index-ttl: 0\n"))
    url = running.url + "/simple/widget/"
    response, _ = await get(url, json_accept())
    assert response.code == 200
    await upstreams.private.port.stopListening()
    before = asked(upstreams.public, "/simple/widget/")
    response, body = await get(url, json_accept())
    assert response.code == 200 and header(response, "x-cache") != "STALE", body
    assert page_files(body) == {ONLY_PUBLIC.filename: ONLY_PUBLIC.sha256}
    assert asked(upstreams.public, "/simple/widget/") == before + 1


@pytest_twisted.ensureDeferred
async def test_credentials_do_not_follow_a_redirect_to_another_origin(
    upstreams: Upstreams, start: Callable[..., Running], tmp_path: Path
) -> None:
    """
    Private answers its file with a redirect to the files origin (allowed
    by C{file-hosts}): the file arrives, and the files origin never sees
    private's Authorization header.
    """
    upstreams.files.fake.add(PRIVATE_LIB)
    target = f"{upstreams.origin(upstreams.files)}/packages/{PRIVATE_LIB.filename}"
    upstreams.private.fake.redirects["/packages/" + PRIVATE_LIB.filename] = target
    running = start(yaml_text(upstreams, tmp_path))
    _, body = await get(running.url + "/simple/acme-lib/", json_accept())
    url = urljoin(running.url + "/simple/acme-lib/", page_urls(body)[PRIVATE_LIB.filename])
    response, content = await get(url)
    assert response.code == 200 and content == PRIVATE_LIB.content
    assert upstreams.private.fake.requests["/packages/" + PRIVATE_LIB.filename] == 1
    assert upstreams.files.fake.requests["/packages/" + PRIVATE_LIB.filename] == 1
    assert [h for _, h in upstreams.files.fake.seen if "authorization" in h] == []


# -- merge and files


@pytest_twisted.ensureDeferred
async def test_merge_leaves_the_conflicting_file_out(
    upstreams: Upstreams, start: Callable[..., Running], tmp_path: Path
) -> None:
    """
    A merged page lists each member's files in priority order; third's file
    named as public's but with other bytes is left out, logged, counted.
    """
    with captured_log() as events:
        running = start(yaml_text(upstreams, tmp_path))
        before = sample(await scrape(running.url), "txpypi_conflicts_total", group="merged")
        response, body = await get(running.url + "/merged/simple/shared/", json_accept())
    assert response.code == 200, body
    assert page_files(body) == {
        SHARED_PUBLIC.filename: SHARED_PUBLIC.sha256,
        THIRD_OWN.filename: THIRD_OWN.sha256,
    }
    assert [f["filename"] for f in json.loads(body)["files"]] == [SHARED_PUBLIC.filename, THIRD_OWN.filename]
    lines = [formatEvent(e) for e in events]
    assert any(f"left {SHARED_THIRD.filename} of third out of shared" in line for line in lines), lines
    after = sample(await scrape(running.url), "txpypi_conflicts_total", group="merged")
    assert after == before + 1


@pytest_twisted.ensureDeferred
async def test_group_files_come_from_the_member_that_listed_them(
    upstreams: Upstreams, start: Callable[..., Running], tmp_path: Path
) -> None:
    """
    A file of a merged page is downloaded from the member that listed it,
    its bytes matching that member's hash; the same file name through the
    mirror group (public alone) is public's bytes, and through the solo
    group (third alone) third's.
    """
    running = start(yaml_text(upstreams, tmp_path))
    _, body = await get(running.url + "/merged/simple/shared/", json_accept())
    urls = page_urls(body)
    for dist, origin in ((THIRD_OWN, upstreams.third), (SHARED_PUBLIC, upstreams.public)):
        url = urljoin(running.url + "/merged/simple/shared/", urls[dist.filename])
        assert url.startswith(running.url + "/merged/files/"), url
        response, content = await get(url)
        assert response.code == 200
        assert hashlib.sha256(content).hexdigest() == page_files(body)[dist.filename] == dist.sha256
        assert origin.fake.requests["/packages/" + dist.filename] == 1
    assert upstreams.third.fake.requests["/packages/" + SHARED_THIRD.filename] == 0

    _, body = await get(running.url + "/mirror/simple/shared/", json_accept())
    assert page_files(body) == {SHARED_PUBLIC.filename: SHARED_PUBLIC.sha256}
    url = urljoin(running.url + "/mirror/simple/shared/", page_urls(body)[SHARED_PUBLIC.filename])
    assert url.startswith(running.url + "/mirror/files/"), url
    response, content = await get(url)
    assert response.code == 200 and content == SHARED_PUBLIC.content
    assert upstreams.third.fake.requests["/packages/" + SHARED_THIRD.filename] == 0

    # Third alone lists its own file of that name: its bytes, not public's
    # (cached by now under the same name).
    _, body = await get(running.url + "/solo/simple/shared/", json_accept())
    assert page_files(body)[SHARED_THIRD.filename] == SHARED_THIRD.sha256
    url = urljoin(running.url + "/solo/simple/shared/", page_urls(body)[SHARED_THIRD.filename])
    response, content = await get(url)
    assert response.code == 200 and content == SHARED_THIRD.content
    assert upstreams.third.fake.requests["/packages/" + SHARED_THIRD.filename] == 1


# -- credentials


def leaks(text: str) -> list[str]:
    """
    Which of the password, the Authorization header's value and its
    base64 part appear in C{text}.
    """
    secrets = (PASSWORD, AUTHORIZATION, AUTHORIZATION.removeprefix("Basic "))
    return [s for s in secrets if s in text]


def secret_config(up: Upstreams, tmp_path: Path, how: str) -> tuple[str, dict[str, str]]:
    """
    The config, with private's password read from a file or substituted
    from the environment.
    """
    text = yaml_text(up, tmp_path)
    if how == "password-file":
        return text, {}
    line = f"    password-file: {tmp_path / 'private.password'}\n"
    assert line in text
    return text.replace(line, "    password: ${PRIVATE_PASSWORD}\n"), {"PRIVATE_PASSWORD": PASSWORD}


@pytest.mark.parametrize("how", ["password-file", "environment"])
@pytest_twisted.ensureDeferred
async def test_credentials_are_sent_to_private_only_and_never_shown(
    how: str, upstreams: Upstreams, start: Callable[..., Running], tmp_path: Path
) -> None:
    """
    Private's basic auth (its password from a file or from C{${VAR}}) lets
    pages and files through; the password and the header never show in
    pages, response headers, the log, C{/metrics}, C{/health} or C{/}, and
    never go to another origin (the files origin private lists a file on).
    """
    text, environ = secret_config(upstreams, tmp_path, how)
    shown: list[str] = []
    with captured_log() as events:
        running = start(text, environ)
        for path in ("/simple/acme-lib/", "/simple/acme-tools/", "/simple/"):
            for accept in (json_accept(), {}):
                response, body = await get(running.url + path, accept)
                assert response.code == 200, (path, body)
                shown.append(body.decode())
                shown.append(repr(list(response.headers.getAllRawHeaders())))
        _, body = await get(running.url + "/simple/acme-lib/", json_accept())
        files = page_urls(body)
        _, body = await get(running.url + "/simple/acme-tools/", json_accept())
        files.update(page_urls(body))
        for dist in (PRIVATE_LIB, PRIVATE_TOOLS):
            url = urljoin(running.url + f"/simple/{dist.project}/", files[dist.filename])
            response, content = await get(url)
            assert response.code == 200 and content == dist.content, url
            shown.append(repr(list(response.headers.getAllRawHeaders())))
        for path in ("/metrics", "/health", "/", "/stats"):
            response, body = await get(running.url + path)
            shown.append(body.decode())
        health = json.loads((await get(running.url + "/health"))[1])
    shown += [formatEvent(e) or "" for e in events]
    shown += [repr(e) for e in events]

    # Private got the header on every request, and answered (no 401 loop).
    private_seen = upstreams.private.fake.seen
    assert private_seen and all(h.get("authorization") == AUTHORIZATION for _, h in private_seen)
    assert upstreams.files.fake.requests["/packages/" + PRIVATE_TOOLS.filename] == 1
    for served in (upstreams.files, upstreams.public, upstreams.third):
        assert [h for _, h in served.fake.seen if "authorization" in h] == []
    assert set(health["upstreams"]) == {"private", "public", "third"}
    assert health["upstreams"]["private"]["url"] == upstreams.private.url
    assert [leak for text in shown for leak in leaks(text)] == []
    metrics = await scrape(running.url)
    labelled = [
        line
        for line in metrics.splitlines()
        if line.startswith("txpypi_upstream_requests_total{") and 'upstream="private"' in line
    ]
    assert any(float(line.rpartition(" ")[2]) > 0 for line in labelled), metrics


@pytest_twisted.ensureDeferred
async def test_without_credentials_private_refuses(
    upstreams: Upstreams, start: Callable[..., Running], tmp_path: Path
) -> None:
    """
    The fake's check can fail: private without its username and password
    answers 401, which is private failing (a 502 naming it), not a reason
    to ask public.
    """
    text = yaml_text(upstreams, tmp_path)
    text = text.replace(f"    username: {USERNAME}\n", "").replace(
        f"    password-file: {tmp_path / 'private.password'}\n", ""
    )
    running = start(text)
    response, body = await get(running.url + "/simple/acme-lib/", json_accept())
    assert response.code == 502 and "upstream private failed for acme-lib" in body.decode()
    assert asked(upstreams.public, "/simple/acme-lib/") == 0
    assert upstreams.private.fake.seen and all(
        "authorization" not in h for _, h in upstreams.private.fake.seen
    )


# -- configuration


def read(
    tmp_path: Path, text: str, given: dict[str, str] | None = None, environ: dict[str, str] | None = None
) -> Any:
    path = tmp_path / "txpypi.yaml"
    path.write_text(text)
    return options.read(str(path), given or {}, environ=environ or {})


@pytest.mark.parametrize(
    "change, message",
    [
        (
            ("  mirror:\n", "  simple:\n"),
            "groups: 'simple' is a path of the proxy's own and cannot name a group",
        ),
        (
            ("    members: [public]\n", "    members: [public, nowhere]\n"),
            "groups: mirror: members: no upstream is named 'nowhere'",
        ),
        (
            ("private.password", "missing.password"),
            "upstreams: private: password-file: cannot read",
        ),
    ],
)
def test_config_errors_name_the_key(
    change: tuple[str, str], message: str, upstreams: Upstreams, tmp_path: Path
) -> None:
    """
    A reserved group name, a member that is no upstream and a password file
    that cannot be read each stop C{options.read} with one line naming the key.
    """
    text = yaml_text(upstreams, tmp_path)
    assert change[0] in text
    with pytest.raises(ConfigError) as raised:
        read(tmp_path, text.replace(change[0], change[1]))
    error = str(raised.value)
    assert message in error and len(error.splitlines()) == 1
    assert PASSWORD not in error


def test_upstreams_from_the_environment_and_precedence(upstreams: Upstreams, tmp_path: Path) -> None:
    """
    C{TXPYPI_UPSTREAMS} may be YAML text; for a scalar, the command line
    beats the environment, which beats the file.
    """
    upstreams_yaml = f"{{private: {{url: '{upstreams.private.url}'}}, public: '{upstreams.public.url}'}}"
    settings = read(tmp_path, "index-ttl: 9\n", environ={"TXPYPI_UPSTREAMS": upstreams_yaml})
    assert [(u.name, u.url) for u in settings.upstreams] == [
        ("private", upstreams.private.url),
        ("public", upstreams.public.url),
    ]
    assert settings.index_ttl == 9
    text = yaml_text(upstreams, tmp_path) + "index-ttl: 9\n"
    assert read(tmp_path, text).index_ttl == 9
    assert read(tmp_path, text, environ={"TXPYPI_INDEX_TTL": "7"}).index_ttl == 7
    assert read(tmp_path, text, {"index-ttl": "5"}, {"TXPYPI_INDEX_TTL": "7"}).index_ttl == 5


@pytest_twisted.ensureDeferred
async def test_upstreams_from_the_environment_serve(
    upstreams: Upstreams, start: Callable[..., Running], tmp_path: Path
) -> None:
    """
    A proxy whose upstreams come from C{TXPYPI_UPSTREAMS} alone serves its
    default group (first-index in the order given).
    """
    given = f"{{public: '{upstreams.public.url}', third: '{upstreams.third.url}'}}"
    running = start("", {"TXPYPI_UPSTREAMS": given})
    _, body = await get(running.url + "/simple/shared/", json_accept())
    assert page_files(body) == {SHARED_PUBLIC.filename: SHARED_PUBLIC.sha256}
    assert asked(upstreams.third, "/simple/shared/") == 0


# -- administration


@pytest_twisted.ensureDeferred
async def test_forget_a_groups_page_needs_the_token(
    upstreams: Upstreams, start: Callable[..., Running], tmp_path: Path
) -> None:
    """
    C{DELETE /<group>/cache/<project>} forgets that group's page with the
    admin token, and is a 401 without it.
    """
    running = start(yaml_text(upstreams, tmp_path))
    url = running.url + "/mirror/simple/widget/"
    assert header((await get(url))[0], "x-cache") == "MISS"
    assert header((await get(url))[0], "x-cache") == "HIT"
    for auth in ({}, {b"Authorization": [b"Bearer not-the-token-at-all"]}):
        response, _ = await get(running.url + "/mirror/cache/widget", auth, b"DELETE")
        assert response.code == 401
    assert header((await get(url))[0], "x-cache") == "HIT"
    response, _ = await get(
        running.url + "/mirror/cache/widget",
        {b"Authorization": [f"Bearer {ADMIN_TOKEN}".encode()]},
        b"DELETE",
    )
    assert response.code == 200
    assert header((await get(url))[0], "x-cache") == "MISS"
    assert upstreams.public.fake.requests["/simple/widget/"] == 2
    response, _ = await get(
        running.url + "/nowhere/cache/widget",
        {b"Authorization": [f"Bearer {ADMIN_TOKEN}".encode()]},
        b"DELETE",
    )
    assert response.code == 404


# -- found in review


@pytest_twisted.ensureDeferred
async def test_a_group_that_routes_a_project_away_drops_no_other_groups_file(
    upstreams: Upstreams, start: Callable[..., Running], tmp_path: Path
) -> None:
    """
    A group whose own route hides widget answers 404 for its file, and the
    copy the default group cached stays (a client could otherwise drop any
    group's files through another).
    """
    strict = (
        "  strict:\n    members: [private, public]\n"
        "    routes:\n      - projects: [widget]\n        upstreams: [private]\n"
    )
    text = yaml_text(upstreams, tmp_path, routes=False).replace("default-group:", strict + "default-group:")
    running = start(text)
    _, body = await get(running.url + "/simple/widget/", json_accept())
    url = urljoin(running.url + "/simple/widget/", page_urls(body)[ONLY_PUBLIC.filename])
    assert (await get(url))[0].code == 200
    assert header((await get(url))[0], "x-cache") == "HIT"  # landed
    response, _ = await get(running.url + "/strict/files/widget/" + ONLY_PUBLIC.filename)
    assert response.code == 404
    response, content = await get(url)
    assert header(response, "x-cache") == "HIT" and content == ONLY_PUBLIC.content
    assert upstreams.public.fake.requests["/packages/" + ONLY_PUBLIC.filename] == 1


@pytest_twisted.ensureDeferred
async def test_a_group_of_one_filters_its_list_by_routes_on_every_answer(
    upstreams: Upstreams, start: Callable[..., Running], tmp_path: Path
) -> None:
    upstreams.public.fake.add(build_wheel("acme-evil", "1.0"))
    running = start(yaml_text(upstreams, tmp_path))
    states = []
    for _ in range(2):
        response, body = await get(running.url + "/mirror/simple/", json_accept())
        names = {p["name"] for p in json.loads(body)["projects"]}
        assert "widget" in names and "acme-evil" not in names
        states.append(header(response, "x-cache"))
    assert states == ["MISS", "HIT"]


@pytest_twisted.ensureDeferred
async def test_the_files_of_a_merged_page_too_big_to_keep(
    upstreams: Upstreams, start: Callable[..., Running], tmp_path: Path
) -> None:
    """
    With a page-cache-size smaller than the merged page, it is served but
    not kept; its files still come from the member that listed them.
    """
    running = start(yaml_text(upstreams, tmp_path, more="page-cache-size: 1K\n"))
    page = running.url + "/merged/simple/shared/"
    _, body = await get(page, json_accept())
    urls = page_urls(body)
    for dist, fake in ((THIRD_OWN, upstreams.third.fake), (SHARED_PUBLIC, upstreams.public.fake)):
        response, content = await get(urljoin(page, urls[dist.filename]))
        assert response.code == 200 and content == dist.content
        assert fake.requests["/packages/" + dist.filename] == 1


@pytest_twisted.ensureDeferred
async def test_health_shows_the_default_groups_first_upstream(
    upstreams: Upstreams, start: Callable[..., Running], tmp_path: Path
) -> None:
    running = start(yaml_text(upstreams, tmp_path).replace("default-group: default", "default-group: mirror"))
    _, body = await get(running.url + "/health")
    assert json.loads(body)["upstream"]["url"] == upstreams.public.url
    _, page = await get(running.url + "/")
    assert f"<code>{upstreams.public.url}</code>: <span".encode() in page

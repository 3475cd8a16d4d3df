"""
The HTTP face of the proxy.

Hot paths (C{/simple/...} index pages and C{/files/...} downloads) are plain
twisted.web resources with pre-rendered bodies (L{txpypi.web.pages},
L{txpypi.web.files}, L{txpypi.web.peer}); everything else goes to a Klein
app whose routes are methods on L{Proxy}: the status page, C{/stats},
C{/metrics}, C{/health} and the administration routes.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Mapping
from typing import Any

import attrs
from klein import Klein
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.resource import IResource, Resource
from twisted.web.server import Request
from werkzeug.exceptions import HTTPException

from txpypi import __version__
from txpypi.cache.files import FileCache
from txpypi.cache.groupfiles import Groups
from txpypi.cache.groups import Group
from txpypi.cache.pages import PageCache
from txpypi.core.live import Live
from txpypi.core.names import BadName, check_filename, normalize
from txpypi.core.peer import HEADER as PEER_HEADER
from txpypi.core.peer import verify
from txpypi.core.policy import NO_POLICY
from txpypi.fetch.upstream import UpstreamClient
from txpypi.storage.outages import Outage, Unavailable
from txpypi.web.accesslog import AccessLogWriter
from txpypi.web.answers import answer_text, error_text, finish_text, header, run, status_of, text
from txpypi.web.carried import CarriedCounters
from txpypi.web.files import FilesResource
from txpypi.web.health import Health
from txpypi.web.legacy import LegacyResource, is_legacy
from txpypi.web.memo import Memo
from txpypi.web.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from txpypi.web.metrics import Metrics, merge
from txpypi.web.pages import SimpleResource
from txpypi.web.peer import PeerResource
from txpypi.web.sender import Sender
from txpypi.web.server import ConnectionLimits, ProxySite
from txpypi.web.siblings import Siblings
from txpypi.web.statuspage import StatusFigures, render_status

log = Logger(namespace="txpypi.app")

#: What the Klein routes may fail with that the client is told about (a
#: route with no such path or method, a store down); anything else is a
#: C{500}, logged.
ROUTE_ERRORS = (HTTPException, Unavailable)


class WorkerPart(Resource):
    """
    C{/_worker/<what>}: this worker's part of C{/metrics} or C{/health}, for
    a sibling, on the worker's own socket; only requests signed with the
    workers' secret are answered.
    """

    isLeaf = True

    def __init__(self, proxy: Proxy, secret: str, clock: IReactorTime) -> None:
        super().__init__()
        self._proxy = proxy
        self._secret = secret
        self._clock = clock

    def render_GET(self, request: Request) -> bytes | int:
        path = (request.path or b"").decode("latin-1")
        if not verify(self._secret, path, header(request, PEER_HEADER), self._clock.seconds()):
            return text(request, 403, "worker requests must be signed with the workers' secret")
        parts = request.postpath or []
        if len(parts) != 1:
            return text(request, 404, "worker parts are /_worker/metrics and /_worker/health")
        return run(request, self._answer(request, parts[0].decode("latin-1")))

    async def _answer(self, request: Request, what: str) -> None:
        body = await self._proxy.worker_part(what)
        if body is None:
            finish_text(request, 404, "worker parts are /_worker/metrics and /_worker/health")
            return
        kind = METRICS_CONTENT_TYPE.encode() if what == "metrics" else b"application/json"
        request.setHeader(b"content-type", kind)
        request.setHeader(b"content-length", b"%d" % len(body))
        request.write(body)
        request.finish()


class OwnRoot(Resource):
    """
    The root of a worker's own socket: C{/_peer/} and C{/_worker/} only.
    """

    def __init__(self, peer: Resource, worker: Resource) -> None:
        super().__init__()
        self._children = {b"_peer": peer, b"_worker": worker}

    def getChildWithDefault(self, path: bytes, request: Request) -> IResource:  # type: ignore[override]
        found = self._children.get(path)
        if found is not None:
            return found
        return _NotHere()


class _NotHere(Resource):
    isLeaf = True

    def render(self, request: Request) -> bytes:  # type: ignore[override]
        return text(request, 404, "a worker's own socket serves only /_peer/ and /_worker/")


class Root(Resource):
    """
    Dispatches the hot paths to cheap resources and everything else to Klein:
    C{/simple/} and C{/files/} (the default group's, also at C{/pypi/}),
    C{/<group>/simple/} and C{/<group>/files/}, and C{/_peer/}.
    """

    def __init__(
        self,
        simple: Resource,
        files: Resource,
        peer: Resource,
        fallback: IResource,
        groups: Mapping[bytes, tuple[Resource, Resource]] | None = None,
        legacy: Mapping[bytes, Resource] | None = None,
        default: bytes = b"default",
    ) -> None:
        """
        @param groups: each group's C{simple} and C{files} resources, by
            name (the default group's among them).
        """
        super().__init__()
        self._simple = simple
        self._files = files
        self._peer = peer
        self._fallback = fallback
        self._groups = dict(groups or {})
        self._groups[b"pypi"] = (simple, files)  # the layout Amargo's users have
        #: Each group's legacy JSON API, by name (the default's also at /pypi/).
        self._legacy = None if legacy is None else dict(legacy)
        self._default = default

    def quick(self, kind: bytes, group: bytes) -> SimpleResource | FilesResource | None:
        """
        The C{/simple/} or C{/files/} resource of a group (C{b""}: the
        default one, as at C{/simple/}) for the quick lane, or L{None}.
        """
        pair = (self._simple, self._files) if not group else self._groups.get(group)
        if pair is None:
            return None
        found = pair[0] if kind == b"simple" else pair[1]
        return found if isinstance(found, SimpleResource | FilesResource) else None

    def getChildWithDefault(self, path: bytes, request: Request) -> IResource:  # type: ignore[override]
        if path == b"simple":
            return self._simple
        if path == b"files":
            return self._files
        if path == b"_peer":
            return self._peer
        assert request.prepath is not None and request.postpath is not None
        if path == b"pypi" and self._legacy is not None and is_legacy(request.postpath):
            return self._legacy[self._default]
        group = self._groups.get(path)
        if group is not None and request.postpath and request.postpath[0] in (b"simple", b"files"):
            request.prepath.append(request.postpath.pop(0))
            return group[0] if request.prepath[-1] == b"simple" else group[1]
        if (
            self._legacy is not None
            and path in self._legacy
            and request.postpath[:1] == [b"pypi"]
            and is_legacy(request.postpath[1:])
        ):
            request.prepath.append(request.postpath.pop(0))
            return self._legacy[path]
        # Give Klein the whole path back.
        request.postpath.insert(0, request.prepath.pop())
        return self._fallback


@attrs.define(slots=False)
class Proxy:
    """
    The proxy: its caches, and the Klein routes that are not hot paths.
    """

    pages: PageCache
    files: FileCache
    clock: IReactorTime
    metrics: Metrics = attrs.field(factory=Metrics.create)
    sites: list[ProxySite] = attrs.field(factory=list)
    #: The stores watched for outages (L{txpypi.storage.outages}), for C{/health}.
    outages: tuple[Outage, ...] = ()
    #: The live settings it reads: the admin token, whether hits redirect
    #: to S3, and (through L{connections}, for its sites) the bounds on
    #: connections, the log format and the trusted proxies.
    live: Live = attrs.field(factory=Live, kw_only=True)
    #: The bounds on client connections, shared by all of its sites.
    connections: ConnectionLimits = attrs.field(kw_only=True)
    #: The upstream's client, whose state C{/health} and C{/} show.
    client: UpstreamClient = attrs.field(kw_only=True)
    #: The senders of file bodies in progress, on every site: the shutdown
    #: lets them finish, for a grace period, then aborts them.
    senders: set[Sender] = attrs.field(factory=set, kw_only=True)
    #: The groups it serves (by default the one group of C{pages}).
    groups: Groups = attrs.field(kw_only=True)
    #: Where its sites' access log lines go, buffered (L{None}: as
    #: twisted.logger events).
    access: AccessLogWriter | None = attrs.field(default=None, kw_only=True)
    #: Every upstream's client by upstream name, for C{/health} (by
    #: default C{client}, as C{pages}' upstream's).
    clients: Mapping[str, UpstreamClient] = attrs.field(kw_only=True)
    #: The other workers, when this process is one of several
    #: (C{--workers}): C{/metrics} and C{/health} answer for them all.
    siblings: Siblings | None = attrs.field(default=None, kw_only=True)
    #: A worker's counters, carried over from the worker before it and
    #: written at each report (L{txpypi.web.carried}).
    carried: CarriedCounters | None = attrs.field(default=None, kw_only=True)
    app = Klein()

    @connections.default
    def _connections(self) -> ConnectionLimits:
        return ConnectionLimits(self.live)

    @groups.default
    def _groups(self) -> Groups:
        return Groups.alone(self.pages, self.files, self.clock)

    @clients.default
    def _clients(self) -> Mapping[str, UpstreamClient]:
        return {self.pages.upstream.name: self.client}

    @property
    def admin_token(self) -> str | None:
        return self.live.admin_token

    @admin_token.setter
    def admin_token(self, value: str | None) -> None:
        self.live.admin_token = value

    def __attrs_post_init__(self) -> None:
        self.metrics.watch(self._state)
        # One query per second at most, however many ask (see MEMO_TTL).
        self._top: Memo[int, list[tuple[str, int]]] = Memo(self.clock)
        self._project_rows: Memo[str, list[tuple[str, str, int]]] = Memo(self.clock)
        self._health = Health(
            self.clock,
            self.pages,
            self.files,
            self.client,
            self.outages,
            upstreams=self._upstreams(),
            policy=lambda: self.live.policy,
        )

    def _upstreams(self) -> dict[str, tuple[PageCache, UpstreamClient]]:
        found: dict[str, tuple[PageCache, UpstreamClient]] = {}
        for group in self.groups.by_name.values():
            for name, pages in group.members.items():
                found[name] = (pages, self.clients.get(name, self.client))
        return found

    def _state(self) -> dict[str, float]:
        files = self.files
        return {
            "txpypi_cache_bytes": files.usage.size or 0,
            "txpypi_cache_files": files.usage.count or 0,
            "txpypi_cache_max_bytes": files.usage.max_size or 0,
            "txpypi_downloads_in_flight": len(files.downloads.flights),
            "txpypi_download_clients": sum(f.clients for f in files.downloads.flights.values()),
            "evictions": files.usage.evictions,
            "txpypi_connections_open": self.connections.open,
        }

    def _group_resources(self, group: Group) -> tuple[Resource, Resource]:
        files = self.groups.files_of(group)
        pages = self.groups.pages_of(group)
        return SimpleResource(pages), FilesResource(
            files, lambda: self.live.redirect_ttl, self.senders, lambda: self.live.accel_redirect
        )

    def site(self) -> ProxySite:
        served = {name.encode(): self._group_resources(g) for name, g in self.groups.by_name.items()}
        simple, files = served[self.groups.default_name.encode()]
        legacy = None
        if self.groups.legacy is not None:
            api = self.groups.legacy
            legacy = {
                name.encode(): LegacyResource(
                    api, g, self.groups.policed.get(name), lambda: self.live.trusted_proxies
                )
                for name, g in self.groups.by_name.items()
            }
        peer = PeerResource(self.files, self.clock, self.senders)
        default = self.groups.default_name.encode()
        root = Root(simple, files, peer, self.app.resource(), served, legacy, default)
        site = ProxySite(root, self.clock, self.metrics, self.connections, self.access)
        self.sites.append(site)
        return site

    def own_site(self) -> ProxySite:
        """
        The site of a worker's own socket: only what the other workers and
        instances ask of this one (C{/_peer/} and C{/_worker/}, both signed),
        never the proxy's routes, so that the socket opens no way around a
        listener's TLS, address or front proxy.  It writes no access log
        lines and counts nothing in the metrics: its requests are the
        proxy's own.
        """
        assert self.siblings is not None
        peer = PeerResource(self.files, self.clock, self.senders)
        root = OwnRoot(peer, WorkerPart(self, self.siblings.secret, self.clock))
        site = ProxySite(root, self.clock, self.metrics, self.connections, self.access, counted=False)
        self.sites.append(site)
        return site

    def _policies(self) -> tuple[tuple[str, str], ...]:
        """
        Each group's policy in force, in words: its own, and its members'
        own settings over it.
        """
        table = self.live.policy
        found = []
        for name, group in self.groups.by_name.items():
            words = []
            if table.groups.get(name) is not None and table.groups[name].active:
                words.append(table.groups[name].words())
            for member in group.spec.members:
                own = table.upstreams.get(member)
                if own is not None:
                    words.append(f"{member}: {table.of(name, member).words()}")
            if words:
                found.append((name, "; ".join(words)))
        return tuple(found)

    def _sample(self, name: str, **labels: str) -> float:
        value = self.metrics.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    @app.route("/", methods=["GET", "HEAD"])
    async def home(self, request: Request) -> bytes:
        """
        The status page, for people: plain HTML, no JavaScript.
        """
        request.setHeader(b"content-type", b"text/html; charset=utf-8")
        request.setHeader(b"cache-control", b"no-store")
        host = (request.getHeader(b"host") or b"localhost").decode("latin-1")
        scheme = "https" if request.isSecure() else "http"
        index = f"{scheme}://{host}/simple/"
        client = self.client
        state = "offline" if self.pages.offline else client.state()
        hits = sum(self._sample("txpypi_cache_answers_total", kind=k, result="hit") for k in ("page", "file"))
        misses = sum(
            self._sample("txpypi_cache_answers_total", kind=k, result="miss") for k in ("page", "file")
        )
        saved = self._sample("txpypi_served_bytes_total", source="cache")
        figures = StatusFigures(
            version=__version__,
            upstream=self.pages.upstream.url,
            upstream_state=state,
            files=self.files.usage.count,
            size=self.files.usage.size or 0,
            max_size=self.files.usage.max_size,
            hit_ratio=None if hits + misses == 0 else hits / (hits + misses),
            saved=int(saved),
            in_flight=len(self.files.downloads.flights),
            top=await self._top.get(10, lambda: self.files.top_projects(10)),
            index_url=index,
            upstreams=tuple(
                (name, pages.upstream.url, "offline" if pages.offline else up.state())
                for name, (pages, up) in self._upstreams().items()
            ),
            groups=tuple(name for name in self.groups.by_name if name != self.groups.default_name),
            policies=self._policies(),
        )
        return render_status(figures)

    @app.route("/stats", methods=["GET"])
    async def stats(self, request: Request) -> bytes:
        """
        Download counts as JSON: the top projects (C{?top=N}, default 20), and
        one project's versions and files with C{?project=NAME}.
        """
        args = request.args or {}
        try:
            top = min(1000, max(1, int((args.get(b"top") or [b"20"])[0])))
        except ValueError:
            return text(request, 400, "top must be a number")
        top_rows = await self._top.get(top, lambda: self.files.top_projects(top))
        body: dict[str, Any] = {"top": [{"project": p, "downloads": n} for p, n in top_rows]}
        project = args.get(b"project")
        if project:
            try:
                name = normalize(project[0].decode("utf-8", "replace"))
            except BadName as e:
                return error_text(request, e)
            rows = await self._project_rows.get(name, lambda: self.files.project_downloads(name))
            versions: dict[str, int] = {}
            for version, _, n in rows:
                versions[version] = versions.get(version, 0) + n
            body["project"] = {
                "name": name,
                "downloads": sum(n for _, _, n in rows),
                "versions": versions,
                "files": {f: n for _, f, n in rows},
            }
        request.setHeader(b"content-type", b"application/json")
        return json.dumps(body, indent=2).encode() + b"\n"

    @app.route("/metrics", methods=["GET"])
    async def metrics_page(self, request: Request) -> bytes:
        """
        The metrics; of all the workers together, when there are several.
        """
        request.setHeader(b"content-type", METRICS_CONTENT_TYPE.encode())
        own = await self.own_metrics()
        if self.siblings is None:
            return own
        answers = await self.siblings.gather("metrics")
        # A sibling that did not answer now counts with its last figures
        # (its file, else its last answer here): its counters do not fall
        # out of the totals while it is busy or starting again.
        if self.carried is not None:
            theirs = await self.carried.latest(answers)
        else:
            theirs = [text for text, _ in answers if text is not None]
        return merge([own, *theirs], answering=1 + sum(now for _, now in answers))

    async def own_metrics(self) -> bytes:
        """
        This process's metrics; a worker's with the counters of the workers
        before it, written before they are given (L{CarriedCounters}).
        """
        if self.carried is None:
            return self.metrics.render()
        return await self.carried.report(self.metrics.render)

    async def worker_part(self, what: str) -> bytes | None:
        """
        This worker's own part of C{/metrics} or C{/health}, for a sibling;
        L{None} for anything else.
        """
        if what == "metrics":
            return await self.own_metrics()
        if what == "health":
            serving, body = await self._health.report()
            return json.dumps({"serving": serving, "status": body.get("status")}).encode()
        return None

    async def _workers(self) -> dict[str, Any] | None:
        """
        What C{/health} says of the workers: how many, how many answered,
        and the status of each that did (this one first).
        """
        if self.siblings is None:
            return None
        statuses = []
        answers = await self.siblings.gather("health")
        for answer, now in answers:
            try:
                statuses.append(json.loads(answer or b"")["status"] if now else "not answering")
            except (ValueError, KeyError, TypeError):
                statuses.append("not answering")
        answering = 1 + sum(now for _, now in answers)
        return {"count": self.siblings.count, "answering": answering, "others": statuses}

    @app.route("/health", methods=["GET"])
    async def health(self, request: Request) -> bytes:
        """
        The proxy's state as JSON (see L{Health.report}): C{200} while it
        can serve, even degraded; C{503} when it cannot.  With several
        workers, C{workers} says how the others are.
        """
        serving, body = await self._health.report()
        workers = await self._workers()
        if workers is not None:
            body["workers"] = workers
        request.setResponseCode(200 if serving else 503)
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(body, indent=2).encode() + b"\n"

    @app.route("/<group>/policy", methods=["GET"])
    def policy(self, request: Request, group: str) -> bytes:
        """
        The supply-chain policy in force in a group, as JSON: the group's
        own settings, and what applies to each member's files (its own
        settings over the group's).
        """
        found = self.groups.get(group)
        if found is None:
            return text(request, 404, "no such group")
        table = self.live.policy
        body = {
            "group": found.name,
            "policy": table.groups.get(found.name, NO_POLICY).describe(),
            "upstreams": {name: table.of(found.name, name).describe() for name in found.spec.members},
        }
        request.setHeader(b"content-type", b"application/json")
        request.setHeader(b"cache-control", b"no-store")
        return json.dumps(body, indent=2).encode() + b"\n"

    # -- administration: only with the bearer token

    def _refused(self, request: Request) -> bytes | None:
        """
        The answer when the request may not administer, else L{None}.
        """
        if self.admin_token is None:
            return text(request, 404, "not found: no admin token is configured")
        given = header(request, b"authorization") or ""
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            token.strip().encode(), self.admin_token.encode()
        ):
            request.setHeader(b"www-authenticate", b'Bearer realm="txpypi"')
            return text(request, 401, "a valid admin bearer token is required")
        return None

    @app.route("/cache/", methods=["DELETE"])
    async def forget_list(self, request: Request) -> bytes:
        """
        Forget the default group's project list: the cache of C{/simple/},
        as C{/cache/<project>} is that of C{/simple/<project>/}.
        """
        return await self._forget(request, self.groups.default, None)

    @app.route("/<group>/cache/", methods=["DELETE"])
    async def forget_group_list(self, request: Request, group: str) -> bytes:
        return await self._forget(request, self.groups.get(group), None)

    @app.route("/cache/<project>", methods=["DELETE"])
    async def forget_project(self, request: Request, project: str) -> bytes:
        """
        Forget one project's index page.  C{/cache/list} was the route of
        the project list, and a project is named C{list}: it forgets both,
        which is harmless, so neither shadows the other.
        """
        return await self._forget(request, self.groups.default, project)

    @app.route("/<group>/cache/<project>", methods=["DELETE"])
    async def forget_group_project(self, request: Request, group: str, project: str) -> bytes:
        """
        Forget one project's page in a group: in each of its members, and
        which member owns it.
        """
        return await self._forget(request, self.groups.get(group), project)

    async def _forget(self, request: Request, group: Group | None, project: str | None) -> bytes:
        refused = self._refused(request)
        if refused is not None:
            return refused
        if group is None:
            return text(request, 404, "no such group")
        if project is None:
            await group.forget(None)
            return text(request, 200, "forgot the project list")
        try:
            name = normalize(project)
        except BadName as e:
            return error_text(request, e)
        await group.forget(name)
        if project == "list":
            await group.forget(None)
            both = "forgot the index page of list and the project list (that is DELETE /cache/ now)"
            return text(request, 200, both)
        return text(request, 200, f"forgot the index page of {name}")

    @app.route("/cache/<project>/<filename>", methods=["DELETE"])
    async def purge_file(self, request: Request, project: str, filename: str) -> bytes:
        return await self._purge(request, self.groups.default, project, filename)

    @app.route("/<group>/cache/<project>/<filename>", methods=["DELETE"])
    async def purge_group_file(self, request: Request, group: str, project: str, filename: str) -> bytes:
        return await self._purge(request, self.groups.get(group), project, filename)

    async def _purge(self, request: Request, group: Group | None, project: str, filename: str) -> bytes:
        refused = self._refused(request)
        if refused is not None:
            return refused
        if group is None:
            return text(request, 404, "no such group")
        try:
            name = normalize(project)
            check_filename(filename)
        except BadName as e:
            return error_text(request, e)
        if not await self.groups.files_of(group).purge(name, filename):
            return text(request, 404, f"{name} has no cached file {filename}")
        return text(request, 200, f"purged {filename}")

    @app.handle_errors(Exception)  # type: ignore[arg-type]
    def error(self, request: Request, failure: Failure) -> bytes:
        error = failure.value
        answer = status_of(error) if isinstance(error, ROUTE_ERRORS) else None
        if answer is None:
            log.failure("error in {path}", failure, path=request.path)
            return text(request, 500, "internal error")
        return answer_text(request, answer)

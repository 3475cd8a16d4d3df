"""
Reading the C{upstreams:}, C{groups:}, C{default-group:} and C{routes:}
settings into the values of L{txpypi.core.groups}, and the one
L{topology} of a L{Settings}: the named upstreams and groups, or the
command line's C{--upstream} (repeated: first-index in that order) as one
group.

Secrets are read here, at start-up (and at SIGHUP, which reports them as
kept: they need a restart): a password or token file that cannot be read
stops start-up with one line naming the key, never the secret.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from typing import Any

import attrs
import yaml

from txpypi.config import (
    DEFAULT_UPSTREAM,
    ConfigError,
    Settings,
    file_hosts,
    first_line,
    flag,
    seconds,
    upstream_url,
)
from txpypi.core.groups import (
    DEFAULT_GROUP,
    STRATEGIES,
    GroupSpec,
    Route,
    Topology,
    TopologyError,
    UpstreamSpec,
    check_name,
    json_api_of,
    single,
)
from txpypi.core.policy import Policy, PolicyError, PolicyTable, parse_policy
from txpypi.fetch.tls import load_certificates

#: The keys of one upstream under C{upstreams:}.
UPSTREAM_KEYS = frozenset(
    {
        "url",
        "username",
        "password",
        "password-file",
        "token",
        "token-file",
        "ca-file",
        "verify",
        "index-ttl",
        "file-hosts",
        "policy",
        "json-api",
        "json-api-url",
    }
)
GROUP_KEYS = frozenset({"members", "strategy", "routes", "policy"})
ROUTE_KEYS = frozenset({"projects", "upstreams"})


def _yaml(key: str, value: Any) -> Any:
    """
    A value given in YAML, or as YAML text (from a C{TXPYPI_*} variable).
    """
    if not isinstance(value, str):
        return value
    try:
        return yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: not valid YAML: {str(e).splitlines()[0]}") from None


def _table(key: str, value: Any) -> Mapping[Any, Any]:
    value = _yaml(key, value)
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key}: expected a mapping")
    return value


def _names(key: str, value: Any) -> tuple[str, ...]:
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise ConfigError(f"{key}: expected a list of names")
    return tuple(values)


def _unknown(key: str, given: Mapping[Any, Any], known: frozenset[str]) -> None:
    for name in given:
        if name not in known:
            raise ConfigError(f"{key}: unknown key {name!r}")


def _entry(key: str, given: Any, short: type, main: str, known: frozenset[str]) -> Mapping[Any, Any]:
    """
    One entry of a table: a mapping of C{known} keys, or its short form (a
    value of type C{short}, standing for C{{main: value}}).
    """
    if isinstance(given, short):
        given = {main: given}
    if not isinstance(given, Mapping):
        raise ConfigError(f"{key}: expected a mapping with {main}")
    _unknown(key, given, known)
    return given


def _secret(key: str, given: Mapping[Any, Any], name: str) -> str | None:
    """
    The secret given as C{name} or read from C{name}-file (its first line).
    """
    if name in given and f"{name}-file" in given:
        raise ConfigError(f"{key}: {name} or {name}-file, not both")
    if f"{name}-file" in given:
        value = first_line(f"{key}: {name}-file", given[f"{name}-file"]).strip()
    elif name in given:
        value = given[name]
        if not isinstance(value, str):
            raise ConfigError(f"{key}: {name}: expected a string")
        value = value.strip()
    else:
        return None
    if not value:
        raise ConfigError(f"{key}: {name} is empty")
    return value


def authorization(key: str, given: Mapping[Any, Any]) -> str | None:
    """
    The C{Authorization} header an upstream's settings give: basic auth
    from C{username} and C{password}, or a bearer C{token}.
    """
    password = _secret(key, given, "password")
    token = _secret(key, given, "token")
    username = given.get("username")
    if username is not None and (not isinstance(username, str) or not username or ":" in username):
        raise ConfigError(f"{key}: username: expected a name without a colon")
    if token is not None and (password is not None or username is not None):
        raise ConfigError(f"{key}: a token or a username and password, not both")
    if token is not None:
        return f"Bearer {token}"
    if (username is None) != (password is None):
        raise ConfigError(f"{key}: username and password go together")
    if username is None or password is None:
        return None
    return "Basic " + base64.b64encode(f"{username}:{password}".encode()).decode("ascii")


def _upstream(name: str, given: Any) -> UpstreamSpec:
    key = f"upstreams: {name}"
    given = _entry(key, given, str, "url", UPSTREAM_KEYS)
    if "url" not in given:
        raise ConfigError(f"{key}: url: required")
    url = upstream_url(f"{key}: url", given["url"])  # refuses user information in it
    ttl = given.get("index-ttl")
    hosts = given.get("file-hosts")
    ca_file = None if given.get("ca-file") is None else str(given["ca-file"])
    if ca_file is not None:
        try:
            load_certificates(ca_file)  # read at start-up: a bad one stops it here
        except ValueError as e:
            raise ConfigError(f"{key}: {e}") from None
    json_api = json_api_of(url if url.endswith("/") else url + "/")
    if "json-api-url" in given:
        json_api = upstream_url(f"{key}: json-api-url", given["json-api-url"])
        json_api = json_api if json_api.endswith("/") else json_api + "/"
    if not flag(f"{key}: json-api", given.get("json-api", True)):
        json_api = None
    return UpstreamSpec(
        name,
        url,
        authorization=authorization(key, given),
        ca_file=ca_file,
        verify=flag(f"{key}: verify", given.get("verify", True)),
        index_ttl=None if ttl is None else seconds(f"{key}: index-ttl", ttl),
        file_hosts=None if hosts is None else file_hosts(f"{key}: file-hosts", hosts),
        policy=_policy(key, given),
        json_api=json_api,
    )


def upstreams_table(key: str, value: Any) -> tuple[UpstreamSpec, ...]:
    """
    C{upstreams:}: each upstream by name, with its C{url} and the optional
    C{username}, C{password}/C{password-file}, C{token}/C{token-file},
    C{ca-file}, C{verify}, C{index-ttl} and C{file-hosts}.
    """
    table = _table(key, value)
    specs = []
    for name, given in table.items():
        specs.append(_upstream(group_name(key, name), given))
    if not specs:
        raise ConfigError(f"{key}: at least one upstream is needed")
    return tuple(specs)


#: Runs of the characters PEP 503 normalizes to one dash.
_SEPARATORS = re.compile(r"[-_.]+")


def _glob(key: str, pattern: Any) -> str:
    if not isinstance(pattern, str) or not pattern:
        raise ConfigError(f"{key}: expected a glob of project names")
    return _SEPARATORS.sub("-", pattern).lower()


def routes_list(key: str, value: Any) -> tuple[Route, ...]:
    """
    C{routes:}: a list of C{projects:} (globs, matched against normalized
    names) each with the C{upstreams:} they alone may be asked of.
    """
    value = _yaml(key, value)
    if not isinstance(value, list):
        raise ConfigError(f"{key}: expected a list of routes")
    routes = []
    for i, given in enumerate(value):
        where = f"{key}: {i + 1}"
        if not isinstance(given, Mapping):
            raise ConfigError(f"{where}: expected projects and upstreams")
        _unknown(where, given, ROUTE_KEYS)
        projects = tuple(
            _glob(f"{where}: projects", p) for p in _names(f"{where}: projects", given.get("projects"))
        )
        upstreams = _names(f"{where}: upstreams", given.get("upstreams"))
        if not projects or not upstreams:
            raise ConfigError(f"{where}: a route needs projects and upstreams")
        routes.append(Route(projects, upstreams))
    return tuple(routes)


def groups_table(key: str, value: Any) -> tuple[GroupSpec, ...]:
    """
    C{groups:}: each group by name, with its C{members} in priority order,
    its C{strategy} (C{first-index}, the default, or C{merge}) and its own
    C{routes}.
    """
    table = _table(key, value)
    groups = []
    for name, given in table.items():
        where = f"{key}: {group_name(key, name)}"
        given = _entry(where, given, list, "members", GROUP_KEYS)
        strategy = given.get("strategy", "first-index")
        if strategy not in STRATEGIES:
            raise ConfigError(f"{where}: strategy: expected first-index or merge, got {strategy!r}")
        members = _names(f"{where}: members", given.get("members"))
        routes = routes_list(f"{where}: routes", given.get("routes", []))
        groups.append(GroupSpec(name, members, strategy, routes, policy=_policy(where, given)))
    return tuple(groups)


def group_name(key: str, value: Any) -> str:
    """
    A group's or an upstream's name, checked (see L{check_name}).
    """
    try:
        return check_name(key, value)
    except TopologyError as e:
        raise ConfigError(str(e)) from None


def _policy(key: str, given: Mapping[Any, Any]) -> Policy | None:
    if "policy" not in given:
        return None
    try:
        return parse_policy(given["policy"])
    except PolicyError as e:
        raise ConfigError(f"{key}: policy: {e}") from None


def policy_table(settings: Settings) -> PolicyTable:
    """
    The policies the groups and upstreams of C{settings} set (SIGHUP takes
    them from the new settings, while the groups themselves need a restart).
    """
    found = topology(settings)
    return PolicyTable(
        groups={g.name: g.policy for g in found.groups if g.policy is not None},
        upstreams={u.name: u.policy for u in found.upstreams if u.policy is not None},
    )


def upstream_urls(key: str, value: Any) -> tuple[str, ...]:
    """
    C{upstream}: one URL, or several (first-index in that order).
    """
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{key}: expected a URL or a list of URLs")
    return tuple(upstream_url(key, v) for v in values)


def topology(settings: Settings) -> Topology:
    """
    The upstreams, groups and routes that C{settings} give.

    @raise ConfigError: they do not fit together, naming the key.
    """
    try:
        if not settings.upstreams:
            if settings.groups or settings.routes or settings.default_group != DEFAULT_GROUP:
                raise ConfigError(
                    "groups: groups, routes and default-group need named upstreams (upstreams:)"
                )
            return _hosts(settings, single(settings.upstream))
        if settings.upstream != (DEFAULT_UPSTREAM,):
            raise ConfigError("upstream: set upstream or upstreams, not both")
        names = tuple(s.name for s in settings.upstreams)
        groups = settings.groups or (GroupSpec(DEFAULT_GROUP, names),)
        found = Topology(settings.upstreams, groups, settings.default_group, settings.routes)
        return _hosts(settings, found)
    except TopologyError as e:
        raise ConfigError(str(e)) from None


def _hosts(settings: Settings, found: Topology) -> Topology:
    """
    C{found} with the global C{file-host} list for each upstream that has
    no C{file-hosts} of its own.
    """
    if settings.file_hosts is None:
        return found
    specs = tuple(
        s if s.file_hosts is not None else attrs.evolve(s, file_hosts=settings.file_hosts)
        for s in found.upstreams
    )
    return attrs.evolve(found, upstreams=specs)

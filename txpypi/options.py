"""
The one table of options: one row per setting, with its name (the same on
the command line and in the YAML file), how its value is read, its help,
and whether SIGHUP applies it to a running process or it needs a restart.

Everything else is derived from the table: the twistd command line
(L{CommandLine}, one C{opt_*} handler per row), the YAML keys (L{KEYS}),
the settings a restart needs (L{FIXED}) and the ones SIGHUP applies
(L{LIVE}), and the bounds checked once all settings are in.  The typed
value, with the defaults, is L{txpypi.config.Settings}; a test checks that
its fields and the rows are the same set, and that C{README.md} and
C{etc/txpypi.yaml} name the same options.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal

import attrs
from twisted.python import usage

from txpypi import config
from txpypi.config import (
    MAX_PRESIGNED_TTL,
    ConfigError,
    Parse,
    Settings,
    addresses,
    anything,
    choice,
    count,
    directory,
    endpoints,
    file_hosts,
    first_line,
    flag,
    log_format,
    rate,
    redis_url,
    seconds,
    secret,
    size,
    text,
    url,
    workers,
)
from txpypi.core.live import Live
from txpypi.upstreams import (
    group_name,
    groups_table,
    policy_table,
    routes_list,
    topology,
    upstream_urls,
    upstreams_table,
)

#: What an option takes on the command line: a value (C{--name VALUE}),
#: nothing (C{--name}; C{true} or C{false} in YAML), or a value each time it
#: is repeated (a list in YAML); or a table, only in YAML (or as YAML text
#: in its C{TXPYPI_*} variable), with no command-line option.
Takes = Literal["value", "flag", "list", "table"]


def _attribute(option: Option) -> str:
    return option.name.replace("-", "_")


@attrs.frozen
class Option:
    """
    One setting: a row of the table.
    """

    #: The long option and the YAML key, e.g. C{max-downloads}.
    name: str
    #: Reads a value given under a key (which its errors name).
    parse: Parse
    #: The C{--help} text.
    help: str
    #: Whether SIGHUP applies it; the others need a restart.
    live: bool
    takes: Takes = "value"
    #: A secret: the command line takes only C{--NAME-file} (its first line
    #: is the value), YAML both C{NAME} and C{NAME-file}.
    secret: bool = False
    #: Other YAML keys for it.
    also: tuple[str, ...] = ()
    #: Bounds checked once all settings are in, defaults included.
    least: float | None = None
    most: float | None = None
    #: The L{Settings} field (by default the name in snake case).
    attribute: str = attrs.field(default=attrs.Factory(_attribute, takes_self=True))

    @property
    def flag(self) -> str:
        """
        The long option, without its C{--}.
        """
        return f"{self.name}-file" if self.secret else self.name

    @property
    def default(self) -> Any:
        """
        The value when it is not given: the L{Settings} field's default.
        """
        return getattr(Settings(), self.attribute)

    def keys(self) -> Iterator[tuple[str, Callable[[Any], Any]]]:
        """
        Its YAML keys, each with what reads a value given under it.
        """
        for key in (self.name, *self.also):
            yield key, _under(self.parse, key)
        if self.secret:
            yield f"{self.name}-file", _from_file(self.parse, self.name)

    def bounds_error(self, value: Any) -> ConfigError | None:
        """
        The error for a value out of its bounds, if it is.
        """
        if self.least is None:
            return None
        if self.most is not None and not self.least <= value <= self.most:
            return ConfigError(f"{self.name}: expected {self.least:g} to {self.most:g} seconds")
        if value < self.least:
            unit = "second" if self.least == 1 else "seconds"
            return ConfigError(f"{self.name}: must be at least {self.least:g} {unit}")
        return None


def _under(parse: Parse, key: str) -> Callable[[Any], Any]:
    return lambda value: parse(key, value)


def _from_file(parse: Parse, name: str) -> Callable[[Any], Any]:
    return lambda path: parse(name, first_line(f"{name}-file", path))


# fmt: off
#: Every setting, in the order SIGHUP reports the ones it keeps.
OPTIONS: tuple[Option, ...] = (
    Option("listen", endpoints, takes="list", live=False, help=(
        "A Twisted server endpoint string to listen on; repeat it to listen on several "
        "(default: tcp:5000:interface=127.0.0.1).")),
    Option("upstream", upstream_urls, takes="list", live=False, help=(
        "The upstream simple index URL; repeat it for several, asked first-index in that "
        "order (default: https://pypi.org/simple/).")),
    Option("cache-dir", directory, live=False, help=(
        "Where cached files and metadata live (default: ~/.cache/txpypi).")),
    Option("index-ttl", seconds, live=True, help=(
        "Seconds an index page stays fresh (default: 600).")),
    Option("connect-timeout", seconds, live=False, help=(
        "Seconds to wait for a connection to the upstream (default: 10).")),
    Option("response-timeout", seconds, live=True, help=(
        "Seconds to wait for the upstream's response headers (default: 30).")),
    Option("read-timeout", seconds, live=True, help=(
        "Seconds the upstream may send nothing in the middle of a page or file before the "
        "fetch fails (default: 60).")),
    Option("stale-ttl", seconds, live=True, help=(
        "Seconds past its TTL an index page may still be served (X-Cache: STALE) while the "
        "upstream is down or failing; 0 turns it off (default: 604800, a week).")),
    Option("offline", flag, takes="flag", live=True, help=(
        "Never contact the upstream: serve what is cached, 404 for the rest.")),
    Option("max-cache-size", size, live=True, help=(
        "Keep cached files under this size (500M, 20G, ...: powers of 1024), evicting the "
        "least recently served (default: no limit).")),
    Option("stall-meter", flag, takes="flag", live=False, help=(
        "Time the reactor thread every 10 ms and export its longest stall as metrics "
        "(txpypi_reactor_stall_seconds_max, txpypi_reactor_lateness_seconds) (default: off).")),
    Option("shutdown-grace", seconds, live=True, help=(
        "On SIGTERM, seconds to let downloads in progress finish before their clients are "
        "cut off (default: 30).")),
    Option("workers", workers, live=False, help=(
        "Worker processes that accept on the same listening sockets and share one cache; "
        "auto: one per CPU (default: 1).")),
    Option("log-format", log_format, live=True, help=(
        "The access log: combined, json or none (default: combined).")),
    Option("access-log", text, live=True, help=(
        "Where the access log goes: - (standard output), a file (opened again at SIGHUP, for "
        "log rotation), or log (twisted.logger events, namespace txpypi.access) (default: -).")),
    Option("store", choice("disk", "s3"), live=False, help=(
        "Where cached files live: disk (under --cache-dir) or s3 (default: disk).")),
    Option("s3-bucket", text, live=False, help=(
        "The S3 bucket (required with --store s3).")),
    Option("s3-prefix", anything, live=False, help=(
        "A key prefix in the bucket (default: txpypi/).")),
    Option("s3-endpoint-url", url, live=False, help=(
        "The S3 endpoint, for S3-compatible servers (default: AWS).")),
    Option("s3-region", text, live=False, help=(
        "The S3 region (default: boto3's).")),
    Option("s3-threads", count(1, 256), live=False, help=(
        "Threads of the pool that runs boto3 calls (default: 8).")),
    Option("s3-redirect", flag, takes="flag", live=True, help=(
        "Answer a cached file's GET with a 302 to a short-lived presigned S3 URL instead of "
        "sending the bytes (default: off).")),
    # A SigV4 presigned URL lives at most a week.
    Option("s3-redirect-ttl", seconds, least=1, most=MAX_PRESIGNED_TTL, live=True, help=(
        "With --s3-redirect: how long the presigned URLs live (default: 300).")),
    Option("accel-redirect", text, live=True, help=(
        "Answer a GET of a file cached on the disk with an empty body and X-Accel-Redirect: "
        "PREFIX<key>, the key under <cache-dir>/files/, for nginx in front to send it "
        "(default: off).")),
    Option("redis", redis_url, live=False, help=(
        "Share metadata through Redis: redis://[:password@]host:port/db, or rediss:// for "
        "TLS (default: the embedded SQLite database).")),
    Option("lock-ttl", seconds, least=1, live=False, help=(
        "With --redis: how long a dead instance's download lock outlives it before another "
        "instance takes over the fetch (default: 30).")),
    Option("peer-url", url, live=False, help=(
        "With --redis: the URL where the other instances reach this one, so that their "
        "clients receive a download in progress here as it arrives (needs "
        "--peer-secret-file).")),
    Option("peer-secret", secret, secret=True, live=False, help=(
        "A file whose first line is the secret shared by the instances that stream "
        "downloads to each other (16 characters or more).")),
    Option("redis-timeout", seconds, least=0.1, live=False, help=(
        "With --redis: seconds Redis may take to connect or answer before the instance goes "
        "on without it; while it is down, it is tried again this often (default: 3).")),
    Option("max-downloads", count(1, 100_000), live=True, help=(
        "Downloads from the upstream at a time; a client asking for one more waits up to "
        "--response-timeout for one to end, then gets 503 (default: 16).")),
    Option("min-download-rate", rate, live=True, help=(
        "The slowest an upstream may send a page or a file, in bytes per second over each "
        "--read-timeout (1K, 100K, ...; 0: no minimum; default: 1K).")),
    Option("s3-timeout", seconds, least=0.1, live=False, help=(
        "With --store s3: seconds S3 may take to connect or answer (a failed call is tried "
        "once more); while it is down, it is tried again this often (default: 10).")),
    Option("send-timeout", seconds, least=0.1, live=True, help=(
        "Seconds a client may take no bytes of a response before it is cut off; also the "
        "time a request may take to arrive, and the idle timeout of a keep-alive connection "
        "(default: 60).")),
    Option("max-connections", count(1, 1_000_000), live=True, help=(
        "The most client connections open at once, on all listeners together; past it, new "
        "ones are closed at once (default: 1024).")),
    Option("page-cache-size", size, live=True, help=(
        "Keep index pages in memory up to this size (bodies and parsed pages; 64M, 1G, ...: "
        "powers of 1024), the least recently used out first (default: 256M).")),
    Option("negative-ttl", seconds, live=True, help=(
        "Seconds a project the upstream does not know is remembered as unknown, answered 404 "
        "without asking again; 0 turns it off (default: 60).")),
    Option("max-upstream-requests", count(1, 4096), live=True, help=(
        "Index page requests to the upstream in progress at once; the others wait their "
        "turn, each at most --response-timeout, then 504 (default: 32).")),
    Option("trusted-proxy", addresses, takes="list", attribute="trusted_proxies", live=True, help=(
        "A reverse proxy's address whose X-Forwarded-For is believed in the access log; "
        "repeat it for several.")),
    Option("file-host", file_hosts, takes="list", also=("file-hosts",), attribute="file_hosts",
           live=False, help=(
        "A host files may come from besides the upstream's own: host or host:port (https), "
        "or http://host[:port]; repeat it for several. Once given, files come only from "
        "these and the upstream (default: any public host over https).")),
    Option("admin-token", secret, secret=True, live=True, help=(
        "A file whose first line is the bearer token for the admin routes (without one, "
        "they answer 404).")),
    Option("upstreams", upstreams_table, takes="table", live=False, help=(
        "Named upstreams, each with its url and optional username, password (or "
        "password-file), token (or token-file), ca-file, verify, index-ttl and file-hosts "
        "(YAML only; instead of upstream).")),
    Option("groups", groups_table, takes="table", live=False, help=(
        "Groups of upstreams served at /<group>/simple/, each with its members in priority "
        "order, its strategy (first-index or merge) and its own routes (YAML only; default: "
        "one group, default, of all upstreams).")),
    Option("default-group", group_name, live=False, help=(
        "The group served at /simple/ and /pypi/simple/ (default: default).")),
    Option("routes", routes_list, takes="table", live=False, help=(
        "Project globs that are only ever asked of the upstreams named with them, in every "
        "group (YAML only).")),
)
# fmt: on

#: YAML keys (the long options, and a few more spellings), each with the
#: setting it sets and what reads its value.
KEYS: Mapping[str, tuple[str, Callable[[Any], Any]]] = {
    key: (option.attribute, read) for option in OPTIONS for key, read in option.keys()
}

#: The settings that only a restart changes, in table order.
FIXED: tuple[str, ...] = tuple(option.attribute for option in OPTIONS if not option.live)

#: The settings SIGHUP applies to the running process.
LIVE: tuple[str, ...] = tuple(option.attribute for option in OPTIONS if option.live)


def apply(settings: Settings, values: Mapping[str, Any]) -> Settings:
    """
    Return C{settings} with C{values} (keyed like the options) applied.

    @raise ConfigError: for an unknown key or a bad value.
    """
    changes = {}
    for key, value in values.items():
        if key not in KEYS:
            raise ConfigError(f"unknown setting: {key}")
        attribute, read = KEYS[key]
        changes[attribute] = read(value)
    return attrs.evolve(settings, **changes)


def check(settings: Settings) -> Settings:
    """
    The checks once all settings are in: across settings, then each row's
    bounds.

    @raise ConfigError: for the first that fails.
    """
    config.check(settings)
    topology(settings)
    for option in OPTIONS:
        error = option.bounds_error(getattr(settings, option.attribute))
        if error is not None:
            raise error
    return settings


#: The prefix of the environment variables that set options.
ENV_PREFIX = "TXPYPI_"

#: The variable that names the config file when C{--config} does not.
ENV_CONFIG = ENV_PREFIX + "CONFIG"


def env_name(key: str) -> str:
    """
    The environment variable of a setting's key: C{max-cache-size} is
    C{TXPYPI_MAX_CACHE_SIZE}, C{admin-token-file} C{TXPYPI_ADMIN_TOKEN_FILE}.
    """
    return ENV_PREFIX + key.upper().replace("-", "_")


def _env_keys() -> dict[str, tuple[str, Option]]:
    return {env_name(key): (key, option) for option in OPTIONS for key, _ in option.keys()}


def from_environ(environ: Mapping[str, str]) -> dict[str, Any]:
    """
    The settings that C{environ} gives as C{TXPYPI_<KEY>} variables, keyed
    like the YAML file; their text is read as the command line's is (a
    list option's values separated by commas).

    @raise ConfigError: for a C{TXPYPI_} variable that names no setting.
    """
    keys = _env_keys()
    values: dict[str, Any] = {}
    for name, given_text in environ.items():
        if not name.startswith(ENV_PREFIX) or name == ENV_CONFIG:
            continue
        if name not in keys:
            raise ConfigError(f"unknown setting in the environment: {name}")
        key, option = keys[name]
        if option.takes == "list" and not key.endswith("-file"):
            values[key] = [part.strip() for part in given_text.split(",") if part.strip()]
        else:
            values[key] = given_text
    return values


def read(path: str | None, given: Mapping[str, Any], environ: Mapping[str, str] | None = None) -> Settings:
    """
    The settings: the defaults, then the YAML file at C{path} (if any;
    else the one C{TXPYPI_CONFIG} names), then the C{TXPYPI_*} variables
    of C{environ} (the process's environment when L{None}), then what the
    command line C{given}.

    @raise ConfigError: for a bad setting.
    """
    environ = os.environ if environ is None else environ
    path = environ.get(ENV_CONFIG) if path is None else path
    settings = Settings()
    if path is not None:
        settings = apply(settings, config.load_file(path, environ))
    for key, value in from_environ(environ).items():
        try:
            settings = apply(settings, {key: value})
        except ConfigError as e:  # name the variable, not the key
            reason = str(e).removeprefix(f"{key}:").strip()
            raise ConfigError(f"{env_name(key)}: {reason}") from None
    return check(apply(settings, given))


def live_values(settings: Settings) -> Mapping[str, Any]:
    """
    The values of the rows marked live, by attribute, and the policies the
    groups and upstreams set: all that SIGHUP may apply (any other lookup
    is a L{KeyError}).
    """
    return {**{name: getattr(settings, name) for name in LIVE}, "policy": policy_table(settings)}


def live_of(settings: Settings) -> Live:
    """
    A new L{Live} holding the live rows of C{settings}, for the parts.
    """
    live = Live()
    live.update(live_values(settings))
    return live


@attrs.define
class Running:
    """
    The settings the process runs with: those it started with, then after
    each SIGHUP the live rows of the new ones over them (the fixed rows keep
    their running values until a restart); and the L{Live} object that the
    running parts hold, which L{reload} updates.
    """

    settings: Settings
    live: Live = attrs.field()

    @live.default
    def _live(self) -> Live:
        return live_of(self.settings)

    def reload(self, new: Settings) -> list[str]:
        """
        Take the live rows of C{new}, into the parts' L{Live} too.

        @return: the fixed settings that C{new} would change, which keep
            their running values.
        """
        old = self.settings
        kept = [name for name in FIXED if getattr(new, name) != getattr(old, name)]
        self.settings = attrs.evolve(new, **{name: getattr(old, name) for name in FIXED})
        # The policies live inside the groups and upstreams, which keep
        # their running values: they come from the new settings.
        self.live.update({**live_values(self.settings), "policy": policy_table(new)})
        return kept


class CommandLine(usage.Options):
    """
    A twistd C{usage.Options} with one C{opt_*} handler per row of the
    table; each collects what was given, under the option's name, in
    L{given} (a list for the repeated ones), for L{read} to apply over the
    config file.
    """

    def __init__(self) -> None:
        super().__init__()
        self.given: dict[str, Any] = {}


def _handler(option: Option) -> Callable[..., None]:
    key = option.flag
    handler: Callable[..., None]
    if option.takes == "flag":

        def handler(self: CommandLine) -> None:
            self.given[key] = True

    elif option.takes == "list":

        def handler(self: CommandLine, value: str) -> None:
            self.given.setdefault(key, []).append(value)

    else:

        def handler(self: CommandLine, value: str) -> None:
            self.given[key] = value

    handler.__name__ = "opt_" + key.replace("-", "_")
    handler.__doc__ = option.help
    return handler


for _option in OPTIONS:
    if _option.takes == "table":
        continue  # YAML only
    _method = _handler(_option)
    setattr(CommandLine, _method.__name__, _method)
del _option, _method

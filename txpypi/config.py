"""
Settings: the typed value of every option with its default, the parsers
that read one option's value, the checks across options, and reading the
YAML file.  The options themselves (names, help, live or not) are the table
in L{txpypi.options}.  Pure apart from reading the files it is given.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs
import yaml

from txpypi.core.groups import DEFAULT_GROUP, GroupSpec, Route, UpstreamSpec
from txpypi.core.live import Live

DEFAULT_LISTEN = "tcp:5000:interface=127.0.0.1"
DEFAULT_UPSTREAM = "https://pypi.org/simple/"
#: The longest life of a SigV4 presigned URL, in seconds (a week).
MAX_PRESIGNED_TTL = 7 * 24 * 3600


def default_cache_dir() -> str:
    """
    C{$XDG_CACHE_HOME/txpypi}, that is C{~/.cache/txpypi} by default.
    """
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "txpypi")


class ConfigError(ValueError):
    """
    A bad setting; the message is one line naming the key.
    """


#: The defaults of the live settings are theirs (see L{Live}).
_LIVE = Live()


def _urls(value: str | tuple[str, ...]) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


@attrs.frozen
class Settings:
    """
    Every setting's typed value, with its default: one field per row of
    L{txpypi.options.OPTIONS} (a test checks they are the same set).
    Secrets stay out of the repr, so that settings can be logged.
    """

    listen: tuple[str, ...] = (DEFAULT_LISTEN,)
    #: The command line's upstreams (one group, first-index in this
    #: order), unless C{upstreams} names them.
    upstream: tuple[str, ...] = attrs.field(default=(DEFAULT_UPSTREAM,), converter=_urls)
    cache_dir: str = attrs.field(factory=default_cache_dir)
    index_ttl: float = _LIVE.index_ttl
    connect_timeout: float = 10.0
    response_timeout: float = _LIVE.response_timeout
    read_timeout: float = _LIVE.read_timeout
    stale_ttl: float = _LIVE.stale_ttl
    offline: bool = _LIVE.offline
    max_cache_size: int | None = _LIVE.max_cache_size
    log_format: str = _LIVE.log_format
    access_log: str = _LIVE.access_log
    trusted_proxies: tuple[str, ...] = _LIVE.trusted_proxies
    admin_token: str | None = attrs.field(default=_LIVE.admin_token, repr=False)
    shutdown_grace: float = _LIVE.shutdown_grace
    workers: int = 1
    stall_meter: bool = False
    store: str = "disk"
    s3_bucket: str | None = None
    s3_prefix: str = "txpypi/"
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    s3_threads: int = 8
    s3_redirect: bool = _LIVE.s3_redirect
    s3_redirect_ttl: float = _LIVE.s3_redirect_ttl
    accel_redirect: str | None = _LIVE.accel_redirect
    redis: str | None = attrs.field(default=None, repr=False)
    lock_ttl: float = 30.0
    peer_url: str | None = None
    peer_secret: str | None = attrs.field(default=None, repr=False)
    redis_timeout: float = 3.0
    s3_timeout: float = 10.0
    max_downloads: int = _LIVE.max_downloads
    min_download_rate: float = _LIVE.min_download_rate
    #: The only hosts other than the upstream's that files may come from
    #: (L{None}: any public host over https); entries as L{file_hosts} gives them.
    file_hosts: tuple[str, ...] | None = None
    send_timeout: float = _LIVE.send_timeout
    max_connections: int = _LIVE.max_connections
    page_cache_size: int = _LIVE.page_cache_size
    negative_ttl: float = _LIVE.negative_ttl
    max_upstream_requests: int = _LIVE.max_upstream_requests
    #: Named upstreams, groups and routes (see L{txpypi.upstreams}).
    upstreams: tuple[UpstreamSpec, ...] = ()
    groups: tuple[GroupSpec, ...] = ()
    default_group: str = DEFAULT_GROUP
    routes: tuple[Route, ...] = ()


#: What reads one setting's value: the key it was given under (which an
#: error names) and the value from YAML or the command line.
Parse = Callable[[str, Any], Any]


def endpoints(key: str, value: Any) -> tuple[str, ...]:
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not values or not all(isinstance(v, str) and v for v in values):
        raise ConfigError(f"{key}: expected an endpoint string or a non-empty list of them")
    return tuple(values)


def upstream_url(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a URL")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        shown = value.rpartition("@")[2]  # never what may be a password before an @
        raise ConfigError(f"{key}: expected an http or https URL, got {shown!r}")
    from txpypi.core.fetchpolicy import Origin

    try:
        Origin.of(value)  # its origin is what files may come from
    except ValueError as e:
        raise ConfigError(f"{key}: {e}") from None  # not the URL: it may hold a password
    return value


def directory(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}: expected a directory path")
    return str(Path(value).expanduser())


def seconds(key: str, value: Any) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: expected a number of seconds, got {value!r}") from None
    if number < 0 or number != number:
        raise ConfigError(f"{key}: must not be negative")
    return number


_UNITS = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4, "P": 5}


def parse_size(value: Any, key: str = "max-cache-size") -> int:
    """
    A size in bytes from C{123}, C{"500M"}, C{"20G"}, C{"1.5T"} or C{"20GiB"}
    (powers of 1024).

    @param key: the setting it is for, which an error names.
    @raise ConfigError: if it is not one.
    """
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return value
    text = str(value).strip().upper().removesuffix("B").removesuffix("I")
    number, unit = text, ""
    if text and text[-1] in _UNITS:
        number, unit = text[:-1], text[-1]
    try:
        size = int(float(number) * 1024 ** _UNITS[unit])
    except ValueError:
        raise ConfigError(f"{key}: expected a size such as 500M or 20G, got {value!r}") from None
    if size <= 0:
        raise ConfigError(f"{key}: must be positive")
    return size


def size(key: str, value: Any) -> int:
    return parse_size(value, key)


def count(low: int, high: int) -> Parse:
    """
    A whole number from C{low} to C{high}.
    """

    def check(key: str, value: Any) -> int:
        try:
            n = int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not low <= n <= high or str(n) != str(value).strip():
            raise ConfigError(f"{key}: expected a whole number from {low} to {high}, got {value!r}")
        return n

    return check


#: The most worker processes (L{workers}).
MAX_WORKERS = 64


def workers(key: str, value: Any) -> int:
    """
    A number of worker processes, or C{auto}: as many as this process may
    run on CPUs.
    """
    if isinstance(value, str) and value.strip().lower() == "auto":
        return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))
    n: int = count(1, MAX_WORKERS)(key, value)
    return n


#: How a flag may be spelled in text (the environment, a substituted value).
_FLAG_WORDS = {
    "true": True,
    "yes": True,
    "on": True,
    "1": True,
    "false": False,
    "no": False,
    "off": False,
    "0": False,
}


def flag(key: str, value: Any) -> bool:
    if isinstance(value, str) and value.strip().lower() in _FLAG_WORDS:
        return _FLAG_WORDS[value.strip().lower()]
    if not isinstance(value, bool):
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    return value


def log_format(key: str, value: Any) -> str:
    from txpypi.web.accesslog import FORMATS

    if value not in FORMATS:
        raise ConfigError(f"{key}: expected one of {', '.join(FORMATS)}, got {value!r}")
    return str(value)


def addresses(key: str, value: Any) -> tuple[str, ...]:
    import ipaddress

    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list):
        raise ConfigError(f"{key}: expected an address or a list of them")
    for v in values:
        try:
            ipaddress.ip_address(str(v))
        except ValueError:
            raise ConfigError(f"{key}: not an IP address: {v!r}") from None
    return tuple(str(v) for v in values)


def secret(key: str, value: Any) -> str:
    if not isinstance(value, str) or len(value.strip()) < 16:
        raise ConfigError(f"{key}: expected a string of at least 16 characters")
    return value.strip()


def first_line(key: str, path: Any) -> str:
    """
    The first line of the file at C{path} (a secret kept out of the command
    line and the config file).
    """
    try:
        with open(str(path), encoding="utf-8") as f:
            return f.readline()
    except OSError as e:
        raise ConfigError(f"{key}: cannot read {path}: {e.strerror}") from None


def choice(*choices: str) -> Parse:
    def check(key: str, value: Any) -> str:
        if value not in choices:
            raise ConfigError(f"{key}: expected one of {', '.join(choices)}, got {value!r}")
        return str(value)

    return check


def text(key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{key}: expected a non-empty string")
    return value.strip()


def anything(key: str, value: Any) -> str:
    return str(value)


def rate(key: str, value: Any) -> float:
    if str(value).strip() in ("0", "0.0"):
        return 0.0
    try:
        return float(parse_size(value))
    except ConfigError:
        message = f"{key}: expected bytes per second such as 1K or 100K, or 0, got {value!r}"
        raise ConfigError(message) from None


def redis_url(key: str, value: Any) -> str:
    from txpypi.storage.redismeta import parse_redis_url

    try:
        parse_redis_url(str(value))
    except ValueError as e:
        raise ConfigError(f"{key}: {e}") from None
    return str(value)


def url(key: str, value: Any) -> str:
    parts = urlsplit(str(value))
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"{key}: expected an http or https URL, got {value!r}")
    return str(value)


def file_hosts(key: str, value: Any) -> tuple[str, ...]:
    from txpypi.core.fetchpolicy import FileHost

    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise ConfigError(f"{key}: expected a list of hosts (host, host:port or http://host[:port])")
    try:
        return tuple(str(FileHost.parse(v)) for v in values)
    except ValueError as e:
        raise ConfigError(f"{key}: {e}") from None


def check(settings: Settings) -> Settings:
    """
    Checks across settings, once all are applied (the bounds of single
    settings are in the table of options, L{txpypi.options}).

    @raise ConfigError: when they do not fit together.
    """
    if settings.store == "s3" and not settings.s3_bucket:
        raise ConfigError("s3-bucket: required with store: s3")
    if settings.s3_redirect and settings.store != "s3":
        raise ConfigError("s3-redirect: only with store: s3")
    if (settings.peer_url is None) != (settings.peer_secret is None):
        raise ConfigError("peer-url: peer-url and peer-secret (or peer-secret-file) go together")
    if settings.peer_url is not None and settings.redis is None:
        raise ConfigError("peer-url: peers find each other through redis, which is not set")
    return settings


#: C{${VAR}} or C{${VAR:-default}} in a value of the config file.
_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def expand(value: Any, environ: Mapping[str, str], key: str) -> Any:
    """
    C{value} from the config file with every C{${VAR}} and
    C{${VAR:-default}} in its strings (in lists and mappings too) replaced from
    C{environ}, before the value is parsed (so that C{index-ttl: ${TTL}}
    reads as a number, as the command line's text does).

    @raise ConfigError: for a variable that is not set and has no default,
        naming it and C{key}.
    """
    if isinstance(value, list):
        return [expand(item, environ, key) for item in value]
    if isinstance(value, dict):
        return {name: expand(item, environ, f"{key}: {name}") for name, item in value.items()}
    if not isinstance(value, str):
        return value

    def replace(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        found = environ.get(name)
        if found is not None:
            return found
        if default is not None:
            return default
        raise ConfigError(f"{key}: the environment variable {name} is not set")

    return _REFERENCE.sub(replace, value)


def load_file(path: str, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """
    Read a YAML config file into a mapping, its C{${VAR}} references
    replaced from C{environ} (the process's environment when L{None}).

    @raise ConfigError: if it cannot be read or is not a mapping, or names
        a variable that is not set.
    """
    try:
        with open(path, encoding="utf-8") as f:
            data = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"config: cannot read {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"config: {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config: {path} must hold a mapping of settings")
    environ = os.environ if environ is None else environ
    return {key: expand(value, environ, str(key)) for key, value in data.items()}

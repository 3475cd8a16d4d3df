"""
Settings: attrs values with their defaults, loaded from YAML and overridden
from the command line.  Pure apart from reading the one file it is given.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import attrs
import yaml

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


@attrs.frozen
class Settings:
    listen: tuple[str, ...] = (DEFAULT_LISTEN,)
    upstream: str = DEFAULT_UPSTREAM
    cache_dir: str = attrs.field(factory=default_cache_dir)
    index_ttl: float = 600.0
    connect_timeout: float = 10.0
    response_timeout: float = 30.0
    read_timeout: float = 60.0
    stale_ttl: float = 7 * 24 * 3600.0
    offline: bool = False
    max_cache_size: int | None = None
    log_format: str = "combined"
    trusted_proxies: tuple[str, ...] = ()
    admin_token: str | None = attrs.field(default=None, repr=False)
    shutdown_grace: float = 30.0
    store: str = "disk"
    s3_bucket: str | None = None
    s3_prefix: str = "txpypi/"
    s3_endpoint_url: str | None = None
    s3_region: str | None = None
    s3_threads: int = 8
    s3_redirect: bool = False
    s3_redirect_ttl: float = 300.0
    redis: str | None = attrs.field(default=None, repr=False)
    lock_ttl: float = 30.0
    peer_url: str | None = None
    peer_secret: str | None = attrs.field(default=None, repr=False)
    redis_timeout: float = 3.0
    s3_timeout: float = 10.0
    max_downloads: int = 16
    min_download_rate: float = 1024.0
    #: The only hosts other than the upstream's that files may come from
    #: (L{None}: any public host over https); entries as L{_file_hosts} gives them.
    file_hosts: tuple[str, ...] | None = None
    send_timeout: float = 60.0
    max_connections: int = 1024
    page_cache_size: int = 256 * 1024 * 1024
    negative_ttl: float = 60.0
    max_upstream_requests: int = 32


def _listen(value: Any) -> tuple[str, ...]:
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not values or not all(isinstance(v, str) and v for v in values):
        raise ConfigError("listen: expected an endpoint string or a non-empty list of them")
    return tuple(values)


def _upstream(value: Any) -> str:
    if not isinstance(value, str):
        raise ConfigError("upstream: expected a URL")
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigError(f"upstream: expected an http or https URL, got {value!r}")
    from txpypi.core.fetchpolicy import Origin

    try:
        Origin.of(value)  # its origin is what files may come from
    except ValueError as e:
        raise ConfigError(f"upstream: {e}") from None  # not the URL: it may hold a password
    return value


def _cache_dir(value: Any) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError("cache-dir: expected a directory path")
    return str(Path(value).expanduser())


def _seconds(key: str) -> Any:
    def check(value: Any) -> float:
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number of seconds, got {value!r}") from None
        if seconds < 0 or seconds != seconds:
            raise ConfigError(f"{key}: must not be negative")
        return seconds

    return check


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


def _size(key: str) -> Any:
    def check(value: Any) -> int:
        return parse_size(value, key)

    return check


def _count(key: str, low: int, high: int) -> Any:
    def check(value: Any) -> int:
        try:
            n = int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not low <= n <= high or str(n) != str(value).strip():
            raise ConfigError(f"{key}: expected a whole number from {low} to {high}, got {value!r}")
        return n

    return check


def _flag(key: str) -> Any:
    def check(value: Any) -> bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: expected true or false, got {value!r}")
        return value

    return check


def _log_format(value: Any) -> str:
    from txpypi.web.accesslog import FORMATS

    if value not in FORMATS:
        raise ConfigError(f"log-format: expected one of {', '.join(FORMATS)}, got {value!r}")
    return str(value)


def _addresses(value: Any) -> tuple[str, ...]:
    import ipaddress

    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list):
        raise ConfigError("trusted-proxy: expected an address or a list of them")
    for v in values:
        try:
            ipaddress.ip_address(str(v))
        except ValueError:
            raise ConfigError(f"trusted-proxy: not an IP address: {v!r}") from None
    return tuple(str(v) for v in values)


def _token(value: Any) -> str:
    return str(_secret("admin-token")(value))


def read_token_file(path: Any) -> str:
    """
    The admin token from a file (its first line).
    """
    return str(_secret_file("admin-token-file", _token)(path))


def _secret(key: str) -> Any:
    def check(value: Any) -> str:
        if not isinstance(value, str) or len(value.strip()) < 16:
            raise ConfigError(f"{key}: expected a string of at least 16 characters")
        return value.strip()

    return check


def _secret_file(key: str, check: Any) -> Any:
    def read(path: Any) -> str:
        try:
            with open(str(path), encoding="utf-8") as f:
                line = f.readline()
        except OSError as e:
            raise ConfigError(f"{key}: cannot read {path}: {e.strerror}") from None
        return str(check(line))

    return read


def _choice(key: str, choices: tuple[str, ...]) -> Any:
    def check(value: Any) -> str:
        if value not in choices:
            raise ConfigError(f"{key}: expected one of {', '.join(choices)}, got {value!r}")
        return str(value)

    return check


def _text_value(key: str) -> Any:
    def check(value: Any) -> str:
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{key}: expected a non-empty string")
        return value.strip()

    return check


def _rate(key: str) -> Any:
    def check(value: Any) -> float:
        if str(value).strip() in ("0", "0.0"):
            return 0.0
        try:
            return float(parse_size(value))
        except ConfigError:
            raise ConfigError(
                f"{key}: expected bytes per second such as 1K or 100K, or 0, got {value!r}"
            ) from None

    return check


def _redis_url(value: Any) -> str:
    from txpypi.storage.redismeta import parse_redis_url

    try:
        parse_redis_url(str(value))
    except ValueError as e:
        raise ConfigError(f"redis: {e}") from None
    return str(value)


def _url(key: str) -> Any:
    def check(value: Any) -> str:
        parts = urlsplit(str(value))
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ConfigError(f"{key}: expected an http or https URL, got {value!r}")
        return str(value)

    return check


def _file_hosts(key: str) -> Any:
    def check(value: Any) -> tuple[str, ...]:
        from txpypi.core.fetchpolicy import FileHost

        values = [value] if isinstance(value, str) else value
        if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
            raise ConfigError(f"{key}: expected a list of hosts (host, host:port or http://host[:port])")
        try:
            return tuple(str(FileHost.parse(v)) for v in values)
        except ValueError as e:
            raise ConfigError(f"{key}: {e}") from None

    return check


#: Config-file keys (the same as the long options), their attribute and checker.
KEYS = {
    "listen": ("listen", _listen),
    "upstream": ("upstream", _upstream),
    "cache-dir": ("cache_dir", _cache_dir),
    "index-ttl": ("index_ttl", _seconds("index-ttl")),
    "connect-timeout": ("connect_timeout", _seconds("connect-timeout")),
    "response-timeout": ("response_timeout", _seconds("response-timeout")),
    "read-timeout": ("read_timeout", _seconds("read-timeout")),
    "stale-ttl": ("stale_ttl", _seconds("stale-ttl")),
    "offline": ("offline", _flag("offline")),
    "max-cache-size": ("max_cache_size", _size("max-cache-size")),
    "shutdown-grace": ("shutdown_grace", _seconds("shutdown-grace")),
    "log-format": ("log_format", _log_format),
    "store": ("store", _choice("store", ("disk", "s3"))),
    "s3-bucket": ("s3_bucket", _text_value("s3-bucket")),
    "s3-prefix": ("s3_prefix", lambda v: str(v)),
    "s3-endpoint-url": ("s3_endpoint_url", _url("s3-endpoint-url")),
    "s3-region": ("s3_region", _text_value("s3-region")),
    "s3-threads": ("s3_threads", _count("s3-threads", 1, 256)),
    "s3-redirect": ("s3_redirect", _flag("s3-redirect")),
    "s3-redirect-ttl": ("s3_redirect_ttl", _seconds("s3-redirect-ttl")),
    "redis": ("redis", _redis_url),
    "lock-ttl": ("lock_ttl", _seconds("lock-ttl")),
    "peer-url": ("peer_url", _url("peer-url")),
    "peer-secret": ("peer_secret", _secret("peer-secret")),
    "peer-secret-file": ("peer_secret", _secret_file("peer-secret-file", _secret("peer-secret"))),
    "redis-timeout": ("redis_timeout", _seconds("redis-timeout")),
    "max-downloads": ("max_downloads", _count("max-downloads", 1, 100_000)),
    "min-download-rate": ("min_download_rate", _rate("min-download-rate")),
    "s3-timeout": ("s3_timeout", _seconds("s3-timeout")),
    "send-timeout": ("send_timeout", _seconds("send-timeout")),
    "max-connections": ("max_connections", _count("max-connections", 1, 1_000_000)),
    "page-cache-size": ("page_cache_size", _size("page-cache-size")),
    "negative-ttl": ("negative_ttl", _seconds("negative-ttl")),
    "max-upstream-requests": ("max_upstream_requests", _count("max-upstream-requests", 1, 4096)),
    "trusted-proxy": ("trusted_proxies", _addresses),
    "file-hosts": ("file_hosts", _file_hosts("file-hosts")),
    "file-host": ("file_hosts", _file_hosts("file-host")),
    "admin-token": ("admin_token", _token),
    "admin-token-file": ("admin_token", read_token_file),
}


def apply(settings: Settings, values: Mapping[str, Any]) -> Settings:
    """
    Return C{settings} with C{values} (keyed like the options) applied.

    @raise ConfigError: for an unknown key or a bad value.
    """
    changes = {}
    for key, value in values.items():
        if key not in KEYS:
            raise ConfigError(f"unknown setting: {key}")
        attribute, check = KEYS[key]
        changes[attribute] = check(value)
    return attrs.evolve(settings, **changes)


def check(settings: Settings) -> Settings:
    """
    Checks across settings, once all are applied.

    @raise ConfigError: when they do not fit together.
    """
    if settings.store == "s3" and not settings.s3_bucket:
        raise ConfigError("s3-bucket: required with store: s3")
    if settings.s3_redirect and settings.store != "s3":
        raise ConfigError("s3-redirect: only with store: s3")
    if not 1 <= settings.s3_redirect_ttl <= MAX_PRESIGNED_TTL:
        # A SigV4 presigned URL lives at most a week.
        raise ConfigError(f"s3-redirect-ttl: expected 1 to {MAX_PRESIGNED_TTL} seconds")
    if settings.lock_ttl < 1:
        raise ConfigError("lock-ttl: must be at least 1 second")
    if (settings.peer_url is None) != (settings.peer_secret is None):
        raise ConfigError("peer-url: peer-url and peer-secret (or peer-secret-file) go together")
    if settings.peer_url is not None and settings.redis is None:
        raise ConfigError("peer-url: peers find each other through redis, which is not set")
    for key, value in (("redis-timeout", settings.redis_timeout), ("s3-timeout", settings.s3_timeout)):
        if value < 0.1:
            raise ConfigError(f"{key}: must be at least 0.1 seconds")
    if settings.send_timeout < 0.1:
        raise ConfigError("send-timeout: must be at least 0.1 seconds")
    return settings


def load_file(path: str) -> dict[str, Any]:
    """
    Read a YAML config file into a mapping.

    @raise ConfigError: if it cannot be read or is not a mapping.
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
    return data

"""
Options and the YAML config file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from twisted.python.usage import UsageError

from txpypi.config import DEFAULT_LISTEN, DEFAULT_UPSTREAM, default_cache_dir
from txpypi.tap import Options


def parse(*argv: str) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    return options


def test_defaults() -> None:
    s = parse().settings
    assert s.listen == (DEFAULT_LISTEN,)
    assert s.upstream == (DEFAULT_UPSTREAM,) == ("https://pypi.org/simple/",)
    assert s.cache_dir == default_cache_dir()
    assert s.index_ttl == 600


def test_options() -> None:
    s = parse(
        "--listen",
        "tcp:8080",
        "--listen",
        "ssl:8443:privateKey=k.pem:certKey=c.pem",
        "--upstream",
        "http://127.0.0.1:1/simple",
        "--cache-dir",
        "/srv/cache",
        "--index-ttl",
        "30",
        "--connect-timeout",
        "1",
        "--response-timeout",
        "2",
        "--read-timeout",
        "3.5",
        "--stale-ttl",
        "0",
        "--offline",
        "--max-cache-size",
        "1.5G",
        "--shutdown-grace",
        "7",
    ).settings
    assert s.shutdown_grace == 7
    assert s.stale_ttl == 0 and s.offline is True
    assert s.max_cache_size == 3 * 512 * 1024**2
    assert (s.connect_timeout, s.response_timeout, s.read_timeout) == (1, 2, 3.5)
    assert s.listen == ("tcp:8080", "ssl:8443:privateKey=k.pem:certKey=c.pem")
    assert (s.upstream, s.cache_dir, s.index_ttl) == (("http://127.0.0.1:1/simple",), "/srv/cache", 30)


def test_config_file_and_override(tmp_path: Path) -> None:
    path = tmp_path / "txpypi.yaml"
    path.write_text("listen: tcp:9000\nindex-ttl: 60\ncache-dir: /var/cache/x\n")
    s = parse("--config", str(path), "--index-ttl", "5").settings
    assert s.listen == ("tcp:9000",) and s.cache_dir == "/var/cache/x" and s.index_ttl == 5


@pytest.mark.parametrize(
    "text, message",
    [
        ("colour: blue\n", "unknown setting: colour"),
        ("index-ttl: soon\n", "index-ttl"),
        ("index-ttl: -1\n", "index-ttl"),
        ("upstream: ftp://x/\n", "upstream"),
        ("listen: []\n", "listen"),
        ("offline: maybe\n", "offline"),
        ("max-cache-size: lots\n", "max-cache-size"),
        ("max-cache-size: -5M\n", "max-cache-size"),
        ("- a\n", "mapping"),
        ("a: [\n", "not valid YAML"),
    ],
)
def test_bad_config_stops_with_one_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UsageError) as e:
        parse("--config", str(path))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_bad_option_value() -> None:
    with pytest.raises(UsageError, match="index-ttl"):
        parse("--index-ttl", "x")


def test_sample_config_is_valid() -> None:
    sample = Path(__file__).resolve().parents[2] / "etc" / "txpypi.yaml"
    assert parse("--config", str(sample)).settings is not None


def test_plugin_is_found() -> None:
    from twisted.application.service import IServiceMaker
    from twisted.plugin import getPlugins

    makers = {p.tapname: p for p in getPlugins(IServiceMaker)}
    assert makers["txpypi"].options is Options


def test_operations_options(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("0123456789abcdef0123\n")
    s = parse(
        "--log-format",
        "json",
        "--trusted-proxy",
        "10.0.0.1",
        "--trusted-proxy",
        "::1",
        "--admin-token-file",
        str(token),
    ).settings
    assert (s.log_format, s.trusted_proxies, s.admin_token) == (
        "json",
        ("10.0.0.1", "::1"),
        "0123456789abcdef0123",
    )
    assert "0123456789abcdef" not in repr(s)  # never logged with the settings
    for bad in (
        ["--log-format", "xml"],
        ["--trusted-proxy", "proxy.example"],
        ["--admin-token-file", "/nope"],
    ):
        with pytest.raises(UsageError):
            parse(*bad)
    short = tmp_path / "short"
    short.write_text("abc\n")
    with pytest.raises(UsageError, match="16 characters"):
        parse("--admin-token-file", str(short))


def test_store_and_redis_options() -> None:
    s = parse(
        "--store",
        "s3",
        "--s3-bucket",
        "b",
        "--s3-prefix",
        "p/",
        "--s3-endpoint-url",
        "http://127.0.0.1:1",
        "--s3-region",
        "eu-west-1",
        "--s3-threads",
        "3",
        "--redis",
        "redis://:pw@127.0.0.1:6380/2",
        "--lock-ttl",
        "5",
        "--redis-timeout",
        "0.5",
        "--s3-timeout",
        "2",
    ).settings
    assert (s.redis_timeout, s.s3_timeout) == (0.5, 2)
    assert (parse().settings.redis_timeout, parse().settings.s3_timeout) == (3, 10)
    assert (s.store, s.s3_bucket, s.s3_prefix, s.s3_threads) == ("s3", "b", "p/", 3)
    assert s.s3_endpoint_url == "http://127.0.0.1:1" and s.s3_region == "eu-west-1"
    assert s.redis == "redis://:pw@127.0.0.1:6380/2" and "pw" not in repr(s)
    assert s.lock_ttl == 5 and parse().settings.lock_ttl == 30
    for bad, message in (
        (["--store", "s3"], "s3-bucket: required"),
        (["--store", "tape"], "store"),
        (["--redis", "http://x"], "redis"),
        (["--redis", "redis://host/db"], "redis"),
        (["--s3-threads", "0"], "s3-threads"),
        (["--lock-ttl", "0.5"], "lock-ttl: must be at least"),
        (["--redis-timeout", "0"], "redis-timeout: must be at least"),
        (["--s3-timeout", "soon"], "s3-timeout"),
    ):
        with pytest.raises(UsageError, match=message):
            parse(*bad)


def test_peer_options(tmp_path: Path) -> None:
    secret = tmp_path / "peer-secret"
    secret.write_text("0123456789abcdef-cluster\n")
    s = parse(
        "--redis",
        "redis://127.0.0.1:6379/0",
        "--peer-url",
        "http://10.0.0.5:5000",
        "--peer-secret-file",
        str(secret),
    ).settings
    assert (s.peer_url, s.peer_secret) == ("http://10.0.0.5:5000", "0123456789abcdef-cluster")
    assert "cluster" not in repr(s)
    short = tmp_path / "short"
    short.write_text("short\n")
    for bad, message in (
        (["--peer-url", "http://10.0.0.5:5000"], "go together"),
        (["--peer-url", "http://10.0.0.5:5000", "--peer-secret-file", str(secret)], "redis"),
        (
            ["--redis", "redis://h:1/0", "--peer-url", "ftp://x", "--peer-secret-file", str(secret)],
            "peer-url",
        ),
        (["--peer-secret-file", str(short)], "16 characters"),
        (["--peer-secret-file", str(tmp_path / "missing")], "cannot read"),
    ):
        with pytest.raises(UsageError, match=message):
            parse(*bad)


def test_redis_url() -> None:
    from txpypi.storage.redismeta import parse_redis_url

    url = parse_redis_url("rediss://:p%40ss@cache.example:6390/3")
    assert (url.host, url.port, url.db, url.password, url.tls) == ("cache.example", 6390, 3, "p@ss", True)
    assert parse_redis_url("redis://localhost").port == 6379


def test_page_options(json_upstream: Any, proxy_factory: Any) -> None:
    """
    --page-cache-size, --negative-ttl and --max-upstream-requests parse,
    have their defaults, name themselves when bad, and SIGHUP applies them
    to the running page cache.
    """
    import attrs

    from txpypi.options import Running
    from txpypi.services import ReloadService

    defaults = parse().settings
    assert (defaults.page_cache_size, defaults.negative_ttl, defaults.max_upstream_requests) == (
        256 * 1024**2,
        60,
        32,
    )
    s = parse("--page-cache-size", "64M", "--negative-ttl", "0", "--max-upstream-requests", "4").settings
    assert (s.page_cache_size, s.negative_ttl, s.max_upstream_requests) == (64 * 1024**2, 0, 4)
    for bad, named in (
        (["--page-cache-size", "lots"], "page-cache-size: expected a size"),
        (["--page-cache-size", "0"], "page-cache-size: must be positive"),
        (["--negative-ttl", "-1"], "negative-ttl"),
        (["--max-upstream-requests", "0"], "max-upstream-requests: expected a whole number"),
        (["--max-upstream-requests", "2.5"], "max-upstream-requests"),
    ):
        with pytest.raises(UsageError, match=named):
            parse(*bad)
    for name in ("page_cache_size", "negative_ttl", "max_upstream_requests"):
        assert name not in ReloadService.FIXED  # SIGHUP applies them

    running = proxy_factory(json_upstream.url, page_cache_size=10**6, negative_ttl=0, max_upstream_requests=3)
    pages = running.proxy.pages
    assert (pages.max_bytes, pages.negative_ttl, pages.limiter.limit) == (10**6, 0, 3)
    live = attrs.evolve(s, page_cache_size=1024, negative_ttl=5, max_upstream_requests=7)
    Running(s, running.proxy.live).reload(live)  # what SIGHUP does
    assert (pages.max_bytes, pages.negative_ttl, pages.limiter.limit) == (1024, 5, 7)

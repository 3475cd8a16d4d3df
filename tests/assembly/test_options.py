"""
The table of options (L{txpypi.options}) and what is derived from it: the
command line, the YAML keys, the settings a restart needs, SIGHUP, and the
documentation that names the options (C{README.md}, C{etc/txpypi.yaml}).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import attrs
import pytest
from treq.testing import RequestTraversalAgent
from twisted.internet.task import Clock
from twisted.python.usage import UsageError

from txpypi.cache.files import FileCache
from txpypi.cache.pages import PageCache
from txpypi.config import ConfigError, Settings
from txpypi.core.live import Live
from txpypi.core.live import names as live_names
from txpypi.fetch.upstream import Upstream, UpstreamClient
from txpypi.options import FIXED, KEYS, LIVE, OPTIONS, Option, Running
from txpypi.services import DrainService, ReloadService
from txpypi.storage.memory import MemoryStore
from txpypi.storage.metadata import MemoryMetadata
from txpypi.tap import Options
from txpypi.testing import FakeUpstream
from txpypi.web.app import Proxy

ROOT = Path(__file__).resolve().parents[2]


def parse(*argv: str) -> Options:
    options = Options()
    options.parseOptions(list(argv))
    return options


def row(name: str) -> Option:
    return next(option for option in OPTIONS if option.name == name)


# -- the table and the typed settings


def test_one_row_per_setting() -> None:
    """
    The rows and the L{Settings} fields are the same set, one row each.
    """
    attributes = [option.attribute for option in OPTIONS]
    assert len(attributes) == len(set(attributes))
    assert set(attributes) == {field.name for field in attrs.fields(Settings)}
    assert len({option.name for option in OPTIONS}) == len(OPTIONS)


def test_live_and_fixed_split_the_rows() -> None:
    assert set(LIVE) | set(FIXED) == {option.attribute for option in OPTIONS}
    assert not set(LIVE) & set(FIXED)
    assert ReloadService.FIXED == FIXED
    # Whatever the listeners, the stores and the cluster are built on
    # needs a restart.
    for name in ("listen", "upstream", "cache_dir", "store", "redis", "peer_secret", "file_hosts"):
        assert name in FIXED
    for name in ("index_ttl", "admin_token", "max_downloads", "send_timeout", "s3_redirect"):
        assert name in LIVE


def default_in_help(option: Option) -> str | None:
    found = re.search(r"\(default: ([^,;)]+)|; default: ([^,;)]+)\)", option.help)
    if found is None:
        return None
    return found.group(1) or found.group(2)


#: Defaults the help names in words: the setting's default is None or off.
NONE_IN_WORDS = {
    "no limit",
    "AWS",
    "boto3's",
    "off",
    "the embedded SQLite database",
    "any public host over https",
}


@pytest.mark.parametrize("option", OPTIONS, ids=lambda option: option.name)
def test_help_names_the_default(option: Option, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    A default the help text names is the setting's default.
    """
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    shown = default_in_help(option)
    if shown is None:
        assert option.default in (None, False, ())
    elif shown in NONE_IN_WORDS:
        assert option.default in (None, False)
    else:
        assert option.parse(option.name, [shown] if option.takes == "list" else shown) == option.default


# -- the command line


def test_every_row_is_an_option_on_the_command_line() -> None:
    """
    One long option per row, with the row's help; the flags take no value
    and the list options may be repeated.
    """
    options = Options()
    docs = options.docs
    flags = {option.flag for option in OPTIONS if option.takes != "table"}
    assert set(docs) == flags | {"config", "help", "version"}
    for option in OPTIONS:
        if option.takes != "table":  # YAML only
            assert docs[option.flag] == option.help
    assert "offline" in options.longOpt and "offline=" not in options.longOpt
    assert "index-ttl=" in options.longOpt


def test_command_line_shapes() -> None:
    s = parse(
        "--s3-redirect",
        "--store=s3",
        "--s3-bucket",
        "b",
        "--trusted-proxy",
        "10.0.0.1",
        "--trusted-proxy",
        "10.0.0.2",
        "--file-host",
        "a.example",
        "--file-host",
        "http://b.example:8080",
        "--index-ttl=5",
    ).settings
    assert s.s3_redirect is True and s.index_ttl == 5
    assert s.trusted_proxies == ("10.0.0.1", "10.0.0.2")
    assert s.file_hosts == ("a.example", "http://b.example:8080")
    with pytest.raises(UsageError):
        parse("--admin-token", "0123456789abcdef")  # a secret only from a file
    with pytest.raises(UsageError):
        parse("--offline", "--offline=yes")


def test_command_line_over_file_over_defaults(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("listen: [tcp:1, tcp:2]\nindex-ttl: 60\nstale-ttl: 9\nfile-hosts: [a.example]\n")
    s = parse("--config", str(path), "--listen", "tcp:3", "--index-ttl", "5").settings
    assert s.listen == ("tcp:3",) and s.index_ttl == 5 and s.stale_ttl == 9
    assert s.file_hosts == ("a.example",) and s.negative_ttl == row("negative-ttl").default


def test_secret_rows_read_the_first_line_of_a_file(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("0123456789abcdef\nignored\n")
    config = tmp_path / "c.yaml"
    config.write_text(f"admin-token-file: {token}\n")
    assert parse("--config", str(config)).settings.admin_token == "0123456789abcdef"
    config.write_text("admin-token: 0123456789abcdef-inline\n")
    assert parse("--config", str(config)).settings.admin_token == "0123456789abcdef-inline"
    config.write_text(f"admin-token-file: {tmp_path / 'missing'}\n")
    with pytest.raises(UsageError, match="^admin-token-file: cannot read"):
        parse("--config", str(config))
    config.write_text("admin-token: short\n")
    with pytest.raises(UsageError, match="^admin-token: expected a string of at least 16"):
        parse("--config", str(config))


def test_an_error_names_the_key_given(tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("file-hosts: {a: 1}\n")
    with pytest.raises(UsageError, match="^file-hosts: "):
        parse("--config", str(config))
    config.write_text("file-host: {a: 1}\n")
    with pytest.raises(UsageError, match="^file-host: "):
        parse("--config", str(config))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--s3-redirect-ttl", "0.5"], "s3-redirect-ttl: expected 1 to 604800 seconds"),
        (["--s3-redirect-ttl", "604801"], "s3-redirect-ttl: expected 1 to 604800 seconds"),
        (["--lock-ttl", "0.9"], "lock-ttl: must be at least 1 second"),
        (["--redis-timeout", "0.05"], "redis-timeout: must be at least 0.1 seconds"),
        (["--s3-timeout", "0"], "s3-timeout: must be at least 0.1 seconds"),
        (["--send-timeout", "0.01"], "send-timeout: must be at least 0.1 seconds"),
    ],
)
def test_bounds(argv: list[str], message: str) -> None:
    with pytest.raises(UsageError) as e:
        parse(*argv)
    assert str(e.value) == message


def test_bounds_hold_at_the_edges() -> None:
    s = parse("--s3-redirect-ttl", "1", "--lock-ttl", "1", "--redis-timeout", "0.1", "--send-timeout", "0.1")
    assert (s.settings.s3_redirect_ttl, s.settings.lock_ttl, s.settings.redis_timeout) == (1, 1, 0.1)
    assert row("s3-redirect-ttl").bounds_error(604800) is None
    assert isinstance(row("lock-ttl").bounds_error(0), ConfigError)
    assert row("index-ttl").bounds_error(0) is None


def test_yaml_keys() -> None:
    """
    Each row's name is a key, and so are the other spellings: C{NAME-file}
    for the secrets, and the plural of C{file-host}.
    """
    assert {option.name for option in OPTIONS} <= set(KEYS)
    extra = set(KEYS) - {option.name for option in OPTIONS}
    assert extra == {"admin-token-file", "peer-secret-file", "file-hosts"}
    assert all(KEYS[key][0] == option.attribute for option in OPTIONS for key, _ in option.keys())


# -- SIGHUP


def unit_proxy(clock: Clock, tmp_path: Path) -> tuple[Proxy, UpstreamClient]:
    """
    The parts of a proxy holding one L{Live}, as C{tap.assemble} makes them.
    """
    live = Live()
    client = UpstreamClient(clock, agent=RequestTraversalAgent(FakeUpstream([])), live=live)
    metadata = MemoryMetadata()
    pages = PageCache(clock, client, metadata, Upstream("test", "http://upstream.test/simple/"), live=live)
    files = FileCache(clock, client, MemoryStore(str(tmp_path)), metadata, pages, live=live)
    return Proxy(pages, files, clock, client=client, live=live), client


def test_running_takes_the_live_rows_and_keeps_the_fixed_ones() -> None:
    running = Running(Settings(index_ttl=1, connect_timeout=2))
    assert running.live.index_ttl == 1
    kept = running.reload(Settings(index_ttl=3, connect_timeout=4, upstream="http://x.example/simple/"))
    assert kept == ["upstream", "connect_timeout"]  # in table order
    assert (running.settings.index_ttl, running.settings.connect_timeout) == (3, 2)
    assert running.settings.upstream == Settings().upstream
    assert running.live.index_ttl == 3
    assert running.reload(running.settings) == []


def test_the_live_object_holds_exactly_the_live_rows_with_their_defaults() -> None:
    """
    The parts read the live rows, and only those, from one L{Live}; its
    defaults are the options' defaults.
    """
    assert set(live_names()) == set(LIVE)
    defaults, settings = Live(), Settings()
    assert {name: getattr(defaults, name) for name in LIVE} == {
        name: getattr(settings, name) for name in LIVE
    }
    with pytest.raises(KeyError, match="connect_timeout"):
        Live().update({"connect_timeout": 1.0})


def test_the_parts_hold_one_live_object_by_reference(tmp_path: Path) -> None:
    """
    tap.assemble gives every part the same L{Live}: a change there is seen
    by each of them, with nothing written into the parts.
    """
    from tests.conftest import get_reactor
    from txpypi.tap import assemble

    settings = Settings(cache_dir=str(tmp_path / "cache"), listen=())
    built = assemble(settings, get_reactor())
    live, proxy = built.live, built.proxy
    assert proxy.live is live and proxy.pages.live is live and proxy.files.live is live
    assert proxy.connections.live is live and built.drain.grace == live.shutdown_grace
    live.update({"index_ttl": 5, "response_timeout": 6, "shutdown_grace": 7, "send_timeout": 8})
    assert (proxy.pages.ttl, built.client.response_timeout, built.drain.grace) == (5, 6, 7)
    assert proxy.site().connections.send_timeout == 8


def test_reload_applies_the_live_rows_to_the_running_parts(tmp_path: Path) -> None:
    """
    A reload applies new live values to the pages, the files, the web
    side, the drain and the proxy's upstream client, and keeps the
    running values of the fixed ones.
    """
    config = tmp_path / "c.yaml"
    config.write_text("index-ttl: 600\n")
    options = parse("--config", str(config))
    proxy, client = unit_proxy(Clock(), tmp_path)
    drain = DrainService(proxy.files, proxy.live)
    site = proxy.site()
    token = tmp_path / "token"
    token.write_text("0123456789abcdef0123\n")
    config.write_text(
        "index-ttl: 7\nstale-ttl: 8\noffline: true\nnegative-ttl: 9\nmax-upstream-requests: 3\n"
        "page-cache-size: 1M\nresponse-timeout: 4\nread-timeout: 5\nmin-download-rate: 2K\n"
        "max-cache-size: 1G\nmax-downloads: 6\nlog-format: json\ntrusted-proxy: [10.0.0.9]\n"
        f"shutdown-grace: 11\nmax-connections: 12\nsend-timeout: 13\nadmin-token-file: {token}\n"
        "upstream: http://elsewhere.example/simple/\nconnect-timeout: 1\n"
    )
    running = Running(options.settings, proxy.live)
    ReloadService(options, running, Clock()).reload()  # type: ignore[arg-type]
    pages, files = proxy.pages, proxy.files
    assert (pages.ttl, pages.stale_ttl, pages.offline, pages.negative_ttl) == (7, 8, True, 9)
    assert (pages.limiter.limit, pages.max_bytes) == (3, 1024**2)
    assert (client.response_timeout, client.read_timeout, client.min_rate) == (4, 5, 2048)
    assert (files.usage.max_size, files.downloads.slots.limit) == (1024**3, 6)
    assert (proxy.admin_token, site.log_format, site.trusted_proxies) == (
        "0123456789abcdef0123",
        "json",
        ("10.0.0.9",),
    )
    assert (drain.grace, proxy.connections.max_connections, proxy.connections.send_timeout) == (11, 12, 13)
    kept = running.settings
    assert (kept.index_ttl, kept.upstream, kept.connect_timeout) == (
        7,
        ("https://pypi.org/simple/",),
        10,
    )


# -- the documentation names the same options


def readme_table() -> Iterator[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("\n## Options\n", 1)[1].split("\n## ", 1)[0]
    for line in section.splitlines():
        found = re.match(r"\| `(?:--)?([a-z0-9-]+)[ `:]", line)
        if found:
            yield found.group(1)


def test_readme_table_names_every_option() -> None:
    names = list(readme_table())
    assert len(names) == len(set(names))
    assert set(names) == {option.flag for option in OPTIONS} | {"config"}


def test_readme_names_the_settings_that_need_a_restart() -> None:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    paragraph = text.split("`kill -HUP` re-reads the config file", 1)[1].split("\n\n", 1)[0]
    named = re.findall(r"`([a-z0-9-]+)`", paragraph)
    assert {KEYS[name][0] for name in named} == set(FIXED)


def yaml_keys() -> Iterator[str]:
    for line in (ROOT / "etc" / "txpypi.yaml").read_text(encoding="utf-8").splitlines():
        found = re.match(r"#? ?([a-z][a-z0-9-]*):( |$)", line)
        if found:
            yield found.group(1)


def test_sample_yaml_names_every_option() -> None:
    """
    The sample config names each setting once (set or commented out), under
    one of its keys, and nothing else.
    """
    keys = list(yaml_keys())
    assert set(keys) <= set(KEYS)
    attributes = [KEYS[key][0] for key in keys]
    assert len(attributes) == len(set(attributes))
    assert set(attributes) == {option.attribute for option in OPTIONS}

"""
Configuration from the environment (issue #12): C{${VAR}} and
C{${VAR:-default}} in the YAML file, and C{TXPYPI_<OPTION>} variables,
below the command line and above the file.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from twisted.python.usage import UsageError

from txpypi.config import ConfigError
from txpypi.options import OPTIONS, env_name, from_environ, read
from txpypi.tap import Options

TOKEN = "0123456789abcdef-from-env"


def config(tmp_path: Path, text: str) -> str:
    path = tmp_path / "txpypi.yaml"
    path.write_text(text)
    return str(path)


def test_references_in_the_file_are_replaced_before_the_values_are_read(tmp_path: Path) -> None:
    path = config(
        tmp_path,
        "index-ttl: ${TTL:-30}\n"
        "stale-ttl: ${STALE}\n"
        "offline: ${OFFLINE:-false}\n"
        "upstream: https://${HOST}/simple/\n"
        "trusted-proxy: ['${PROXY}', 10.0.0.2]\n"
        "admin-token: ${TOKEN}\n",
    )
    environ = {"STALE": "90", "HOST": "index.example", "PROXY": "10.0.0.1", "TOKEN": TOKEN}
    settings = read(path, {}, environ)
    assert (settings.index_ttl, settings.stale_ttl, settings.offline) == (30, 90, False)
    assert settings.upstream == ("https://index.example/simple/",)
    assert settings.trusted_proxies == ("10.0.0.1", "10.0.0.2")
    assert settings.admin_token == TOKEN
    assert read(path, {}, {**environ, "TTL": "5", "OFFLINE": "true"}).index_ttl == 5


def test_an_unset_variable_without_a_default_names_itself_and_the_key(tmp_path: Path) -> None:
    path = config(tmp_path, "index-ttl: 10\nupstream: https://${HOST}/simple/\n")
    with pytest.raises(ConfigError) as raised:
        read(path, {}, {})
    assert str(raised.value) == "upstream: the environment variable HOST is not set"
    # Through twistd's options, as a one-line usage error.
    with pytest.raises(UsageError, match="HOST is not set"):
        Options().parseOptions(["--config", path])


def test_every_option_has_a_variable() -> None:
    """
    TXPYPI_ and the option in upper case, dashes as underscores; a secret
    as its value or its file.
    """
    names = {env_name(key) for option in OPTIONS for key, _ in option.keys()}
    assert {"TXPYPI_UPSTREAM", "TXPYPI_CACHE_DIR", "TXPYPI_MAX_CACHE_SIZE", "TXPYPI_LISTEN"} <= names
    assert {"TXPYPI_ADMIN_TOKEN", "TXPYPI_ADMIN_TOKEN_FILE"} <= names
    assert all(env_name(option.name) in names for option in OPTIONS)


def test_the_command_line_beats_the_environment_which_beats_the_file(tmp_path: Path) -> None:
    path = config(tmp_path, "index-ttl: 1\nstale-ttl: 2\nmax-downloads: 3\n")
    environ = {"TXPYPI_STALE_TTL": "20", "TXPYPI_MAX_DOWNLOADS": "30", "TXPYPI_OFFLINE": "yes"}
    settings = read(path, {"max-downloads": "300"}, environ)
    assert (settings.index_ttl, settings.stale_ttl, settings.max_downloads) == (1, 20, 300)
    assert settings.offline is True


def test_lists_and_the_config_file_come_from_the_environment_too(tmp_path: Path) -> None:
    path = config(tmp_path, "index-ttl: 7\n")
    environ = {
        "TXPYPI_CONFIG": path,
        "TXPYPI_LISTEN": "tcp:5001:interface=127.0.0.1, tcp:5002:interface=127.0.0.1",
        "TXPYPI_TRUSTED_PROXY": "10.0.0.1,10.0.0.2",
        "TXPYPI_ADMIN_TOKEN": TOKEN,
    }
    settings = read(None, {}, environ)
    assert settings.index_ttl == 7
    assert settings.listen == ("tcp:5001:interface=127.0.0.1", "tcp:5002:interface=127.0.0.1")
    assert settings.trusted_proxies == ("10.0.0.1", "10.0.0.2")
    assert settings.admin_token == TOKEN


def test_a_bad_or_unknown_variable_is_a_one_line_error_naming_it(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"^TXPYPI_MAX_DOWNLOADS: expected a number, got 'many'$"):
        read(None, {}, {"TXPYPI_MAX_DOWNLOADS": "many"})
    with pytest.raises(ConfigError, match=r"^unknown setting in the environment: TXPYPI_MAX_CACHESIZE$"):
        read(None, {}, {"TXPYPI_MAX_CACHESIZE": "1G"})
    # A secret's value is never echoed in the error.
    with pytest.raises(ConfigError) as raised:
        read(None, {}, {"TXPYPI_ADMIN_TOKEN": "short-secret"})
    assert "short-secret" not in str(raised.value)
    assert from_environ({"PATH": "/bin", "TXPYPI_CONFIG": "x"}) == {}


def test_sighup_reads_the_references_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """
    What SIGHUP re-reads (L{Options.reread}) replaces the references from
    the environment as it is then.
    """
    path = config(tmp_path, "index-ttl: ${TXPYPI_TEST_TTL}\n")
    monkeypatch.setenv("TXPYPI_TEST_TTL", "11")
    options = Options()
    with pytest.raises(UsageError, match="unknown setting in the environment: TXPYPI_TEST_TTL"):
        options.parseOptions(["--config", path])  # TXPYPI_ is the options' own prefix
    monkeypatch.delenv("TXPYPI_TEST_TTL")
    monkeypatch.setenv("TEST_TTL", "11")
    path = config(tmp_path, "index-ttl: ${TEST_TTL}\n")
    options = Options()
    options.parseOptions(["--config", path])
    assert options.settings.index_ttl == 11
    monkeypatch.setenv("TEST_TTL", "12")
    assert options.reread().index_ttl == 12

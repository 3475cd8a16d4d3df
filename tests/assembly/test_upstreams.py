"""
Reading upstreams:, groups:, default-group: and routes: from YAML and the
environment: the issue's example, credentials from files and variables,
and a one-line error naming the key for each mistake, never a secret.
"""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
import trustme

from txpypi import options
from txpypi.config import ConfigError
from txpypi.core.groups import GroupSpec, Route
from txpypi.upstreams import topology

EXAMPLE = """
upstreams:
  private:
    url: https://private.example/simple/
    username: ci
    password-file: {password}
    ca-file: {ca}
    index-ttl: ${{TTL:-60}}
  public:
    url: https://public.example/simple/
groups:
  default:
    members: [private, public]
    strategy: first-index
  mirror:
    members: [public]
default-group: default
routes:
  - projects: ["acme-*", "Internal_*"]
    upstreams: [private]
"""


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "txpypi.yaml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_the_issues_example(tmp_path: Path) -> None:
    password = tmp_path / "private.password"
    password.write_text("s3cret-pass\nignored\n", encoding="utf-8")
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    text = EXAMPLE.format(password=password, ca=tmp_path / "ca.pem")
    settings = options.read(write(tmp_path, text), {}, environ={})
    found = topology(settings)
    private, public = found.upstreams
    assert (private.name, private.url, private.ca_file, private.index_ttl) == (
        "private",
        "https://private.example/simple/",
        str(tmp_path / "ca.pem"),
        60,
    )
    assert private.authorization == "Basic " + base64.b64encode(b"ci:s3cret-pass").decode()
    assert (public.authorization, public.index_ttl, public.verify) == (None, None, True)
    assert found.groups == (
        GroupSpec("default", ("private", "public"), "first-index"),
        GroupSpec("mirror", ("public",), "first-index"),
    )
    # Globs are matched against normalized names, so they are normalized too.
    assert found.routes == (Route(("acme-*", "internal-*"), ("private",)),)
    assert "s3cret" not in repr(settings)


def test_a_password_and_a_token_from_the_environment(tmp_path: Path) -> None:
    text = """
upstreams:
  private: {url: "https://private.example/simple/", username: ci, password: "${PASS}"}
  partner: {url: "https://partner.example/simple/", token: "${TOKEN}"}
"""
    settings = options.read(write(tmp_path, text), {}, environ={"PASS": "p", "TOKEN": "t0k"})
    private, partner = topology(settings).upstreams
    assert private.authorization == "Basic " + base64.b64encode(b"ci:p").decode()
    assert partner.authorization == "Bearer t0k"
    # Without groups: one default group of every upstream, in order.
    assert topology(settings).groups == (GroupSpec("default", ("private", "partner")),)


def test_upstreams_from_a_variable_as_yaml_text(tmp_path: Path) -> None:
    environ = {"TXPYPI_UPSTREAMS": "{a: {url: 'https://a.example/simple/'}, b: 'https://b.example/simple/'}"}
    settings = options.read(None, {}, environ=environ)
    assert [u.name for u in topology(settings).upstreams] == ["a", "b"]


def test_the_command_line_upstream_repeated_is_first_index(tmp_path: Path) -> None:
    settings = options.read(
        None, {"upstream": ["https://a.example/simple/", "https://b.example/simple/"]}, environ={}
    )
    found = topology(settings)
    assert [(u.name, u.url) for u in found.upstreams] == [
        ("upstream", "https://a.example/simple/"),
        ("upstream-2", "https://b.example/simple/"),
    ]
    environ = {"TXPYPI_UPSTREAM": "https://a.example/simple/,https://c.example/simple/"}
    assert [u.url for u in topology(options.read(None, {}, environ=environ)).upstreams] == [
        "https://a.example/simple/",
        "https://c.example/simple/",
    ]


@pytest.mark.parametrize(
    "text, message",
    [
        ("groups: {simple: [a]}", "groups: 'simple' is a path of the proxy's own and cannot name a group"),
        ("groups: {default: [a, nope]}", "groups: default: members: no upstream is named 'nope'"),
        (
            "groups: {default: {members: [a], strategy: random}}",
            "groups: default: strategy: expected first-index or merge",
        ),
        ("groups: {mine: [a]}", "default-group: no group is named 'default'"),
        ("default-group: pypi", "default-group: 'pypi' is a path of the proxy's own"),
        ("routes: [{projects: [x], upstreams: [b]}]", "routes: no upstream is named 'b'"),
        ("routes: [{projects: [x]}]", "routes: 1: upstreams: expected a list of names"),
        (
            "upstreams: {a: {url: 'https://a.example/simple/', colour: red}}",
            "upstreams: a: unknown key 'colour'",
        ),
        ("upstreams: {Bad: 'https://a.example/simple/'}", "upstreams: 'Bad' is not a name"),
        ("upstreams: {a: {username: x}}", "upstreams: a: url: required"),
        (
            "upstreams: {a: {url: 'https://u:pw@a.example/simple/'}}",
            "upstreams: a: url: user information in the URL",
        ),
        (
            "upstreams: {a: {url: 'https://a.example/simple/', password: pw}}",
            "upstreams: a: username and password go together",
        ),
        (
            "upstreams: {a: {url: 'https://a.example/simple/', username: u, password: pw, token: t}}",
            "upstreams: a: a token or a username and password, not both",
        ),
        (
            "upstreams: {a: {url: 'https://a.example/simple/', index-ttl: soon}}",
            "upstreams: a: index-ttl: expected a number",
        ),
        (
            "upstreams: {a: {url: 'https://a.example/simple/', verify: maybe}}",
            "upstreams: a: verify: expected true or false",
        ),
    ],
)
def test_a_bad_config_is_one_line_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    if not text.startswith("upstreams"):
        text = "upstreams: {a: 'https://a.example/simple/'}\n" + text
    with pytest.raises(ConfigError) as raised:
        options.read(write(tmp_path, text), {}, environ={})
    assert str(raised.value).startswith(message)
    assert "\n" not in str(raised.value)
    assert "pw" not in str(raised.value).replace("password", "")


def test_a_missing_password_file_stops_start_up(tmp_path: Path) -> None:
    text = (
        f"upstreams: {{a: {{url: 'https://a.example/simple/', username: u, password-file: {tmp_path}/nope}}}}"
    )
    with pytest.raises(ConfigError, match=r"upstreams: a: password-file: cannot read .*/nope: No such file"):
        options.read(write(tmp_path, text), {}, environ={})


def test_an_unset_variable_names_the_key_inside_the_table(tmp_path: Path) -> None:
    text = "upstreams: {a: {url: 'https://a.example/simple/', username: u, password: '${NOPE}'}}"
    with pytest.raises(
        ConfigError, match=r"^upstreams: a: password: the environment variable NOPE is not set$"
    ):
        options.read(write(tmp_path, text), {}, environ={})


def test_upstream_and_upstreams_do_not_mix(tmp_path: Path) -> None:
    text = "upstream: https://x.example/simple/\nupstreams: {a: 'https://a.example/simple/'}"
    with pytest.raises(ConfigError, match="upstream: set upstream or upstreams, not both"):
        options.read(write(tmp_path, text), {}, environ={})
    with pytest.raises(ConfigError, match="groups: groups, routes and default-group need named upstreams"):
        options.read(write(tmp_path, "groups: {default: [upstream]}"), {}, environ={})


def test_a_ca_file_that_is_no_certificate_stops_start_up(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_text("not a certificate\n")
    text = f"upstreams: {{a: {{url: 'https://a.example/simple/', ca-file: {tmp_path}/ca.pem}}}}"
    with pytest.raises(ConfigError, match=r"^upstreams: a: ca-file .*ca.pem: no PEM certificate in it$"):
        options.read(write(tmp_path, text), {}, environ={})


def test_a_malformed_url_is_not_echoed_with_what_may_be_a_password(tmp_path: Path) -> None:
    text = "upstreams: {a: {url: 'ci:hunter2@index.example/simple/'}}"
    with pytest.raises(ConfigError) as raised:
        options.read(write(tmp_path, text), {}, environ={})
    expected = "upstreams: a: url: expected an http or https URL, got 'index.example/simple/'"
    assert str(raised.value) == expected


def test_an_upstreams_json_api(tmp_path: Path) -> None:
    text = """
upstreams:
  derived: https://a.example/simple/
  other: {url: "https://b.example/index/", json-api-url: "https://b.example/legacy"}
  none: {url: "https://c.example/simple/", json-api: false}
  plain: https://d.example/index/
"""
    found = topology(options.read(write(tmp_path, text), {}, environ={}))
    assert [u.json_api for u in found.upstreams] == [
        "https://a.example/pypi/",
        "https://b.example/legacy/",
        None,
        None,
    ]

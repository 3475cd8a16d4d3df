"""
The policy's pure decisions: durations and instants read, rules and
exemptions matched, and each file's verdict with the reason it names.
"""

from __future__ import annotations

from datetime import UTC, date, datetime

import pytest

from txpypi.core.policy import (
    NO_POLICY,
    Policy,
    PolicyError,
    PolicyTable,
    Rule,
    format_instant,
    parse_duration,
    parse_instant,
    parse_policy,
)
from txpypi.core.simple.model import DistFile

NOW = parse_instant("2026-12-01T12:00:00Z")
DAY = 86400.0


def dist(
    filename: str, uploaded: str | None = "2026-11-01T00:00:00Z", yanked: bool | str = False
) -> DistFile:
    return DistFile(
        filename,
        f"https://files.example/{filename}",
        {"sha256": "aa" * 32},
        upload_time=uploaded,
        yanked=yanked,
    )


@pytest.mark.parametrize(
    "given, seconds",
    [
        ("7d", 7 * DAY),
        ("12h", 43200),
        ("90", 90),
        (0, 0),
        ("2w", 14 * DAY),
        ("P7D", 7 * DAY),
        ("PT12H", 43200),
        ("P1DT1M", DAY + 60),
    ],
)
def test_durations(given: object, seconds: float) -> None:
    assert parse_duration(given) == seconds


@pytest.mark.parametrize("given", ["7 days", "-1d", "P", "PT", True, "d"])
def test_bad_durations(given: object) -> None:
    with pytest.raises(PolicyError):
        parse_duration(given)


def test_instants_quoted_or_as_yaml_reads_them() -> None:
    midnight = datetime(2026, 11, 1, tzinfo=UTC).timestamp()
    assert (
        parse_instant("2026-11-01T00:00:00Z") == parse_instant(datetime(2026, 11, 1, tzinfo=UTC)) == midnight
    )
    assert parse_instant("2026-11-01") == parse_instant(date(2026, 11, 1)) == midnight
    assert parse_instant(date(2026, 11, 1), end_of_day=True) == pytest.approx(midnight + DAY, abs=0.001)
    assert parse_instant("2026-11-01T02:00:00+02:00") == midnight
    assert format_instant(midnight) == "2026-11-01T00:00:00Z"


def test_rules() -> None:
    assert Rule.parse("Evil_*").matches("evil-lib", "evil_lib-1.0-py3-none-any.whl")
    versioned = Rule.parse("requests==2.99.0")
    assert versioned.matches("requests", "requests-2.99.0.tar.gz")
    assert not versioned.matches("requests", "requests-2.31.0.tar.gz")
    assert not versioned.whole_project
    kind = Rule.parse("sdist:*")
    assert kind.matches("x", "x-1.0.tar.gz") and not kind.matches("x", "x-1.0-py3-none-any.whl")
    assert Rule.parse("django>=4,<6").matches("django", "Django-5.0-py3-none-any.whl")
    assert not Rule.parse("django>=4,<6").matches("django", "Django-6.0-py3-none-any.whl")
    with pytest.raises(PolicyError):
        Rule.parse("==1.0")


def test_the_age_is_measured_from_the_upload_time_and_named() -> None:
    policy = Policy(min_release_age=7 * DAY)
    young = dist("acc_timed-2.0-py3-none-any.whl", "2026-11-28T10:00:00Z")
    verdict = policy.verdict("acc-timed", young, NOW)
    assert verdict.refusal is not None and verdict.refusal.rule == "min-release-age"
    assert verdict.refusal.reason == "younger than min-release-age 7d: uploaded 2026-11-28T10:00:00Z"
    assert verdict.until == parse_instant("2026-12-05T10:00:00Z")  # when it comes of age
    assert policy.verdict("acc-timed", dist("acc_timed-1.0-py3-none-any.whl"), NOW).refusal is None


def test_a_cut_off_and_a_missing_upload_time_fail_closed() -> None:
    policy = Policy(exclude_newer=parse_instant("2026-11-15"))
    late = policy.verdict("x", dist("x-2.0.tar.gz", "2026-11-16T00:00:00Z"), NOW).refusal
    assert late is not None and late.reason == (
        "uploaded after exclude-newer 2026-11-15T00:00:00Z: uploaded 2026-11-16T00:00:00Z"
    )
    unknown = policy.verdict("x", dist("x-1.0.tar.gz", None), NOW).refusal
    assert unknown is not None and unknown.rule == "missing-upload-time"
    assert (
        Policy(exclude_newer=0, missing_upload_time="allow")
        .verdict("x", dist("x-1.0.tar.gz", None), NOW)
        .refusal
        is None
    )
    # Without an age or a cut-off, no upload time is needed.
    assert Policy(block=()).verdict("x", dist("x-1.0.tar.gz", None), NOW).refusal is None


def test_blocks_allows_and_yanked() -> None:
    policy = parse_policy(
        {"allow": ["django>=4", "requests"], "block": ["requests==2.99.0"], "hide-yanked": True}
    )
    assert policy.project_refusal("numpy") is not None
    assert policy.verdict("django", dist("Django-3.2-py3-none-any.whl"), NOW).refusal is not None
    assert policy.verdict("django", dist("Django-5.0-py3-none-any.whl"), NOW).refusal is None
    blocked = policy.verdict("requests", dist("requests-2.99.0.tar.gz"), NOW).refusal
    assert blocked is not None and blocked.reason == "requests-2.99.0.tar.gz is blocked by 'requests==2.99.0'"
    yanked = policy.verdict("requests", dist("requests-2.0.tar.gz", yanked="broken"), NOW).refusal
    assert yanked is not None and yanked.rule == "yanked"
    assert parse_policy({"block": ["evil-*"]}).project_refusal("evil-lib") is not None


def test_an_exemption_lets_a_young_file_through_until_it_expires() -> None:
    policy = parse_policy(
        {
            "min-release-age": "7d",
            "exempt": [
                {"project": "urllib3", "versions": "==2.9.1", "until": date(2026, 12, 31), "reason": "CVE"}
            ],
        }
    )
    young = dist("urllib3-2.9.1-py3-none-any.whl", "2026-11-30T00:00:00Z")
    verdict = policy.verdict("urllib3", young, NOW)
    assert verdict.refusal is None and verdict.exempted is not None and verdict.exempted.reason == "CVE"
    later = policy.verdict("urllib3", young, parse_instant("2027-01-01T00:00:01Z"))
    # By then it is of age anyway; a younger one is refused, the exemption expired.
    assert later.refusal is None
    newer = dist("urllib3-2.9.1.tar.gz", "2026-12-31T23:00:00Z")
    expired = policy.verdict("urllib3", newer, parse_instant("2027-01-01T00:00:01Z"))
    assert expired.refusal is not None and expired.expired is not None
    # Another version is not covered.
    assert policy.verdict(
        "urllib3", dist("urllib3-2.9.2-py3-none-any.whl", "2026-11-30T00:00:00Z"), NOW
    ).refusal


def test_an_upstreams_settings_come_first_then_the_groups() -> None:
    table = PolicyTable(
        groups={"default": parse_policy({"min-release-age": "7d", "hide-yanked": True})},
        upstreams={"private": parse_policy({"min-release-age": 0})},
    )
    private, public = table.of("default", "private"), table.of("default", "public")
    assert (private.min_release_age, private.hide_yanked) == (0, True)
    assert public.min_release_age == 7 * DAY
    assert table.of("mirror", "public") == NO_POLICY


@pytest.mark.parametrize(
    "given, message",
    [
        ({"min-release-age": "soon"}, "min-release-age: expected a duration"),
        ({"exclude-newer": "yesterday"}, "exclude-newer: expected a date or an RFC 3339 time"),
        ({"missing-upload-time": "maybe"}, "missing-upload-time: expected hide or allow"),
        ({"block": ["x~~1"]}, "block: x~~1: '~~1' is not a version specifier"),
        ({"exempt": [{"project": "x", "until": "2026-12-31"}]}, "exempt: x: a reason is required"),
        ({"exempt": [{"project": "x", "reason": "r"}]}, "exempt: x: until (an expiry) is required"),
        ({"colour": "red"}, "unknown key 'colour'"),
    ],
)
def test_bad_policies_name_the_key(given: dict[str, object], message: str) -> None:
    with pytest.raises(PolicyError) as raised:
        parse_policy(given)
    assert str(raised.value).startswith(message)


@pytest.mark.parametrize("ext", [".tar.gz", ".zip", ".tar.bz2", ".tgz", ".tar.xz", ".tar", ".ZIP", ".egg"])
def test_every_source_archive_is_an_sdist_with_its_version(ext: str) -> None:
    policy = parse_policy({"block": ["foo==1.0", "sdist:bar"]})
    refused = policy.verdict("foo", dist(f"foo-1.0{ext}"), NOW).refusal
    assert refused is not None and refused.rule == "block"
    assert policy.verdict("foo", dist(f"foo-1.1{ext}"), NOW).refusal is None or ext == ".egg"
    assert policy.verdict("bar", dist(f"bar-1.1{ext}"), NOW).refusal is not None


def test_an_unreadable_version_fails_closed_both_ways() -> None:
    odd = dist("foo-latest-build.exe")
    assert parse_policy({"block": ["foo<2"]}).verdict("foo", odd, NOW).refusal is not None
    assert parse_policy({"allow": ["foo>=1"]}).verdict("foo", odd, NOW).refusal is not None

"""
Supply-chain policy, as values and pure decisions: which files of a page a
group shows, and why it refuses the others.

A L{Policy} is what one group or one upstream sets (a field left L{None}
is not set: the upstream's comes first, then the group's, L{Policy.over});
L{Policy.refusal} says why a file is hidden, or L{None}; L{Policy.project_refusal}
why a whole project is.  Time is passed in (C{now}, seconds since the
epoch); the age of a file is always measured from the upload time its
index gives, never from when the proxy first saw it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import UTC, date, datetime, time
from fnmatch import fnmatchcase
from typing import Any

import attrs
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import InvalidVersion, Version

from txpypi.core.simple.model import DistFile, file_version

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_SHORT = re.compile(r"(\d+(?:\.\d+)?)([smhdw]?)", re.ASCII)
_ISO = re.compile(
    r"P(?:(\d+(?:\.\d+)?)W)?(?:(\d+(?:\.\d+)?)D)?(?:T(?:(\d+(?:\.\d+)?)H)?(?:(\d+(?:\.\d+)?)M)?(?:(\d+(?:\.\d+)?)S)?)?",
    re.ASCII,
)

#: The rules a file may be refused under (the metric's bounded label).
RULES = ("allow", "block", "yanked", "min-release-age", "exclude-newer", "missing-upload-time")


class PolicyError(ValueError):
    """
    A policy setting cannot be read; the message is one line.
    """


def parse_duration(value: Any) -> float:
    """
    Seconds, from a number of seconds, C{7d} (s, m, h, d, w), or an ISO
    8601 duration (C{P7D}, C{PT12H}).

    @raise PolicyError: it is none of these.
    """
    if isinstance(value, bool):
        raise PolicyError(f"expected a duration (7d, 12h, P7D), got {value!r}")
    if isinstance(value, int | float):
        if value < 0:
            raise PolicyError("a duration must not be negative")
        return float(value)
    text = str(value).strip()
    short = _SHORT.fullmatch(text)
    if short:
        return float(short.group(1)) * _UNITS[short.group(2) or "s"]
    iso = _ISO.fullmatch(text.upper())
    if iso and text.upper() not in ("P", "PT") and any(iso.groups()):
        weeks, days, hours, minutes, seconds_ = (float(g) if g else 0.0 for g in iso.groups())
        return weeks * 7 * 86400 + days * 86400 + hours * 3600 + minutes * 60 + seconds_
    raise PolicyError(f"expected a duration (7d, 12h, P7D), got {value!r}")


def format_duration(seconds: float) -> str:
    """
    A duration as the config would say it (C{7d}, C{36h}, C{90s}).
    """
    for unit in ("d", "h", "m"):
        if seconds >= _UNITS[unit] and seconds % _UNITS[unit] == 0:
            return f"{seconds / _UNITS[unit]:g}{unit}"
    return f"{seconds:g}s"


def parse_instant(value: Any, end_of_day: bool = False) -> float:
    """
    Seconds since the epoch, from an RFC 3339 time (C{2026-11-01T00:00:00Z};
    without a zone, UTC) or a date (its start in UTC, or with
    C{end_of_day} its last instant), quoted or as YAML reads it unquoted.

    @raise PolicyError: it is neither.
    """
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, date):
        moment = datetime.combine(value, time.max if end_of_day else time.min)
    else:
        text = str(value).strip()
        try:
            if len(text) == 10:
                return parse_instant(date.fromisoformat(text), end_of_day)
            moment = datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
        except ValueError:
            raise PolicyError(f"expected a date or an RFC 3339 time, got {value!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def format_instant(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def upload_time(dist: DistFile) -> float | None:
    """
    When the index says the file was uploaded, or L{None} (not given, or
    not readable: the same as not given).
    """
    if not dist.upload_time:
        return None
    try:
        return parse_instant(dist.upload_time)
    except PolicyError:
        return None


def file_kind(filename: str) -> str:
    """
    C{wheel}, or C{sdist} for anything else an index lists (any archive
    pip could build from, whatever its extension: a block on C{sdist:}
    must not be stepped round by naming one C{.tar.xz}).
    """
    return "wheel" if filename.lower().endswith(".whl") else "sdist"


_SEPARATORS = re.compile(r"[-_.]+")
_SPEC_START = re.compile(r"[<>=!~]")


def _normalized_glob(pattern: str) -> str:
    return _SEPARATORS.sub("-", pattern).lower()


def _specifier(text: str, where: str) -> SpecifierSet | None:
    text = text.strip()
    if not text:
        return None
    try:
        return SpecifierSet(text)
    except InvalidSpecifier:
        raise PolicyError(f"{where}: {text!r} is not a version specifier") from None


def _contains(specifier: SpecifierSet | None, version: str | None, unknown: bool = False) -> bool:
    """
    Whether C{version} is in C{specifier} (none: every version); a version
    that cannot be read is C{unknown}'s answer (the cautious one: a block
    rule matches it, an allow rule does not).
    """
    if specifier is None:
        return True
    if version is None:
        return unknown
    try:
        return specifier.contains(Version(version), prereleases=True)
    except InvalidVersion:
        return False


@attrs.frozen
class Rule:
    """
    One entry of an C{allow} or C{block} list: a project glob, optionally
    with version specifiers (C{django>=4,<6}), or a file kind
    (C{sdist:*}, C{wheel:numpy}).
    """

    text: str
    project: str
    specifier: SpecifierSet | None = None
    kind: str | None = None

    @classmethod
    def parse(cls, text: Any) -> Rule:
        if not isinstance(text, str) or not text.strip():
            raise PolicyError(
                f"expected a project glob, 'name<specifiers>' or 'sdist:'/'wheel:' glob, got {text!r}"
            )
        given = text.strip()
        kind = None
        rest = given
        for prefix in ("sdist:", "wheel:"):
            if given.startswith(prefix):
                kind, rest = prefix[:-1], given[len(prefix) :]
        found = _SPEC_START.search(rest)
        name, spec = (rest, "") if found is None else (rest[: found.start()], rest[found.start() :])
        if not name.strip():
            raise PolicyError(f"{given!r} names no project")
        return cls(given, _normalized_glob(name.strip()), _specifier(spec, given), kind)

    @property
    def whole_project(self) -> bool:
        """
        Whether it names projects only (no versions, no file kind).
        """
        return self.specifier is None and self.kind is None

    def names(self, project: str) -> bool:
        return fnmatchcase(project, self.project)

    def matches(self, project: str, filename: str, unknown: bool = False) -> bool:
        """
        Whether it names this file of C{project}; a file whose version
        cannot be read matches a versioned rule when C{unknown} (block
        rules) and does not otherwise (allow rules): both fail closed.
        """
        if not self.names(project):
            return False
        if self.kind is not None and file_kind(filename) != self.kind:
            return False
        return _contains(self.specifier, file_version(filename), unknown)


@attrs.frozen
class Exemption:
    """
    Break-glass: files of C{project} (a glob) in C{versions} let through
    the age, cut-off, upload-time and yanked rules until C{until}, for the
    C{reason} given.
    """

    project: str
    versions: SpecifierSet | None
    until: float
    reason: str
    text: str

    def covers(self, project: str, filename: str) -> bool:
        return fnmatchcase(project, self.project) and _contains(self.versions, file_version(filename))


@attrs.frozen
class Refusal:
    """
    Why a file (or a project) is hidden: the rule, and a one-line reason.
    """

    rule: str
    reason: str


@attrs.frozen
class Verdict:
    """
    A file's fate: refused (C{refusal}), or let through, maybe only by an
    exemption (C{exempted}), or refused only by an exemption that expired.
    C{until}: when it may change (a file coming of age, an exemption
    ending), for how long a view stays right.
    """

    refusal: Refusal | None = None
    exempted: Exemption | None = None
    expired: Exemption | None = None
    until: float | None = None


VISIBLE = Verdict()


def _sooner(a: float | None, b: float | None) -> float | None:
    if a is None:
        return b
    if b is None:
        return a
    return min(a, b)


@attrs.frozen
class Policy:
    """
    What a group or an upstream sets; L{None}: not set here.
    """

    min_release_age: float | None = None
    exclude_newer: float | None = None
    missing_upload_time: str | None = None
    allow: tuple[Rule, ...] | None = None
    block: tuple[Rule, ...] | None = None
    hide_yanked: bool | None = None
    exempt: tuple[Exemption, ...] | None = None

    def over(self, base: Policy) -> Policy:
        """
        This policy, with what it does not set taken from C{base}.
        """
        return Policy(
            **{
                f.name: getattr(base, f.name) if getattr(self, f.name) is None else getattr(self, f.name)
                for f in attrs.fields(Policy)
            }
        )

    @property
    def active(self) -> bool:
        """
        Whether it can hide anything at all.
        """
        return bool(
            self.min_release_age
            or self.exclude_newer is not None
            or self.allow is not None
            or self.block
            or self.hide_yanked
        )

    def project_refusal(self, project: str) -> Refusal | None:
        """
        Why the whole project is hidden (its page is a 404), if it is: a
        block rule that names the project alone, or an allow list that
        does not name it.
        """
        for rule in self.block or ():
            if rule.whole_project and rule.names(project):
                return Refusal("block", f"{project} is blocked by {rule.text!r}")
        if self.allow is not None and not any(rule.names(project) for rule in self.allow):
            return Refusal("allow", f"{project} is not in the allow list")
        return None

    def verdict(self, project: str, dist: DistFile, now: float) -> Verdict:
        """
        Whether C{dist} of C{project} is shown, at C{now}.
        """
        refused = self.project_refusal(project)
        if refused is not None:
            return Verdict(refused)
        filename = dist.filename
        if self.allow is not None and not any(rule.matches(project, filename) for rule in self.allow):
            return Verdict(Refusal("allow", f"{filename} is not in the allow list"))
        for rule in self.block or ():
            if rule.matches(project, filename, unknown=True):
                return Verdict(Refusal("block", f"{filename} is blocked by {rule.text!r}"))
        refusal, until = self._timed(dist, now)
        if refusal is None:
            return Verdict(until=until)
        for exemption in self.exempt or ():
            if exemption.covers(project, filename):
                if exemption.until >= now:
                    return Verdict(exempted=exemption, until=_sooner(until, exemption.until))
                return Verdict(refusal, expired=exemption, until=until)
        return Verdict(refusal, until=until)

    def _timed(self, dist: DistFile, now: float) -> tuple[Refusal | None, float | None]:
        """
        The refusals an exemption may lift (yanked, cut-off, age, unknown
        upload time), and when the answer changes by itself.
        """
        if self.hide_yanked and dist.yanked is not False:
            return Refusal("yanked", f"{dist.filename} is yanked"), None
        if not self.min_release_age and self.exclude_newer is None:
            return None, None
        uploaded = upload_time(dist)
        if uploaded is None:
            if self.missing_upload_time == "allow":
                return None, None
            return Refusal(
                "missing-upload-time",
                f"{dist.filename} has no upload time, and a release age or cut-off applies",
            ), None
        when = format_instant(uploaded)
        if self.exclude_newer is not None and uploaded > self.exclude_newer:
            cut = format_instant(self.exclude_newer)
            return Refusal("exclude-newer", f"uploaded after exclude-newer {cut}: uploaded {when}"), None
        if self.min_release_age:
            of_age = uploaded + self.min_release_age
            if now < of_age:
                age = format_duration(self.min_release_age)
                return Refusal(
                    "min-release-age", f"younger than min-release-age {age}: uploaded {when}"
                ), of_age
        return None, None

    def words(self) -> str:
        """
        The policy in a few words, for people (the status page).
        """
        parts = []
        if self.min_release_age:
            parts.append(f"min-release-age {format_duration(self.min_release_age)}")
        if self.exclude_newer is not None:
            parts.append(f"exclude-newer {format_instant(self.exclude_newer)}")
        if self.allow is not None:
            parts.append(f"allow {', '.join(r.text for r in self.allow)}")
        if self.block:
            parts.append(f"block {', '.join(r.text for r in self.block)}")
        if self.hide_yanked:
            parts.append("yanked hidden")
        if self.exempt:
            parts.append(f"{len(self.exempt)} exemption(s)")
        return "; ".join(parts) or "none"

    def describe(self) -> dict[str, Any]:
        """
        The policy as JSON values (for C{GET /<group>/policy}).
        """
        return {
            "min-release-age": None
            if self.min_release_age is None
            else format_duration(self.min_release_age),
            "exclude-newer": None if self.exclude_newer is None else format_instant(self.exclude_newer),
            "missing-upload-time": self.missing_upload_time or "hide",
            "allow": None if self.allow is None else [r.text for r in self.allow],
            "block": [r.text for r in self.block or ()],
            "hide-yanked": bool(self.hide_yanked),
            "exempt": [
                {"rule": e.text, "until": format_instant(e.until), "reason": e.reason}
                for e in self.exempt or ()
            ],
        }


#: The policy of a group or an upstream that sets nothing.
NO_POLICY = Policy()


@attrs.frozen
class PolicyTable:
    """
    Every group's policy and every upstream's, by name: what a SIGHUP
    replaces as a whole.
    """

    groups: Mapping[str, Policy] = attrs.field(factory=dict)
    upstreams: Mapping[str, Policy] = attrs.field(factory=dict)

    def of(self, group: str, upstream: str) -> Policy:
        """
        The policy for the files of C{upstream} in C{group}: the upstream's
        settings over the group's.
        """
        return self.upstreams.get(upstream, NO_POLICY).over(self.groups.get(group, NO_POLICY))

    def active_in(self, group: str, upstreams: tuple[str, ...]) -> bool:
        return any(self.of(group, name).active for name in upstreams)


POLICY_KEYS = frozenset(
    {"min-release-age", "exclude-newer", "missing-upload-time", "allow", "block", "hide-yanked", "exempt"}
)


def _exemption(given: Any) -> Exemption:
    if not isinstance(given, Mapping):
        raise PolicyError("exempt: each is {project, versions, until, reason}")
    unknown = set(given) - {"project", "versions", "until", "reason"}
    if unknown:
        raise PolicyError(f"exempt: unknown key {sorted(unknown)[0]!r}")
    project = given.get("project")
    if not isinstance(project, str) or not project.strip():
        raise PolicyError("exempt: project: required")
    reason = given.get("reason")
    if not isinstance(reason, str) or not reason.strip():
        raise PolicyError(f"exempt: {project}: a reason is required")
    if "until" not in given:
        raise PolicyError(f"exempt: {project}: until (an expiry) is required")
    versions = given.get("versions")
    text = project.strip() + ("" if versions is None else str(versions))
    return Exemption(
        _normalized_glob(project.strip()),
        None if versions is None else _specifier(str(versions), f"exempt: {project}"),
        parse_instant(given["until"], end_of_day=True),
        reason.strip(),
        text,
    )


def _rules(key: str, value: Any) -> tuple[Rule, ...]:
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list):
        raise PolicyError(f"{key}: expected a list")
    try:
        return tuple(Rule.parse(v) for v in values)
    except PolicyError as e:
        raise PolicyError(f"{key}: {e}") from None


def parse_policy(given: Any) -> Policy:
    """
    A C{policy:} mapping from the config.

    @raise PolicyError: naming the key at fault.
    """
    if not isinstance(given, Mapping):
        raise PolicyError("expected a mapping")
    unknown = set(given) - POLICY_KEYS
    if unknown:
        raise PolicyError(f"unknown key {sorted(unknown)[0]!r}")
    values: dict[str, Any] = {}
    for key, attribute, read in (
        ("min-release-age", "min_release_age", parse_duration),
        ("exclude-newer", "exclude_newer", parse_instant),
    ):
        if key in given:
            try:
                values[attribute] = read(given[key])
            except PolicyError as e:
                raise PolicyError(f"{key}: {e}") from None
    if "missing-upload-time" in given:
        if given["missing-upload-time"] not in ("hide", "allow"):
            raise PolicyError(
                f"missing-upload-time: expected hide or allow, got {given['missing-upload-time']!r}"
            )
        values["missing_upload_time"] = given["missing-upload-time"]
    for key in ("allow", "block"):
        if key in given:
            values[key] = _rules(key, given[key])
    if "hide-yanked" in given:
        if not isinstance(given["hide-yanked"], bool):
            raise PolicyError("hide-yanked: expected true or false")
        values["hide_yanked"] = given["hide-yanked"]
    if "exempt" in given:
        if not isinstance(given["exempt"], list):
            raise PolicyError("exempt: expected a list")
        values["exempt"] = tuple(_exemption(e) for e in given["exempt"])
    return Policy(**values)

"""
Project names, file names and hashes.
"""

from __future__ import annotations

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from txpypi.core.names import BadName, Hasher, check_filename, is_normalized, normalize, strongest_hash


@pytest.mark.parametrize(
    "name, expected",
    [("Django", "django"), ("zope.interface", "zope-interface"), ("A__B--c", "a-b-c"), ("x", "x")],
)
def test_normalize(name: str, expected: str) -> None:
    assert normalize(name) == expected


@pytest.mark.parametrize("name", ["", "-a", "a-", "a b", "a/b", "..", "a\x00", "é", "x" * 201])
def test_bad_project_names(name: str) -> None:
    with pytest.raises(BadName):
        normalize(name)


@given(st.from_regex(r"[A-Za-z0-9]([A-Za-z0-9._-]{0,30}[A-Za-z0-9])?", fullmatch=True))
@settings(max_examples=200)
def test_normalize_is_idempotent(name: str) -> None:
    once = normalize(name)
    assert normalize(once) == once
    assert once == once.lower() and "_" not in once and "." not in once


@given(
    st.from_regex(r"[A-Za-z0-9._\-]{0,12}", fullmatch=True) | st.sampled_from(["a" * 200, "a" * 201, "a-b"])
)
@settings(max_examples=500)
def test_is_normalized_says_what_normalize_says(name: str) -> None:
    try:
        normal = normalize(name) == name
    except BadName:
        normal = False
    assert is_normalized(name.encode()) == normal


@pytest.mark.parametrize(
    "filename",
    [
        *("", "a/b.whl", "a\\b.whl", "..", "../x.whl", "x..y.whl", ".hidden", "a\x00b", "a\nb", "x" * 256),
        *("a\x1fb", "a\x7fb", "a\x85b", "a\x9fb"),  # C0, DEL, C1
    ],
)
def test_bad_filenames(filename: str) -> None:
    with pytest.raises(BadName):
        check_filename(filename)


@given(st.text(min_size=1, max_size=300))
@settings(max_examples=300)
def test_accepted_filenames_are_one_safe_component(filename: str) -> None:
    try:
        check_filename(filename)
    except BadName:
        return
    assert "/" not in filename and "\\" not in filename and ".." not in filename
    assert "\x00" not in filename and len(filename.encode("utf-8", "surrogatepass")) <= 255
    assert not any(ord(c) < 32 or 127 <= ord(c) <= 159 for c in filename)


def test_strongest_hash() -> None:
    assert strongest_hash({"md5": "aa", "sha256": "BB"}) == ("sha256", "bb")
    assert strongest_hash({"md5": "aa"}) == ("md5", "aa")
    assert strongest_hash({"whirlpool": "aa", "sha256": "not hex"}) is None


def test_hasher_checks_the_listed_algorithm() -> None:
    data = b"some wheel bytes"
    for algorithm in ("sha256", "md5", "sha512"):
        good = Hasher((algorithm, hashlib.new(algorithm, data).hexdigest()))
        good.update(data)
        assert good.matches() and good.sha256() == hashlib.sha256(data).hexdigest()
        bad = Hasher((algorithm, hashlib.new(algorithm, b"other").hexdigest()))
        bad.update(data)
        assert not bad.matches()
    unlisted = Hasher(None)
    unlisted.update(data)
    assert unlisted.matches()

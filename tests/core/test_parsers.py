"""
Hypothesis over the parsers of client input: over arbitrary text, and
bytes as latin-1 (how the proxy decodes header values), each returns a
value of its documented type or raises only its documented exception, and
keeps its meaningful properties.
"""

from __future__ import annotations

import string

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from txpypi.core.httpheaders import accepts_gzip, etag_matches
from txpypi.core.names import BadName, check_filename, normalize, valid_project_name
from txpypi.core.peer import WINDOW, sign, verify
from txpypi.core.simple.media import HTML_LEGACY, SERVED_TYPES, negotiate
from txpypi.web.answers import segment as _segment

#: Header values as the proxy sees them: any bytes, decoded as latin-1.
latin1 = st.binary(max_size=200).map(lambda b: b.decode("latin-1"))
#: Text, with the characters that trip case-insensitive and line-anchored
#: regular expressions (İ ı ſ K, a newline) and the HTTP list syntax made
#: likely.
tricky = st.sampled_from(list('İıſK\n\r\t ,;="*/.-_\x00\x7f\x85') + ["..", "q=", "W/"])
text = st.one_of(
    st.text(max_size=100),
    latin1,
    st.lists(st.one_of(tricky, st.text(string.ascii_letters + string.digits, max_size=5)), max_size=20).map(
        "".join
    ),
)
bounded = settings(max_examples=300, deadline=None)


# -- If-None-Match


@bounded
@given(text, text)
def test_etag_matches_is_a_bool(header: str, etag: str) -> None:
    assert isinstance(etag_matches(header, etag), bool)


@bounded
@given(st.text(string.ascii_letters + string.digits, min_size=1, max_size=64), st.lists(text, max_size=5))
def test_etag_matches_finds_its_tag_in_any_list(tag: str, others: list[str]) -> None:
    etag = f'"{tag}"'
    listed = [o.replace(",", "") for o in others]
    assert etag_matches(", ".join([*listed, etag]), etag)
    assert etag_matches(", ".join([*listed, "W/" + etag]), etag)  # weak comparison
    assert etag_matches("*", etag)
    unrelated = [t for t in listed if t.strip().removeprefix("W/") != etag and t.strip() != "*"]
    assert not etag_matches(", ".join(unrelated), etag)


# -- Accept-Encoding


@bounded
@given(text)
def test_accepts_gzip_is_a_bool(header: str) -> None:
    assert isinstance(accepts_gzip(header), bool)


q_values = st.sampled_from(["", ";q=1", ";q=0.5", ";q=0", ";q=0.000", ";Q=0", ";q=nan", ";q=x"])


@bounded
@given(
    others=st.lists(
        st.tuples(st.sampled_from(["br", "deflate", "identity", "*", "zstd"]), q_values), max_size=4
    ),
    q=q_values,
    first=st.booleans(),
)
@example(others=[("*", ";q=0")], q="", first=False)
def test_gzip_is_decided_by_its_own_q_value(others: list[tuple[str, str]], q: str, first: bool) -> None:
    """
    When gzip is listed, its own q-value decides, wherever it is in the
    list and whatever C{*} says (RFC 9110, 12.5.3).
    """
    parts = [name + value for name, value in others]
    gzip = "gzip" + q
    header = ", ".join([gzip, *parts] if first else [*parts, gzip])
    wanted = q in ("", ";q=1", ";q=0.5")
    assert accepts_gzip(header) is wanted


# -- Accept and ?format=


@bounded
@given(st.one_of(st.none(), text), st.one_of(st.none(), text))
def test_negotiate_chooses_a_served_type_or_none(accept: str | None, fmt: str | None) -> None:
    chosen = negotiate(accept, fmt)
    assert chosen is None or chosen in SERVED_TYPES


@bounded
@given(st.sampled_from(SERVED_TYPES), st.one_of(st.none(), text))
def test_format_wins_and_each_type_gets_itself(served: str, accept: str | None) -> None:
    assert negotiate(accept, served) == served
    assert negotiate(served) == served
    assert negotiate(f"{served};q=0") is None


@bounded
@given(st.one_of(st.none(), st.text(" \t", max_size=3)))
def test_no_accept_header_gets_html(accept: str | None) -> None:
    assert negotiate(accept) == HTML_LEGACY


# -- project and file names


@bounded
@given(text)
@example("ſ")
@example("İ")
@example("abc\n")
@example("K")
def test_normalize_is_idempotent_and_ascii(name: str) -> None:
    """
    A name is normalized or refused with L{BadName}; a normalized name is
    ASCII, valid, and its own normal form.
    """
    try:
        normal = normalize(name)
    except BadName:
        return
    assert normal.isascii() and valid_project_name(normal)
    assert set(normal) <= set(string.ascii_lowercase + string.digits + "-")
    assert normalize(normal) == normal


@bounded
@given(st.from_regex(r"\A[A-Za-z0-9]([A-Za-z0-9._-]{0,30}[A-Za-z0-9])?\Z"))
def test_every_valid_name_normalizes(name: str) -> None:
    assert normalize(name) == normalize(name.upper().replace("_", "-").replace(".", "-"))


@bounded
@given(text)
@example("a\x85b")
@example("..")
@example("a/b")
@example("a\\b")
def test_check_filename_accepts_only_one_safe_component(filename: str) -> None:
    try:
        checked = check_filename(filename)
    except BadName as e:
        assert str(e) and "\n" not in str(e)
        return
    assert checked == filename
    assert "/" not in filename and "\\" not in filename and ".." not in filename
    assert not filename.startswith(".") and "\x00" not in filename
    assert all(ord(c) >= 32 and not 127 <= ord(c) <= 159 for c in filename)
    assert 0 < len(filename.encode("utf-8", "surrogatepass")) <= 255


@bounded
@given(st.binary(max_size=100))
def test_path_segments_are_utf8_or_refused(raw: bytes) -> None:
    try:
        decoded = _segment(raw)
    except BadName:
        with pytest.raises(UnicodeDecodeError):
            raw.decode("utf-8")
        return
    assert isinstance(decoded, str) and decoded.encode("utf-8") == raw


@bounded
@given(st.text(max_size=50))
def test_path_segments_round_trip(segment: str) -> None:
    try:
        raw = segment.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: no client can send it
        return
    assert _segment(raw) == segment


# -- the peer header

SECRET = "s" * 20
paths = st.one_of(st.text(max_size=80), latin1)
times = st.floats(min_value=0, max_value=1e15, allow_nan=False)


@bounded
@given(
    paths,
    times,
    st.integers(-2 * int(WINDOW), 2 * int(WINDOW)),
    st.sampled_from(["{}", "+{}", " {}", "{}.0", "0{}"]),
    text,
)
@example("/_peer/a/b/c", 1000.0, 0, "{}", "é")
@example("/_peer/a/b/c", 1000.0, 0, "1" * 400 + "{}", "x")
@example("/_peer/a/b/c", 1000.0, 0, "١٠٠٠", "x")
def test_verify_is_false_for_anything_malformed(
    path: str, now: float, skew: int, form: str, mac: str
) -> None:
    """
    A header of the right shape around the current time, with any stamp
    spelling and any MAC, and any text at all, is C{False}; never an
    exception.
    """
    value = form.format(int(now) + skew) + ":" + mac
    assert verify(SECRET, path, value, now) is False
    assert verify(SECRET, path, mac, now) is False
    assert verify(SECRET, path, value.removeprefix(form.format(int(now) + skew)), now) is False


@bounded
@given(paths, paths, times, st.floats(min_value=-WINDOW, max_value=WINDOW))
def test_verify_accepts_a_signature_for_its_path_within_the_window(
    path: str, other: str, now: float, skew: float
) -> None:
    value = sign(SECRET, path, now)
    later = int(now) + skew
    assert verify(SECRET, path, value, later)
    if other != path:
        assert not verify(SECRET, other, value, later)
    assert not verify(SECRET, path, value, int(now) + WINDOW + 1)
    assert not verify("t" * 20, path, value, later)

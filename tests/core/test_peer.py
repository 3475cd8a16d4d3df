"""
Signing the requests instances make to each other's peer route.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from txpypi.core.peer import WINDOW, owner_id, owner_url, peer_path, sign, verify

SECRET = "s" * 20


def test_a_signature_is_good_for_its_path_within_the_window() -> None:
    path = peer_path("default", "big", "big-1.0-py3-none-any.whl")
    assert path == "/_peer/default/big/big-1.0-py3-none-any.whl"
    value = sign(SECRET, path, 1000.0)
    assert verify(SECRET, path, value, 1000.0)
    assert verify(SECRET, path, value, 1000.0 + WINDOW)
    assert not verify(SECRET, path, value, 1000.0 + WINDOW + 1)
    assert not verify(SECRET, path, value, 1000.0 - WINDOW - 1)
    assert not verify(SECRET, path + "x", value, 1000.0)
    assert not verify("t" * 20, path, value, 1000.0)
    for bad in (None, "", "nocolon", "x:y", f"1000:{'0' * 64}"):
        assert not verify(SECRET, path, bad, 1000.0)


@given(st.text(min_size=1), st.text(min_size=1), st.text(min_size=1))
def test_peer_paths_quote_every_part(group: str, project: str, filename: str) -> None:
    path = peer_path(group, project, filename)
    assert path.startswith("/_peer/") and path.count("/") == 4 and path.isascii()


def test_lock_owners_carry_the_peer_url() -> None:
    assert owner_url(owner_id("host:1:abc", "http://10.0.0.5:5000")) == "http://10.0.0.5:5000"
    assert owner_url(owner_id("host:1:abc", None)) is None
    assert owner_url(None) is None

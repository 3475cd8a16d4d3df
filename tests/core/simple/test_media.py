"""
Content negotiation (PEP 691): which media type a client gets.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from txpypi.core.simple.media import HTML_LEGACY, HTML_V1, JSON_V1, negotiate

PIP_ACCEPT = f"{JSON_V1}, {HTML_V1}; q=0.1, text/html; q=0.01"


class TestNegotiate:
    @pytest.mark.parametrize(
        "accept, expected",
        [
            (PIP_ACCEPT, JSON_V1),
            ("application/vnd.pypi.simple.latest+json", JSON_V1),
            ("application/vnd.pypi.simple.latest+html", HTML_V1),
            (HTML_V1, HTML_V1),
            ("text/html", HTML_LEGACY),
            ("text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8", HTML_LEGACY),
            ("*/*", HTML_LEGACY),
            (None, HTML_LEGACY),
            ("", HTML_LEGACY),
            ("application/*", HTML_V1),
            (f"{JSON_V1};q=0.5, text/html;q=0.6", HTML_LEGACY),
            # The specific range wins over the wildcard for that type.
            (f"*/*;q=0.9, {JSON_V1};q=0", HTML_LEGACY),
        ],
    )
    def test_accept(self, accept: str | None, expected: str) -> None:
        assert negotiate(accept) == expected

    @pytest.mark.parametrize(
        "accept",
        ["application/json", "image/png", f"{JSON_V1};q=0, text/html;q=0, {HTML_V1};q=0", "*/*;q=0"],
    )
    def test_nothing_acceptable(self, accept: str) -> None:
        assert negotiate(accept) is None

    def test_format_override_wins(self) -> None:
        assert negotiate("text/html", JSON_V1) == JSON_V1
        assert negotiate(PIP_ACCEPT, "application/vnd.pypi.simple.latest+html") == HTML_V1
        assert negotiate(PIP_ACCEPT, "application/xml") is None

    @given(st.text(max_size=60))
    @settings(max_examples=200)
    def test_never_crashes(self, accept: str) -> None:
        assert negotiate(accept) in (None, HTML_LEGACY, HTML_V1, JSON_V1)

"""
The twistd dropin: C{twistd -n txpypi --help}.  The tap module is named as a
string so that listing plugins stays cheap.
"""

from typing import Any

from twisted.application.service import ServiceMaker


class _TxpypiMaker(ServiceMaker):
    """
    txpypi's service maker: choosing it installs txpypi's reactor (see
    L{txpypi.reactor}) before the tap module, and Klein with it, import
    Twisted's default one; C{twistd --reactor} still wins.
    """

    @property
    def options(self) -> Any:
        from txpypi.reactor import install

        install()
        return super().options


txpypi = _TxpypiMaker(
    "txpypi",
    "txpypi.tap",
    "A pull-through caching proxy for the Python package index.",
    "txpypi",
)

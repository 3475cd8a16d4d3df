"""
The twistd dropin: C{twistd -n txpypi --help}.  The tap module is named as a
string so that listing plugins stays cheap.
"""

from twisted.application.service import ServiceMaker

txpypi = ServiceMaker(
    "txpypi",
    "txpypi.tap",
    "A pull-through caching proxy for the Python package index.",
    "txpypi",
)

"""
txpypi: a pull-through caching proxy for the Python package index, on Twisted.
"""

__version__ = "0.1.0"

"""
Pure helpers for project names, file names and hashes.

Nothing here does I/O; everything is safe to call on the reactor thread.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping

from packaging.utils import canonicalize_name

# PEP 508 names: letters, digits, and . _ - inside, starting and ending with
# a letter or digit.  ASCII only (with IGNORECASE alone, [A-Z] also matches
# İ ı ſ K), and matched whole (a $ would let a trailing newline through).
_NAME_RE = re.compile(r"[A-Z0-9]|[A-Z0-9][A-Z0-9._-]*[A-Z0-9]", re.IGNORECASE | re.ASCII)

MAX_FILENAME_BYTES = 255

#: Hash algorithms we can verify, strongest first.
VERIFIABLE_HASHES = ("sha256", "sha512", "sha384", "sha3_256", "blake2b", "sha224", "sha1", "md5")


class BadName(ValueError):
    """
    A client sent a project or file name that we refuse to look up.
    The message is a one-line reason suitable for a 4xx body.
    """


def valid_project_name(name: str) -> bool:
    """
    Is C{name} a syntactically valid PEP 508 project name?
    """
    return len(name) <= 200 and _NAME_RE.fullmatch(name) is not None


#: A valid project name that L{normalize} gives back unchanged.
_NORMALIZED_RE = re.compile(rb"[a-z0-9]+(?:-[a-z0-9]+)*")


def is_normalized(name: bytes) -> bool:
    """
    Is C{name} a valid project name, already normalized?  The same as
    C{normalize(name.decode()) == name.decode()} without the exception, for
    the quick lane.
    """
    return len(name) <= 200 and _NORMALIZED_RE.fullmatch(name) is not None


def normalize(name: str) -> str:
    """
    Normalize a project name as PEP 503 says.

    @raise BadName: if C{name} is not a valid project name.
    """
    if not valid_project_name(name):
        raise BadName(f"invalid project name: {name!r}")
    return str(canonicalize_name(name))


#: A control character: C0, DEL or C1.
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def check_filename(filename: str) -> str:
    """
    Check that a client-supplied file name is a single safe path component.

    @return: C{filename} unchanged.
    @raise BadName: when it is empty, too long, or contains a path separator,
        C{..}, a NUL or a control character (C0, DEL or C1).
    """
    if not filename:
        raise BadName("empty file name")
    if len(filename.encode("utf-8", "surrogatepass")) > MAX_FILENAME_BYTES:
        raise BadName("file name longer than 255 bytes")
    if "/" in filename or "\\" in filename:
        raise BadName("file name contains a path separator")
    if "\x00" in filename:
        raise BadName("file name contains a NUL byte")
    if ".." in filename or filename.startswith("."):
        raise BadName("file name contains '..' or starts with '.'")
    if _CONTROL_RE.search(filename) is not None:
        raise BadName("file name contains a control character")
    return filename


def strongest_hash(hashes: Mapping[str, str]) -> tuple[str, str] | None:
    """
    Pick the strongest hash we can verify from an index's hash mapping.

    @return: C{(algorithm, lowercase hex digest)} or L{None}.
    """
    for algorithm in VERIFIABLE_HASHES:
        value = hashes.get(algorithm)
        if value and re.fullmatch(r"[0-9a-fA-F]+", value):
            return algorithm, value.lower()
    return None


class Hasher:
    """
    Computes sha256 always, plus the algorithm the index listed when it is
    another one.
    """

    def __init__(self, expected: tuple[str, str] | None) -> None:
        self.expected = expected
        self._sha256 = hashlib.sha256()
        self._other = None
        if expected is not None and expected[0] != "sha256":
            self._other = hashlib.new(expected[0])

    def update(self, data: bytes) -> None:
        self._sha256.update(data)
        if self._other is not None:
            self._other.update(data)

    def sha256(self) -> str:
        return self._sha256.hexdigest()

    def matches(self) -> bool:
        """
        Does the data seen so far match the expected hash?  With no expected
        hash, anything matches.
        """
        if self.expected is None:
            return True
        algorithm, value = self.expected
        if self._other is not None:
            return self._other.hexdigest() == value
        return self._sha256.hexdigest() == value

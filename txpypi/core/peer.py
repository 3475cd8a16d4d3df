"""
Peers: the instances of one cluster stream a download in progress to each
other over an internal route, C{/_peer/<group>/<project>/<filename>}.

A request on that route carries C{X-Txpypi-Peer: <time>:<hmac>}, the
HMAC-SHA256 under the cluster's shared secret of the time and the path, so
the secret never travels and a signature is good for one path for a minute.
Pure: no I/O.
"""

from __future__ import annotations

import hashlib
import hmac
from urllib.parse import quote

#: The header that carries a peer request's signature.
HEADER = b"x-txpypi-peer"

#: How far a signature's time may be from ours, in seconds.
WINDOW = 60.0

PREFIX = "/_peer/"


def peer_path(group: str, project: str, filename: str) -> str:
    """
    The path of a file in progress on a peer.
    """
    return PREFIX + "/".join(quote(part, safe="") for part in (group, project, filename))


def sign(secret: str, path: str, now: float) -> str:
    """
    The value of L{HEADER} for a request of C{path} at C{now}.
    """
    stamp = str(int(now))
    return f"{stamp}:{_mac(secret, stamp, path)}"


#: The longest time stamp taken, in digits (a Unix time has 10 until 2286;
#: past 16, a float cannot hold it exactly).
_STAMP_DIGITS = 16


def verify(secret: str, path: str, value: str | None, now: float) -> bool:
    """
    Is C{value} a signature of C{path} under C{secret}, made within
    L{WINDOW} seconds of C{now}?  Anything malformed (not C{<ASCII
    digits>:<ASCII>}, a stamp too long) is simply C{False}: this never
    raises.
    """
    if not value or ":" not in value:
        return False
    stamp, _, mac = value.partition(":")
    if not (stamp.isascii() and stamp.isdigit() and len(stamp) <= _STAMP_DIGITS and mac.isascii()):
        return False
    if abs(now - int(stamp)) > WINDOW:
        return False
    return hmac.compare_digest(mac, _mac(secret, stamp, path))


def _mac(secret: str, stamp: str, path: str) -> str:
    message = f"{stamp}\n{path}".encode("utf-8", "surrogatepass")
    return hmac.new(secret.encode("utf-8", "surrogatepass"), message, hashlib.sha256).hexdigest()


def owner_id(instance: str, peer_url: str | None) -> str:
    """
    The owner of this instance's cluster locks: its id, then the URL where
    its peers reach it, if it has one.
    """
    return instance if peer_url is None else f"{instance} {peer_url}"


def owner_url(owner: str | None) -> str | None:
    """
    The peer URL in a lock's owner, if there is one.
    """
    if owner is None or " " not in owner:
        return None
    url = owner.split(" ", 1)[1].strip()
    return url or None

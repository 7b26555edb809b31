"""How the nodes of a cluster know each other's requests: a key only holders of the CA have.

Every node of a cluster holds the same CA (the same `ca_dir` contents), and its private
key is the one secret they all share and nobody else has. The peer key is derived from
it (HKDF-SHA256 over the key's PKCS#8 bytes, with a fixed label, so the CA key itself
never signs anything but certificates), and a node signs each request to another one
with an HMAC over the method, the request target and a timestamp. The receiving node
takes a signature that is right and no older (or newer) than SKEW seconds, compared in
constant time. A signed request may be replayed within that window, to the same path:
that asks the owner again for a blob it is fetching or holds anyway, nothing more.

A CA rotation gives the nodes a new key at the restart that activates it: until every
node has restarted, their requests to one another are refused, and each fetches itself.
"""

from __future__ import annotations

import hashlib
import hmac
import time

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

HEADER = "X-Registry-Cache-Peer"  # "v1 <unix time> <hex HMAC-SHA256>"
SKEW = 60  # seconds a signature is good for, either way (clocks of nodes differ)
_LABEL = b"registry-cache peer requests v1"


def peer_key(ca_key: ec.EllipticCurvePrivateKey) -> bytes:
    """The cluster's request key, the same on every node that holds this CA key."""
    material = ca_key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_LABEL).derive(material)


def _mac(key: bytes, method: str, target: str, stamp: int) -> str:
    message = f"{method.upper()}\n{target}\n{stamp}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def sign(key: bytes, method: str, target: str, now: float | None = None) -> str:
    """The header value for a request of `method` to `target` (path and query, raw)."""
    stamp = int(time.time() if now is None else now)
    return f"v1 {stamp} {_mac(key, method, target, stamp)}"


def check(key: bytes, method: str, target: str, value: str | None, now: float | None = None) -> str:
    """Why the header `value` does not sign this request; "" when it does."""
    if not value:
        return f"no {HEADER} header"
    parts = value.split(" ")
    if len(parts) != 3 or parts[0] != "v1" or not parts[1].isdigit() or len(parts[1]) > 12:
        return f"{HEADER} is not 'v1 <time> <mac>'"
    stamp = int(parts[1])
    if abs((time.time() if now is None else now) - stamp) > SKEW:
        return f"the signature's time is more than {SKEW} s off (clocks of the nodes differ?)"
    if not hmac.compare_digest(parts[2].encode(), _mac(key, method, target, stamp).encode()):
        return "the signature is wrong (not a node of this cluster: another CA?)"
    return ""

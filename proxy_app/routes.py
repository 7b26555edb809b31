"""Parsing of registry API v2 paths, strict enough that nothing odd reaches the store.

Names and references follow the distribution grammar. The raw (still percent-encoded)
path is parsed, and a `%` inside a name or reference is refused: no legitimate name
has one, and decoding first would let `%2e%2e%2f` smuggle a `../` past the checks.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

# distribution/reference: path components joined by '/', each lower-case alphanumerics
# separated by '.', '_', '__' or runs of '-'.
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
NAME = re.compile(rf"{_COMPONENT}(?:/{_COMPONENT})*")
TAG = re.compile(r"[\w][\w.-]{0,127}", re.ASCII)
# Any algorithm the grammar allows; only sha256 is cached, others pass through.
DIGEST = re.compile(r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")
SHA256 = re.compile(r"sha256:[a-f0-9]{64}")
MAX_NAME_LENGTH = 255
PUSH_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


class RouteKind(Enum):
    BLOB = "blob"
    MANIFEST = "manifest"
    TAG = "tag"  # a manifest asked for by tag
    OTHER = "other"  # /v2/ ping, tag lists, token endpoints, uploads: passed through


@dataclass(frozen=True)
class Route:
    kind: RouteKind
    name: str = ""
    reference: str = ""
    cacheable: bool = False  # a sha256 digest (or a tag) we may store


class BadRoute(Exception):
    """A request path no registry could mean; `code` is the registry error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


_NAMED = re.compile(r"/v2/(?P<name>.+?)/(?:tags/list|blobs/uploads|referrers)(?:/.*)?")
_ROUTE = re.compile(r"/v2/(?P<name>.+)/(?P<what>blobs|manifests)/(?P<ref>[^/]+)")


def _has_traversal(path: str) -> bool:
    lowered = path.lower()
    segments = re.split(r"/|%2f", lowered)
    return any(s in {"..", ".", "%2e%2e", "%2e.", ".%2e", "%2e"} for s in segments)


def parse_route(raw_path: str) -> Route:
    """Classifies a request target (path plus optional query, as sent by the client)."""
    path = raw_path.split("?", 1)[0]
    if not path.startswith("/"):
        raise BadRoute("UNSUPPORTED", "the request target must be a path starting with /")
    if _has_traversal(path[1:]):
        raise BadRoute("NAME_INVALID", "'.' and '..' path segments are not allowed")
    m = _ROUTE.fullmatch(path)
    if m is None or m.group("name").startswith("_") or "/blobs/uploads" in path:
        # Still name the repository (tag lists, uploads, referrers) for per-user access checks.
        named = _NAMED.fullmatch(path)
        name = named.group("name") if named and NAME.fullmatch(named.group("name")) else ""
        return Route(RouteKind.OTHER, name)
    name, what, ref = m.group("name"), m.group("what"), m.group("ref")
    if "%" in name or len(name) > MAX_NAME_LENGTH or not NAME.fullmatch(name):
        raise BadRoute(
            "NAME_INVALID",
            f"invalid repository name {name[:80]!r}: lower-case letters, digits and "
            "separators (., _, -) in components joined by /",
        )
    if what == "blobs":
        if not DIGEST.fullmatch(ref):
            raise BadRoute(
                "DIGEST_INVALID", f"invalid digest {ref[:80]!r}: expected sha256:<64 hex>"
            )
        if ref.startswith("sha256:") and not SHA256.fullmatch(ref):
            raise BadRoute("DIGEST_INVALID", f"invalid sha256 digest {ref[:80]!r}: expected 64 hex")
        return Route(RouteKind.BLOB, name, ref, cacheable=bool(SHA256.fullmatch(ref)))
    if ":" in ref:
        if not DIGEST.fullmatch(ref) or (ref.startswith("sha256:") and not SHA256.fullmatch(ref)):
            raise BadRoute(
                "DIGEST_INVALID", f"invalid digest {ref[:80]!r}: expected sha256:<64 hex>"
            )
        return Route(RouteKind.MANIFEST, name, ref, cacheable=bool(SHA256.fullmatch(ref)))
    if not TAG.fullmatch(ref):
        raise BadRoute("TAG_INVALID", f"invalid tag {ref[:80]!r}: up to 128 of [A-Za-z0-9_.-]")
    return Route(RouteKind.TAG, name, ref, cacheable=True)

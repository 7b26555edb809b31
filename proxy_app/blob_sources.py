"""Where a blob the store lacks may come from before its registry is asked.

A cache node of a cluster has two such places: the shared bucket behind every node
(another node fetched it already) and the node that owns the digest (it is fetching it
now, or will, once for every node). Each is a BlobSource: asked in order by the blob
cache on a miss, it answers like an upstream registry would (a 200 whose body streams
the blob) or with None when it does not have the blob or cannot be asked, and then the
next source, and finally the registry, is tried. The bytes are checked against the
digest whatever their source, so a source is trusted for nothing but speed; one whose
bytes do not match is told (refute), and is not asked for that blob again.

The answer's shape is aiohttp's ClientResponse (a peer's answer is one), so the fetch
code streams, verifies and stores a source's bytes exactly as a registry's.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

import aiohttp

from .upstream import Origin


class SourceAnswer(Protocol):
    status: int
    headers: Mapping[str, str]
    content: aiohttp.StreamReader
    content_length: int | None

    def release(self) -> None: ...


class BlobSource(Protocol):
    name: str  # for logs: "bucket", "peer 10.0.0.12:3128"

    async def open(self, digest: str, origin: Origin, repository: str) -> SourceAnswer | None:
        """A 200 answer streaming the blob, or None: not here, or this source is down
        (it logs why); raising is taken as None too."""
        ...

    async def instead(self, digest: str, origin: Origin, repository: str) -> SourceAnswer | None:
        """Its stream of `digest` broke off: another answer of this source for the whole
        blob (a peer: the owner once the broken one is counted out), or None: then the
        registry sends the rest."""
        ...

    def refute(self, digest: str) -> None:
        """The bytes it gave for `digest` did not hash to it: it is not asked for that
        blob again, or not for a while (it logs why). The fetch that read them fails,
        and its clients' next try goes to the registry."""
        ...

"""Which registry and repository each stored digest may be served under.

The store is content-addressed and shared: one copy of a layer, whoever pulled it. But a
digest is not a capability. A registry answers a blob or manifest only in a repository
that holds it, and a proxy user's allow list or `verify_client_access` is a statement
about repositories. So, the way distribution links blobs into repositories, the cache
records where it has seen each digest (registry, repository, and for a manifest the media
type that registry gave it) and serves stored content under a registry and repository
only where it is linked:

- a digest fetched from a repository, or named by a tag answer there, is linked there;
- a digest the store holds for another registry or repository is linked after the
  registry confirms it has it in this one (a HEAD with the client's credentials, or the
  cache's, as for any request; Docker Hub does not count a HEAD as a pull). A no is
  relayed as the registry gave it (404, or 401 with its challenge); the bytes are never
  fetched again.

What this does not settle: a registry that answers yes for a digest it does not hold.
It can only name digests it already knows, and only its own clients see the answer.
"""

from __future__ import annotations

from collections.abc import Mapping

from aiohttp import web

from .client_access import AccessRefused, ask, question_for
from .exchange import Exchange
from .index import Index, Link
from .media_types import STORED_MANIFEST_TYPES
from .routes import Route, RouteKind
from .upstream import Origin, Upstream
from .upstream_share import RequestShare

WHY = "(the cache serves a stored digest under a repository only where the registry has it)"


class RepositoryLinks:
    def __init__(self, index: Index, upstream: Upstream) -> None:
        self._index = index
        self._upstream = upstream

    def get(self, origin: Origin, name: str, digest: str) -> Link | None:
        return self._index.link(origin.key, name, digest)

    def add(self, origin: Origin, name: str, digest: str, media_type: str | None = None) -> None:
        self._index.add_link(origin.key, name, digest, media_type)

    async def confirm(
        self,
        origin: Origin,
        route: Route,
        client_headers: Mapping[str, str],
        share: RequestShare | None,
        deadline: float | None = None,
    ) -> Link | AccessRefused | None:
        """Asks the registry whether route's repository holds route's digest: the new link
        on a yes, the registry's refusal on a no. None for a manifest the registry holds
        but labels with no manifest type: the caller fetches it to see what it is."""
        question = question_for(client_headers)
        if isinstance(question, AccessRefused):
            return question
        answer = await ask(
            self._upstream, origin, route, question, share=share, deadline=deadline, why=WHY
        )
        if isinstance(answer, AccessRefused):
            return answer
        claimed = answer.get("Docker-Content-Digest")
        if claimed and claimed != route.reference:
            return AccessRefused(
                502,
                {},
                f"{origin.netloc} answered for {route.name}@{route.reference} with "
                f"{claimed[:80]}; the cache serves a digest only where the registry names it",
            )
        media_type = None
        if route.kind is not RouteKind.BLOB:
            media_type = answer.get("Content-Type", "").split(";")[0].strip()
            if media_type not in STORED_MANIFEST_TYPES:
                return None
        self.add(origin, route.name, route.reference, media_type)
        return Link(media_type)


def refusal(answer: AccessRefused, origin: Origin, route: Route, ex: Exchange) -> web.Response:
    """The registry's no to a confirmation, for the client and the access log."""
    ex.result = "DENIED" if answer.status in (401, 403) or answer.message else "PASS"
    ex.note = answer.message or f"{origin.netloc} does not confirm it ({answer.status})"
    return answer.response(origin, route)

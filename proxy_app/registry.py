"""The registry dispatch both front doors share: one registry API request, to the caches.

The CONNECT front door (server.py: an intercepted connection, or absolute-form) and the
mirror front door (mirror.py) each name an upstream `Origin`; from there on a request
is the same: access checks (proxy users' allow lists, verify_client_access), then blobs to
the blob cache (blob_cache.py), manifests by digest and by tag to the manifest cache
(manifests.py); pushes are refused unless `allow_push`; everything else (the /v2/ ping,
tag lists, token endpoints) is passed through uncached (PASS).
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from urllib.parse import unquote

from aiohttp import web

from .blob_cache import BlobCache
from .client_access import ClientAccess
from .config import ProxyUser
from .context import CacheContext
from .exchange import Exchange
from .inflight import FetchFailed
from .links import RepositoryLinks
from .manifests import ManifestCache
from .proxy_auth import may_access, token_scopes_allowed
from .responses import (
    API_VERSION,
    CACHE_HEADER,
    CHUNK,
    error_response,
    relay,
)
from .routes import PUSH_METHODS, BadRoute, RouteKind, parse_route
from .upstream import UPSTREAM_ERRORS, Origin, UpstreamRefused, describe
from .upstream_share import UpstreamShares

log = logging.getLogger(__name__)


class RegistryProxy:
    def __init__(self, ctx: CacheContext) -> None:
        self.config = ctx.config
        self.index = ctx.index
        self.upstream = ctx.upstream
        self.metrics = ctx.metrics
        self.links = RepositoryLinks(ctx.index, ctx.upstream)
        self.blobs = BlobCache(ctx, self.links, self.pass_through)
        self.inflight = self.blobs.inflight
        self.manifests = ManifestCache(ctx, self.links)
        self.access = (
            ClientAccess(ctx.upstream, ctx.metrics) if ctx.config.verify_client_access else None
        )
        self.shares = UpstreamShares()
        # hit/miss counts not yet added to the index (flushed by the app's housekeeping)
        self.pending_stats: dict[str, int] = {}

    # --- entry point --------------------------------------------------------------------

    async def serve(
        self,
        request: web.BaseRequest,
        origin: Origin,
        client: str,
        user: ProxyUser | None,
        path: str,
        door: str = "connect",
    ) -> web.StreamResponse:
        """One request from a front door: its exchange, handled, then its access-log line."""
        user_name = user.name if user else None
        ex = Exchange(client, request.method, origin.netloc, path, user=user_name, door=door)
        try:
            return await self.handle(request, origin, ex, user)
        finally:
            ex.log(self.config.log_format)

    async def handle(
        self, request: web.BaseRequest, origin: Origin, ex: Exchange, user: ProxyUser | None = None
    ) -> web.StreamResponse:
        response: web.StreamResponse | None = None
        share = ex.share = self.shares.for_request(ex.client)
        try:
            response = await self._dispatch(request, origin, ex, user)
        except BadRoute as e:
            ex.result = "PASS"
            response = error_response(400, e.code, e.message)
        except UpstreamRefused as e:
            ex.result, ex.note = "DENIED", e.message
            response = self._cut(request, ex) or error_response(
                e.status, e.code, e.message, ex.result
            )
        except (FetchFailed, *UPSTREAM_ERRORS) as e:
            ex.note = describe(e)
            status = 502
            if isinstance(e, ConnectionResetError) and _client_gone(request):
                # A write to a client that closed its end (Go clients drop the /v2/ ping's
                # body unread): not the registry's failure, and nobody is left to answer.
                message = "the client closed the connection"
            elif isinstance(e, FetchFailed):
                message = f"fetching from {origin.netloc} failed: {describe(e)}"
            elif isinstance(e, TimeoutError):
                status, ex.note = 504, "upstream timeout"
                message = (
                    f"upstream registry {origin.netloc} did not answer in time (the cache waits "
                    f"up to upstream_timeout, {self.config.upstream_timeout:g} s)"
                )
                self.metrics.upstream_error(origin.netloc, message, ex.what)
            else:
                message = f"upstream registry {origin.netloc} cannot be reached: {describe(e)}"
                self.metrics.upstream_error(origin.netloc, message, ex.what)
            response = self._cut(request, ex) or error_response(
                status, "UNAVAILABLE", message, ex.result
            )
        except (ConnectionError, asyncio.CancelledError):
            raise  # the client went away: nothing to answer
        except Exception as e:
            # A bug of ours: logged with its traceback here, never shown to the client.
            log.exception("internal error on %s %s%s", request.method, origin.netloc, ex.path)
            ex.note = f"internal error: {type(e).__name__}"
            response = self._cut(request, ex) or error_response(
                500, "UNKNOWN", "internal error in the registry cache; see its log", ex.result
            )
        finally:
            share.release()
        response.headers.setdefault(CACHE_HEADER, ex.result)
        ex.status = response.status
        self.metrics.request(
            origin.netloc, ex.kind, ex.result.lower(), ex.door, ex.repository, ex.note
        )
        if ex.kind in ("blob", "manifest", "tag") and ex.result in ("HIT", "MISS", "STALE"):
            key = {"HIT": "hits", "MISS": "misses", "STALE": "stales"}[ex.result]
            self.pending_stats[key] = self.pending_stats.get(key, 0) + 1
        return response

    def _cut(self, request: web.BaseRequest, ex: Exchange) -> web.StreamResponse | None:
        """After the headers went out, the only honest signal left is a cut connection."""
        prepared = ex.response
        if prepared is None:
            return None
        if request.transport is not None:
            request.transport.abort()
        ex.note = (ex.note + "; connection cut").lstrip("; ")
        return prepared

    async def _dispatch(
        self, request: web.BaseRequest, origin: Origin, ex: Exchange, user: ProxyUser | None
    ) -> web.StreamResponse:
        method = request.method
        raw = ex.path
        if not raw.startswith("/"):
            raise BadRoute("UNSUPPORTED", "the request target must be a path starting with /")
        if _disguised_v2(raw):
            # The push refusal and the allow lists look at the literal /v2/ prefix; a
            # registry decodes `/%762/` or `//v2/` to the same API, so such paths stop here.
            raise BadRoute(
                "NAME_INVALID", "the path must start with /v2/ as it is, not percent-encoded"
            )
        if method in ("GET", "HEAD") and request.body_exists:
            # Forwarded, its body would be the registry's to wait for (or to read as the
            # next request); the cache sends none, and a client must not expect otherwise.
            raise BadRoute(
                "UNSUPPORTED",
                f"a {method} request must not carry a body: send it without Content-Length "
                "or Transfer-Encoding",
            )
        if raw.startswith("/v2/") and method in PUSH_METHODS:
            ex.kind = "push"
            if not self.config.allow_push:
                ex.result = "PASS"
                return error_response(
                    405,
                    "UNSUPPORTED",
                    "push is disabled on this registry cache (allow_push is false): push to "
                    f"{origin.netloc} directly, or enable allow_push on the cache",
                    headers={"Allow": "GET, HEAD"},
                )
            return await self.pass_through(request, origin, ex)
        route = parse_route(raw)
        ex.kind, ex.repository = route.kind.value, route.name or ""
        if route.name and not may_access(user, origin.netloc, route.name):
            ex.result = "DENIED"
            return error_response(
                403,
                "DENIED",
                f"proxy user {user.name if user else '-'} may not read {origin.netloc}/{route.name}"
                " (not in its allow list)",
                "DENIED",
            )
        if user is not None and user.allow and not route.name and _unnamed_v2(raw):
            # A /v2 path that names no repository we can check (the catalog, a trailing
            # slash, odd spellings) is not passed upstream for a user with an allow list.
            ex.result = "DENIED"
            return error_response(
                403,
                "DENIED",
                f"proxy user {user.name} may only read the repositories in its allow list; "
                f"{raw.split('?', 1)[0][:100]} names none of them",
                "DENIED",
            )
        if not raw.startswith("/v2") and not token_scopes_allowed(
            user, method, request.rel_url.query
        ):
            # A token request (auth.docker.io/token?scope=...) for a repository outside the
            # user's allow list: passed on, but never with the cache's own credentials.
            return await self.pass_through(request, origin, ex, cache_credentials=False)
        if method not in ("GET", "HEAD") or route.kind is RouteKind.OTHER or not route.cacheable:
            return await self.pass_through(request, origin, ex)
        if self.access is not None:
            refused = await self.access.check(origin, route, request.headers)
            if refused is not None:
                ex.result = "DENIED"
                ex.note = (
                    refused.message
                    or f"upstream refused the client's credentials ({refused.status})"
                )
                return refused.response(origin, route)
        if route.kind is RouteKind.BLOB:
            return await self.blobs.serve(request, origin, route, ex)
        if route.kind is RouteKind.MANIFEST:
            return await self.manifests.by_digest(request, origin, route, ex)
        return await self.manifests.by_tag(request, origin, route, ex)

    # --- pass-through -------------------------------------------------------------------

    async def pass_through(
        self,
        request: web.BaseRequest,
        origin: Origin,
        ex: Exchange,
        result: str = "PASS",
        cache_credentials: bool = True,
    ) -> web.StreamResponse:
        ex.result = result
        body = request.content.iter_chunked(CHUNK) if request.body_exists else None
        try:
            upstream = await self.upstream.request(
                request.method,
                origin,
                ex.path,
                request.headers,
                data=body,
                cache_credentials=cache_credentials,
                share=ex.share,
            )
        except UPSTREAM_ERRORS as e:
            if (
                request.method == "GET"
                and ex.path in ("/v2/", "/v2")
                and not isinstance(e, ssl.SSLError)
                and (
                    self.index.knows_host(origin.netloc)
                    or await self.manifests.shared_knows_host(origin.netloc)
                )
            ):
                # A registry we hold tags of is down: answer the API ping ourselves so that
                # clients go on to the manifests and blobs the cache can still serve.
                ex.result, ex.note = "STALE", "upstream unreachable, ping answered locally"
                self.metrics.upstream_error(origin.netloc, describe(e), ex.what)
                return web.json_response({}, headers={CACHE_HEADER: "STALE", **API_VERSION})
            raise
        try:
            response, ex.sent = await relay(request, upstream, result, ex.prepared)
            self.metrics.sent(origin.netloc, "upstream", ex.sent, ex.repository)
            return response
        finally:
            upstream.release()

    async def close(self) -> None:
        """Stops the downloads under way; blobs already verified are stored first."""
        await self.blobs.close()
        await self.manifests.close()


def _client_gone(request: web.BaseRequest) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


def _disguised_v2(raw: str) -> bool:
    """A path a registry would route to its /v2 API that does not literally start so."""
    path = raw.split("?", 1)[0]
    if path == "/v2" or path.startswith("/v2/"):
        return False
    normal = re.sub(r"/{2,}", "/", unquote(path))
    return normal == "/v2" or normal.startswith("/v2/")


def _unnamed_v2(raw: str) -> bool:
    path = raw.split("?", 1)[0]
    return path.startswith("/v2/") and path != "/v2/"

"""Requests inside an intercepted connection: the registry API v2, routed to the caches.

Blobs and manifests by digest are answered from the store (HIT) or fetched once and
stored (MISS); manifests by tag go through the tag policy in `manifests`; pushes are
refused unless `allow_push`; everything else (the /v2/ ping, tag lists, token
endpoints) is passed through uncached (PASS).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import re
import sqlite3
import ssl
from collections.abc import AsyncIterator, Coroutine, Mapping
from typing import Any
from urllib.parse import unquote

import aiohttp
from aiohttp import web

from .blobs import BlobReader, BlobWriter, DigestMismatch
from .client_access import AccessRefused, ClientAccess
from .config import ProxyUser
from .content_coding import ContentCodingError, Decoder, codings, decoder_for
from .context import CacheContext
from .exchange import Exchange
from .inflight import BlobFetch, FetchFailed, InflightFetches, StoreUnavailable
from .links import RepositoryLinks, refusal
from .manifests import ManifestCache
from .proxy_auth import may_access, token_scopes_allowed
from .responses import (
    API_VERSION,
    CACHE_HEADER,
    CHUNK,
    SendBudget,
    error_response,
    parse_range,
    read_body,
    relay,
    stream_blob,
)
from .routes import PUSH_METHODS, BadRoute, Route, RouteKind, parse_route
from .store_maintenance import STORE_ERRORS, StoreError
from .upstream import UPSTREAM_ERRORS, Origin, UpstreamRefused, describe
from .upstream_share import UpstreamShares

log = logging.getLogger(__name__)

FETCH_BATCH = 1 << 20  # bytes of a download handed to the disk writer at a time
STORE_ON_STOP_TIMEOUT = 30.0  # seconds a stop waits for verified blobs to be flushed


class Refusal:
    """Upstream's non-200 answer to the request that started a fetch, kept to relay."""

    def __init__(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, dict(headers), body


class RegistryProxy:
    def __init__(self, ctx: CacheContext) -> None:
        self.config = ctx.config
        self.maintenance = ctx.maintenance
        self.store = ctx.store
        self.index = ctx.index
        self.upstream = ctx.upstream
        self.metrics = ctx.metrics
        self.executor = ctx.executor
        self.inflight = InflightFetches(on_change=ctx.metrics.inflight.set)
        self.links = RepositoryLinks(ctx.index, ctx.upstream)
        self.manifests = ManifestCache(ctx, self.links)
        self.access = (
            ClientAccess(ctx.upstream, ctx.metrics) if ctx.config.verify_client_access else None
        )
        self.send_budget = SendBudget()
        self.shares = UpstreamShares()
        self._tasks: set[asyncio.Task[None]] = set()
        self._storing: set[asyncio.Future[None]] = set()
        # hit/miss counts not yet added to the index (flushed by the app's housekeeping)
        self.pending_stats: dict[str, int] = {}

    # --- entry point --------------------------------------------------------------------

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
                self.metrics.upstream_errors.inc()
                status, ex.note = 504, "upstream timeout"
                message = (
                    f"upstream registry {origin.netloc} did not answer in time (the cache waits "
                    f"up to upstream_timeout, {self.config.upstream_timeout:g} s)"
                )
            else:
                self.metrics.upstream_errors.inc()
                message = f"upstream registry {origin.netloc} cannot be reached: {describe(e)}"
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
        self.metrics.requests.labels(ex.kind, ex.result.lower(), ex.door).inc()
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
        ex.kind = route.kind.value
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
            return await self.blob(request, origin, route, ex)
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
                and self.index.knows_host(origin.netloc)
            ):
                # A registry we hold tags of is down: answer the API ping ourselves so that
                # clients go on to the manifests and blobs the cache can still serve.
                ex.result, ex.note = "STALE", "upstream unreachable, ping answered locally"
                self.metrics.upstream_errors.inc()
                return web.json_response({}, headers={CACHE_HEADER: "STALE", **API_VERSION})
            raise
        try:
            response, ex.sent = await relay(request, upstream, result, ex.prepared)
            self.metrics.bytes.labels("upstream").inc(ex.sent)
            return response
        finally:
            upstream.release()

    # --- blobs --------------------------------------------------------------------------

    def _blob_headers(self, digest: str, result: str) -> dict[str, str]:
        return {
            "Content-Type": "application/octet-stream",
            "Docker-Content-Digest": digest,
            "Etag": f'"{digest}"',
            "Cache-Control": "max-age=31536000",
            CACHE_HEADER: result,
            **API_VERSION,
        }

    async def blob(
        self, request: web.BaseRequest, origin: Origin, route: Route, ex: Exchange
    ) -> web.StreamResponse:
        digest = route.reference
        refused = await self._unlinked(request, origin, route, ex)
        if refused is not None:
            return refused
        size = self.store.size(digest)
        if size is not None:
            try:
                reader = self.store.open(digest)
            except FileNotFoundError:
                pass  # evicted a moment ago: fetch it again
            else:
                ex.result = "HIT"
                self.index.touch(digest)
                return await self._send_stored(request, digest, size, reader, ex)
        fetch = self.inflight.get(digest)
        if fetch is not None and fetch.verified:
            # Fetched and verified, being flushed to disk: the bytes are here already.
            ex.result = "HIT"
            return await self._send_inflight(request, origin, route.name, fetch, ex, "cache")
        if request.method == "HEAD":
            return await self.pass_through(request, origin, ex, result="MISS")
        ex.result = "MISS"
        while True:
            fetch, mine = self.inflight.claim(digest)
            if mine:
                fetch.source = (origin.key, route.name)
                self.spawn(self._fetch_blob(fetch, origin, route.name, request.headers, ex))
            started = await asyncio.shield(fetch.started)
            if started:
                break
            if isinstance(fetch.error, StoreUnavailable):
                return await self._send_direct(request, origin, route.name, digest, ex)
            if fetch.error is not None:
                raise fetch.error
            refusal = fetch.refusal
            if mine and isinstance(refusal, Refusal):
                return web.Response(
                    status=refusal.status,
                    body=refusal.body,
                    headers={**refusal.headers, CACHE_HEADER: "MISS"},
                )
            # Upstream refused someone else's request (their token, say): ask with ours.
        return await self._send_inflight(request, origin, route.name, fetch, ex)

    async def _unlinked(
        self, request: web.BaseRequest, origin: Origin, route: Route, ex: Exchange
    ) -> web.Response | None:
        """The registry's no when the cache holds (or is fetching) route's blob for another
        registry or repository and this one does not have it; None when it may be served."""
        digest = route.reference
        if self.links.get(origin, route.name, digest) is not None:
            return None
        fetch = self.inflight.get(digest)
        held = self.store.size(digest) is not None or (fetch is not None and fetch.verified)
        if not held and (fetch is None or fetch.source == (origin.key, route.name)):
            return None  # fetched from this very repository (and linked once stored)
        answer = await self.links.confirm(origin, route, request.headers, ex.share)
        if not isinstance(answer, AccessRefused):
            return None
        return refusal(answer, origin, route, ex)

    def _requested_range(
        self, request: web.BaseRequest, size: int, ex: Exchange
    ) -> tuple[int, int] | web.Response | None:
        """The one byte range asked for, None for the whole blob, or the 416 answer."""
        parsed = parse_range(request.headers.get("Range"), size)
        if parsed is False:
            return error_response(
                416,
                "RANGE_INVALID",
                f"range not satisfiable for {size} bytes",
                ex.result,
                headers={"Content-Range": f"bytes */{size}"},
            )
        return parsed

    async def _send_stored(
        self, request: web.BaseRequest, digest: str, size: int, reader: BlobReader, ex: Exchange
    ) -> web.StreamResponse:
        byte_range = self._requested_range(request, size, ex)
        if isinstance(byte_range, web.Response):
            reader.close()
            return byte_range
        self.maintenance.pin(digest)
        try:
            response, ex.sent = await stream_blob(
                request,
                reader,
                headers=self._blob_headers(digest, ex.result),
                size=size,
                byte_range=byte_range,
                executor=self.executor,
                on_prepared=ex.prepared,
                budget=self.send_budget,
            )
        finally:
            reader.close()
            self.maintenance.unpin(digest)
        self.metrics.bytes.labels("cache").inc(ex.sent)
        return response

    async def _send_inflight(
        self,
        request: web.BaseRequest,
        origin: Origin,
        name: str,
        fetch: BlobFetch,
        ex: Exchange,
        source: str = "upstream",
    ) -> web.StreamResponse:
        byte_range = None
        available = fetch.wait_beyond
        if fetch.size is not None:
            requested = self._requested_range(request, fetch.size, ex)
            if isinstance(requested, web.Response):
                return requested
            byte_range = requested
            if byte_range is not None:
                # A range that ends before the blob does would be complete without its
                # last byte: that one, too, waits until the whole blob is verified.
                available = functools.partial(fetch.wait_beyond, end=byte_range[1])
        try:
            reader = fetch.open_reader(self.store)
        except StoreUnavailable:
            # Verified, but it could not be stored and its file is gone: from upstream.
            ex.result = "MISS"
            return await self._send_direct(request, origin, name, fetch.digest, ex)
        self.maintenance.pin(fetch.digest)
        try:
            response, ex.sent = await stream_blob(
                request,
                reader,
                headers=self._blob_headers(fetch.digest, ex.result),
                size=fetch.size,
                byte_range=byte_range,
                executor=self.executor,
                available=available,
                on_prepared=ex.prepared,
                budget=self.send_budget,
                fallback=functools.partial(
                    self._continue_direct, origin, name, fetch.digest, request.headers
                ),
            )
        finally:
            reader.close()
            self.maintenance.unpin(fetch.digest)
        self.metrics.bytes.labels(source).inc(ex.sent)
        return response

    def _direct_headers(self, client_headers: Mapping[str, str]) -> dict[str, str]:
        keep = ("authorization", "user-agent")
        return {k: v for k, v in client_headers.items() if k.lower() in keep}

    async def _continue_direct(
        self,
        origin: Origin,
        name: str,
        digest: str,
        client_headers: Mapping[str, str],
        response: web.StreamResponse,
        offset: int,
        end: int | None,
    ) -> int:
        """Sends bytes offset..end of a blob straight from upstream (the store is full)."""
        headers = self._direct_headers(client_headers)
        headers["Range"] = f"bytes={offset}-{'' if end is None else end - 1}"
        path = f"/v2/{name}/blobs/{digest}"
        upstream = await self.upstream.request(
            "GET", origin, path, headers, follow_redirects=True, exact=True
        )
        try:
            if upstream.status not in (200, 206):
                raise FetchFailed(f"upstream answered {upstream.status} for the rest of {digest}")
            if codings(upstream.headers):
                # Byte offsets of a coded body are not the blob's: nothing to resume from.
                raise FetchFailed(
                    f"upstream sent the rest of {digest} with Content-Encoding "
                    f"{upstream.headers.get('Content-Encoding')}; it cannot be resumed"
                )
            skip = offset if upstream.status == 200 else 0  # Range ignored: skip ourselves
            remaining = None if end is None else end - offset
            sent = 0
            async for data in upstream.content.iter_chunked(CHUNK):
                if skip:
                    cut = min(skip, len(data))
                    data, skip = data[cut:], skip - cut
                if remaining is not None:
                    data = data[: remaining - sent]
                if data:
                    await response.write(data)
                    sent += len(data)
                if remaining is not None and sent >= remaining:
                    break
            return sent
        finally:
            upstream.release()

    async def _send_direct(
        self, request: web.BaseRequest, origin: Origin, name: str, digest: str, ex: Exchange
    ) -> web.StreamResponse:
        """The store cannot take the blob: the client gets it straight from upstream."""
        ex.note = "not stored: store unavailable"
        path = f"/v2/{name}/blobs/{digest}"
        headers = self._direct_headers(request.headers)
        if "Range" in request.headers:
            headers["Range"] = request.headers["Range"]
        upstream = await self.upstream.request(
            "GET", origin, path, headers, follow_redirects=True, exact=True, share=ex.share
        )
        try:
            if codings(upstream.headers) and upstream.status != 200:
                raise FetchFailed(
                    f"{origin.netloc} sent {digest} with Content-Encoding "
                    f"{upstream.headers.get('Content-Encoding')} for a range; it cannot be served"
                )
            try:
                decoder = decoder_for(upstream.headers)
            except ContentCodingError as e:
                raise FetchFailed(f"{origin.netloc} sent blob {digest}: {e}") from e
            response, ex.sent = await relay(request, upstream, "MISS", ex.prepared, decoder)
        finally:
            upstream.release()
        self.metrics.bytes.labels("upstream").inc(ex.sent)
        return response

    async def _fetch_blob(
        self,
        fetch: BlobFetch,
        origin: Origin,
        name: str,
        client_headers: Mapping[str, str],
        ex: Exchange,
    ) -> None:
        """Downloads one blob into the store, feeding every reader as bytes arrive."""
        loop = asyncio.get_running_loop()
        headers = self._direct_headers(client_headers)
        path = f"/v2/{name}/blobs/{fetch.digest}"
        writer = None
        writing: asyncio.Future[None] | None = None
        upstream: aiohttp.ClientResponse | None = None
        decoder: Decoder | None = None
        try:
            try:
                upstream = await self.upstream.request(
                    "GET", origin, path, headers, follow_redirects=True, exact=True, share=ex.share
                )
            except UPSTREAM_ERRORS as e:
                self.metrics.upstream_errors.inc()
                fetch.fail(f"upstream {origin.netloc} cannot be reached: {describe(e)}")
                return
            except UpstreamRefused as e:
                answer = error_response(e.status, e.code, e.message, "DENIED")
                assert isinstance(answer.body, bytes)
                fetch.refusal = Refusal(e.status, answer.headers, answer.body)
                self.inflight.release(fetch)
                fetch.refuse()
                return
            if upstream.status != 200:
                body = (await read_body(upstream, 64 << 10))[: 64 << 10]
                fetch.refusal = Refusal(upstream.status, _relayable(upstream.headers), body)
                self.inflight.release(fetch)
                fetch.refuse()
                return
            try:
                decoder = decoder_for(upstream.headers)
            except ContentCodingError as e:
                self.metrics.upstream_errors.inc()
                log.error("refusing blob %s from %s: %s", fetch.digest, origin.netloc, e)
                fetch.fail(f"{origin.netloc} sent blob {fetch.digest}: {e}")
                return
            # A coded body's length is not the blob's: that is known once it is decoded.
            size = upstream.content_length if decoder is None else None
            if size and size > self.config.max_size:
                # It could never stay: serve it through, and keep what is cached.
                log.info(
                    "%s (%d bytes) is larger than max_size: not stored",
                    fetch.digest,
                    size,
                )
                fetch.fail("larger than max_size: served through", StoreUnavailable)
                return
            try:
                if size:
                    # Evicting writes to the index and removes files: its errors are the
                    # store's (never upstream's), and the blob is then served through.
                    self.maintenance.make_room(size, self.inflight)
                writer = self.store.begin_write(fetch.digest)
            except STORE_ERRORS as e:
                raise _StoreError(e) from e
            fetch.begin(writer, size)
            # The disk write of one batch overlaps the network read of the next; writes
            # stay in order because each waits for the one before it.
            async for batch in _batches(upstream.content, decoder):
                await _written(writing)
                if writing is not None:
                    fetch.progressed()
                writing = loop.run_in_executor(self.executor, writer.write_chunks, batch)
            await _written(writing)
            if writing is not None:
                fetch.progressed()
            writing = None
            writer.verify(size)
            fetch.verify()  # readers take the last byte now, not after the disk flush
            # Storing a verified blob is a task of its own that a shutdown waits for: the
            # bytes are all here, and only the flush is left.
            storing = asyncio.ensure_future(self._store_verified(fetch, writer))
            self._storing.add(storing)
            storing.add_done_callback(self._storing.discard)
            await asyncio.shield(storing)
        except _StoreError as e:
            await _settled(writing)
            self._store_failed(fetch, writer, e.error)
        except DigestMismatch as e:
            self.metrics.upstream_errors.inc()
            log.error("refusing blob %s from %s: %s", fetch.digest, origin.netloc, e)
            fetch.fail(str(e))
        except ContentCodingError as e:
            self.metrics.upstream_errors.inc()
            await _abandoned(writing, writer)
            message = (
                f"{origin.netloc} sent blob {fetch.digest} with Content-Encoding "
                f"{decoder.description if decoder else '?'} that does not decode: {e}"
            )
            log.error("refusing blob: %s", message)
            fetch.fail(message)
        except (*UPSTREAM_ERRORS, aiohttp.ClientPayloadError) as e:
            self.metrics.upstream_errors.inc()
            await _abandoned(writing, writer)
            log.warning("fetching %s from %s failed: %s", fetch.digest, origin.netloc, describe(e))
            fetch.fail(f"download from {origin.netloc} broke: {describe(e)}")
        except asyncio.CancelledError:
            # The cache is stopping. A verified blob is still stored by its own task (which
            # close() waits for); readers of one that is not get an error, not a wait.
            if not fetch.verified:
                fetch.fail("the registry cache is stopping")
            raise
        except Exception as e:
            # Anything else (a Location that does not parse, a bug of ours): the fetch must
            # still end, or every client of this digest would wait for it until a restart.
            log.exception("fetching %s from %s failed", fetch.digest, origin.netloc)
            await _abandoned(writing, writer)
            fetch.fail(f"unexpected {type(e).__name__}; see the registry cache's log")
        finally:
            self.inflight.release(fetch)
            if upstream is not None:
                upstream.release()

    async def _store_verified(self, fetch: BlobFetch, writer: BlobWriter) -> None:
        """Flushes and renames a verified blob into the store and indexes it."""
        try:
            size = await asyncio.get_running_loop().run_in_executor(
                self.executor, writer.commit, writer.written
            )
        except OSError as e:
            self._store_failed(fetch, writer, e)
            return
        try:
            self.index.add_blob(fetch.digest, size)
            if fetch.source is not None:
                self.index.add_link(*fetch.source, fetch.digest)
        except sqlite3.Error as e:
            # A file the index does not know would be served but never counted toward
            # max_size nor evicted: it goes again, and the store and the index agree.
            self._unstore(fetch.digest)
            self._store_failed(fetch, None, e)
            return
        self.maintenance.store_ok()
        self.inflight.release(fetch)
        fetch.finish()
        try:
            self.maintenance.stored(fetch.digest, size)
        except STORE_ERRORS as e:
            # Stored and indexed; only the eviction after it failed, and the next stored
            # blob or the housekeeping tries again.
            self.maintenance.store_failed(e)

    def _unstore(self, digest: str) -> None:
        try:
            self.store.delete(digest)
        except OSError as e:
            # The start-up recount re-indexes the file (after checking its digest).
            log.error("%s stays in the store unindexed until restart: %s", digest, e)

    def _store_failed(self, fetch: BlobFetch, writer: BlobWriter | None, error: StoreError) -> None:
        """The blob cannot be stored: its file goes, and readers fetch it directly."""
        if writer is not None:
            writer.abort()
        self.maintenance.store_failed(error)
        fetch.fail(f"cannot store {fetch.digest}: {error}", StoreUnavailable)

    # --- background tasks ---------------------------------------------------------------

    def spawn(self, coroutine: Coroutine[Any, Any, None]) -> None:
        """Runs work that must outlive the request that started it (a shared download)."""
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Stops the downloads under way; blobs already verified are stored first."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._storing:
            await asyncio.wait(set(self._storing), timeout=STORE_ON_STOP_TIMEOUT)


async def _batches(
    stream: aiohttp.StreamReader, decoder: Decoder | None
) -> AsyncIterator[list[bytes]]:
    """A download as batches of up to about FETCH_BATCH bytes, as its chunks came (written
    with one writev, never joined: a copy of a GB costs a tenth of a second), decoded
    first when the registry sent it coded (pieces of a bounded size however well it
    compresses). Raises ContentCodingError when the coded body is corrupt or cut short."""
    while True:
        data = await stream.readany()
        if not data:
            break
        raw = [data]
        size = len(data)
        while size < FETCH_BATCH:
            more = stream.read_nowait(FETCH_BATCH - size)
            if not more:
                break
            raw.append(more)
            size += len(more)
        if decoder is None:
            yield raw
            continue
        batch: list[bytes] = []
        size = 0
        for chunk in raw:
            for piece in decoder.feed(chunk):
                batch.append(piece)
                size += len(piece)
                if size >= FETCH_BATCH:
                    yield batch
                    batch, size = [], 0
        if batch:
            yield batch
    if decoder is not None:
        decoder.finish()


async def _written(writing: asyncio.Future[None] | None) -> None:
    """Waits for a batch's disk write; its failure is the store's."""
    if writing is not None:
        try:
            await writing
        except OSError as e:
            raise _StoreError(e) from e


async def _settled(future: asyncio.Future[None] | None) -> None:
    if future is not None:
        with contextlib.suppress(Exception):
            await future


async def _abandoned(writing: asyncio.Future[None] | None, writer: BlobWriter | None) -> None:
    """A download given up: its file goes, once no write is still under way into it."""
    await _settled(writing)
    if writer is not None:
        writer.abort()


class _StoreError(Exception):
    """Writing to the store failed: not upstream's fault, and not the client's."""

    def __init__(self, error: StoreError) -> None:
        super().__init__(str(error))
        self.error = error


def _relayable(headers: Mapping[str, str]) -> dict[str, str]:
    keep = ("content-type", "www-authenticate", "docker-distribution-api-version")
    return {k: v for k, v in headers.items() if k.lower() in keep}


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

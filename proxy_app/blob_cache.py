"""The blob cache: blobs served from the content-addressed store, or fetched once.

A blob the store holds (and this registry and repository have: links.py) is a HIT. A
miss is fetched upstream once however many clients ask at the same time, streamed to
every waiting client while it is written, verified against its digest, then moved into
the store; a blob that fails verification is never stored, and its readers' connections
are cut so no client takes a damaged blob for a whole one (inflight.py). What the store
cannot take (a full disk) is served straight from upstream.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from typing import Any

import aiohttp
from aiohttp import web

from .blob_sources import BlobSource, SourceAnswer
from .blobs import BlobReader, BlobWriter, DigestMismatch
from .client_access import AccessRefused
from .content_coding import ContentCodingError, Decoder, codings, decoder_for
from .context import CacheContext
from .exchange import Exchange
from .inflight import BlobFetch, FetchFailed, InflightFetches, StoreUnavailable
from .keyed_locks import KeyedLocks
from .links import RepositoryLinks, refusal
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
from .routes import Route
from .store_maintenance import STORE_ERRORS, StoreError
from .upstream import UPSTREAM_ERRORS, Origin, UpstreamRefused, describe

log = logging.getLogger(__name__)

FETCH_BATCH = 1 << 20  # bytes of a download handed to the disk writer at a time
STORE_ON_STOP_TIMEOUT = 30.0
# The slowest average a blob download may keep after its first upstream_timeout: a real
# registry far behind it is as good as down, and a hostile one must not hold a fetch (and
# its connection, and the clients waiting on it) for ever.
FLOOR_RATE = 32 << 10  # seconds a stop waits for verified blobs to be flushed


class Refusal:
    """Upstream's non-200 answer to the request that started a fetch, kept to relay."""

    def __init__(self, status: int, headers: Mapping[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, dict(headers), body


# Relays the client's request upstream uncached: (request, origin, exchange, result).
PassThrough = Callable[[web.BaseRequest, Origin, Exchange, str], Awaitable[web.StreamResponse]]


class BlobCache:
    def __init__(
        self, ctx: CacheContext, links: RepositoryLinks, pass_through: PassThrough
    ) -> None:
        self.pass_through = pass_through  # a HEAD for a blob not held: upstream answers it
        self.config = ctx.config
        self.maintenance = ctx.maintenance
        self.store = ctx.store
        self.index = ctx.index
        self.upstream = ctx.upstream
        self.metrics = ctx.metrics
        self.executor = ctx.executor
        self.links = links
        self.inflight = InflightFetches(on_change=ctx.metrics.inflight.set)
        self.send_budget = SendBudget()
        self._tasks: set[asyncio.Task[None]] = set()
        self._storing: set[asyncio.Future[None]] = set()
        self._commits = KeyedLocks()  # a digest's move into the store, one at a time
        # Asked in order before the registry on a miss (a cluster's bucket and peers).
        self.sources: list[BlobSource] = []

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

    async def serve(
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
        fetch = self.inflight.verified(digest)
        if fetch is not None:
            # Fetched and verified, being flushed to disk: the bytes are here already.
            ex.result = "HIT"
            return await self._send_inflight(request, origin, route.name, fetch, ex, "cache")
        if request.method == "HEAD":
            return await self.pass_through(request, origin, ex, "MISS")
        ex.result = "MISS"
        while True:
            fetch, mine = self.inflight.claim(digest, origin.key)
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
        # Bytes from a cluster source (the bucket, a peer) are the cache's, not upstream's.
        source = "upstream" if fetch.from_source is None else "cache"
        if fetch.from_source is not None:
            ex.note = f"from {fetch.from_source}"
        return await self._send_inflight(
            request, origin, route.name, fetch, ex, source, shared=not mine
        )

    async def _unlinked(
        self, request: web.BaseRequest, origin: Origin, route: Route, ex: Exchange
    ) -> web.Response | None:
        """The registry's no when the cache holds (or is fetching) route's blob for another
        registry or repository and this one does not have it; None when it may be served."""
        digest = route.reference
        if self.links.get(origin, route.name, digest) is not None:
            return None
        held = self.store.size(digest) is not None or self.inflight.verified(digest) is not None
        fetch = self.inflight.get(digest, origin.key)
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
        self.metrics.sent(ex.host, "cache", ex.sent, ex.repository)
        return response

    async def _send_inflight(
        self,
        request: web.BaseRequest,
        origin: Origin,
        name: str,
        fetch: BlobFetch,
        ex: Exchange,
        source: str = "upstream",
        shared: bool = False,
    ) -> web.StreamResponse:
        """Sends a blob as its fetch writes it. `source` cache: it is verified already;
        `shared`: another request started the download, so upstream sent these bytes once
        for several clients (counted as saved)."""
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
        self.metrics.sent(ex.host, source, ex.sent, ex.repository)
        if shared and source != "cache":
            self.metrics.saved(ex.host, ex.sent)
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
        self.metrics.sent(ex.host, "upstream", ex.sent, ex.repository)
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
        began = loop.time()
        headers = self._direct_headers(client_headers)
        path = f"/v2/{name}/blobs/{fetch.digest}"
        writer = None
        writing: asyncio.Future[None] | None = None
        upstream: SourceAnswer | aiohttp.ClientResponse | None = None
        decoder: Decoder | None = None
        source: BlobSource | None = None  # the one of self.sources the bytes come from
        from_source = False  # the bytes come from `source` still, not from the registry
        resumed = False  # a source broke off once already (the next break: the registry)
        try:
            try:
                found = await self._from_sources(fetch, origin, name)
                if found is not None:
                    source, upstream = found
                    from_source = True
                else:
                    upstream = await self.upstream.request(
                        "GET",
                        origin,
                        path,
                        headers,
                        follow_redirects=True,
                        exact=True,
                        share=ex.share,
                    )
            except UPSTREAM_ERRORS as e:
                fetch.fail(f"upstream {origin.netloc} cannot be reached: {describe(e)}")
                self._upstream_failed(origin, fetch)
                return
            except UpstreamRefused as e:
                answer = error_response(e.status, e.code, e.message, "DENIED")
                assert isinstance(answer.body, bytes)
                fetch.refusal = Refusal(e.status, answer.headers, answer.body)
                self.inflight.release(fetch)
                fetch.refuse()
                return
            if upstream.status != 200:
                # only the registry's answer can be a refusal: sources give 200s or None
                assert isinstance(upstream, aiohttp.ClientResponse)
                body = (await read_body(upstream, 64 << 10))[: 64 << 10]
                fetch.refusal = Refusal(upstream.status, _relayable(upstream.headers), body)
                self.inflight.release(fetch)
                fetch.refuse()
                return
            try:
                decoder = decoder_for(upstream.headers)
            except ContentCodingError as e:
                log.error("refusing blob %s from %s: %s", fetch.digest, origin.netloc, e)
                fetch.fail(f"{origin.netloc} sent blob {fetch.digest}: {e}")
                self._upstream_failed(origin, fetch)
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
            skip = 0  # bytes of the answer that the store has already
            while True:
                try:
                    # The disk write of one batch overlaps the network read of the next;
                    # writes stay in order because each waits for the one before it.
                    batches = _batches(
                        upstream.content, decoder, _Pace(self.config.upstream_timeout)
                    )
                    async for batch in _skipping(batches, skip):
                        await _written(writing)
                        if writing is not None:
                            fetch.progressed()
                        if writer.written + sum(map(len, batch)) > self.config.max_size:
                            # A blob without a length (chunked, or coded) that has outgrown
                            # the whole cache: no client can be given it whole from here,
                            # and the disk is not its to fill.
                            raise _TooLarge(self.config.max_size)
                        writing = loop.run_in_executor(self.executor, writer.write_chunks, batch)
                    break
                except (*UPSTREAM_ERRORS, aiohttp.ClientPayloadError, _TooSlow) as e:
                    if not from_source:
                        raise
                    # A source (a peer that died, a bucket) broke off: the rest comes from
                    # where the source says (a peer: the next owner, once) or from the
                    # registry, after the bytes written so far; the digest checks them all.
                    await _written(writing)
                    writing = None
                    fetch.progressed()
                    upstream.release()
                    assert source is not None
                    instead = None if resumed else await self._instead(source, fetch, origin, name)
                    resumed = True
                    log.warning(
                        "%s broke off after %d bytes (%s): the rest from %s",
                        fetch.digest,
                        writer.written,
                        describe(e),
                        origin.netloc if instead is None else instead[0].name,
                    )
                    if instead is not None:
                        # It sends the whole blob: the bytes written so far are skipped.
                        source, upstream = instead
                        fetch.from_source = source.name
                        decoder, skip = None, writer.written
                        continue
                    from_source = False
                    fetch.from_source = None  # this node fetched it after all: it uploads it
                    rest = await self._rest(origin, path, headers, writer.written)
                    upstream, decoder, skip = rest
            await _written(writing)
            if writing is not None:
                fetch.progressed()
            writing = None
            writer.verify(size)
            fetch.verify()  # readers take the last byte now, not after the disk flush
            if fetch.from_source is None:
                self.metrics.fetched(origin.netloc, loop.time() - began)
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
            if source is not None:
                # Its bytes, all or the first of them, were wrong: the clients' next try
                # must not be given them again.
                log.error("refusing blob %s from %s: %s", fetch.digest, source.name, e)
                fetch.fail(f"{source.name} sent wrong bytes for {fetch.digest}; try again")
                source.refute(fetch.digest)
            else:
                log.error("refusing blob %s from %s: %s", fetch.digest, origin.netloc, e)
                fetch.fail(str(e))
                self._upstream_failed(origin, fetch)
        except (_TooSlow, _TooLarge, ContentCodingError) as e:
            await _abandoned(writing, writer)
            message = f"{origin.netloc} sent blob {fetch.digest} {_refused_because(e, decoder)}"
            log.warning("refusing blob: %s", message)
            fetch.fail(message)
            self._upstream_failed(origin, fetch)
        except (*UPSTREAM_ERRORS, aiohttp.ClientPayloadError, UpstreamRefused) as e:
            await _abandoned(writing, writer)
            log.warning("fetching %s from %s failed: %s", fetch.digest, origin.netloc, describe(e))
            fetch.fail(f"download from {origin.netloc} broke: {describe(e)}")
            self._upstream_failed(origin, fetch)
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

    async def _from_sources(
        self, fetch: BlobFetch, origin: Origin, name: str
    ) -> tuple[BlobSource, SourceAnswer] | None:
        """The first of the cluster's sources (blob_sources.py) that has the blob, else
        None: then the registry is asked."""
        for source in self.sources:
            try:
                answer = await source.open(fetch.digest, origin, name)
            except Exception as e:  # a source is only a shortcut: the registry remains
                log.warning("%s could not give %s: %s", source.name, fetch.digest, describe(e))
                continue
            if answer is None:
                continue
            if answer.status == 200:
                fetch.from_source = source.name
                return source, answer
            answer.release()
        return None

    async def _instead(
        self, broken: BlobSource, fetch: BlobFetch, origin: Origin, name: str
    ) -> tuple[BlobSource, SourceAnswer] | None:
        """Where the rest of a blob whose source broke off comes from, other than the
        registry: the source's own answer for that (a peer: the next owner), or None."""
        try:
            answer = await broken.instead(fetch.digest, origin, name)
        except Exception as e:  # a source is only a shortcut: the registry remains
            log.warning("%s could not go on with %s: %s", broken.name, fetch.digest, describe(e))
            return None
        if answer is None:
            return None
        if answer.status != 200:
            answer.release()
            return None
        return broken, answer

    async def _rest(
        self, origin: Origin, path: str, headers: Mapping[str, str], offset: int
    ) -> tuple[aiohttp.ClientResponse, Decoder | None, int]:
        """The registry's answer for a blob from byte `offset` on (a source broke off
        there): its response, decoder, and how many of its bytes to skip (all before
        `offset`, when it sends the whole blob: it ignored the Range, or coded it)."""
        asked = {**headers, "Range": f"bytes={offset}-"} if offset else headers
        answer = await self.upstream.request(
            "GET", origin, path, asked, follow_redirects=True, exact=True
        )
        ranged = answer.status == 206 and not codings(answer.headers)
        start = answer.headers.get("Content-Range", "").removeprefix("bytes ").split("-")[0]
        if not (answer.status == 200 or (ranged and start == str(offset))):
            answer.release()
            raise UpstreamRefused(
                502, "UNAVAILABLE", f"{origin.netloc} answered {answer.status} for the rest"
            )
        try:
            decoder = decoder_for(answer.headers)
        except ContentCodingError:
            answer.release()
            raise
        return answer, decoder, 0 if ranged else offset

    def _upstream_failed(self, origin: Origin, fetch: BlobFetch) -> None:
        """Counts a failed download (after fetch.fail) as the registry's error."""
        name = fetch.source[1] if fetch.source else fetch.digest
        self.metrics.upstream_error(origin.netloc, str(fetch.error), name)

    async def _store_verified(self, fetch: BlobFetch, writer: BlobWriter) -> None:
        """Flushes and renames a verified blob into the store and indexes it."""
        # Two registries' fetches of one digest may both finish: one is stored, and the
        # other, the same bytes, only linked (never counted twice toward max_size).
        async with self._commits.hold(fetch.digest):
            if self.store.size(fetch.digest) is not None and self.index.blob(fetch.digest):
                writer.abort()
                self._link_source(fetch)
                self.inflight.release(fetch)
                fetch.finish()
                return
            await self._commit(fetch, writer)

    def _link_source(self, fetch: BlobFetch) -> None:
        if fetch.source is not None:
            try:
                self.index.add_link(*fetch.source, fetch.digest)
            except sqlite3.Error as e:
                self.maintenance.store_failed(e)  # confirmed again on its next use

    async def _commit(self, fetch: BlobFetch, writer: BlobWriter) -> None:
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
            self.maintenance.stored(fetch.digest, size, source=fetch.from_source)
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


class _Pace:
    """How late a download's bytes may come: after a grace of upstream_timeout, at least
    FLOOR_RATE on average. So a blob's total time is bounded by its size, and a registry
    that trickles (one byte every two minutes keeps a connection alive) is given up on."""

    def __init__(self, grace: float) -> None:
        self.start = asyncio.get_running_loop().time()
        self.grace = grace
        self.received = 0

    def deadline(self) -> float:
        """When more than the bytes received so far must have come."""
        return self.start + self.grace + (self.received + 1) / FLOOR_RATE


async def _batches(
    stream: aiohttp.StreamReader, decoder: Decoder | None, pace: _Pace
) -> AsyncIterator[list[bytes]]:
    """A download as batches of up to about FETCH_BATCH bytes, as its chunks came (written
    with one writev, never joined: a copy of a GB costs a tenth of a second), decoded
    first when the registry sent it coded (pieces of a bounded size however well it
    compresses). Raises ContentCodingError when the coded body is corrupt or cut short,
    and _TooSlow when the registry falls behind the pace."""
    while True:
        # What has arrived is taken at once; only a wait for more is timed (a timer per
        # read would cost a fast download a few per cent of its CPU).
        data = stream.read_nowait(FETCH_BATCH)
        if not data:
            if stream.at_eof():
                break
            try:
                async with asyncio.timeout_at(pace.deadline()):
                    data = await stream.readany()
            except TimeoutError as e:
                raise _TooSlow(pace.received) from e
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
        pace.received += size
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


async def _skipping(batches: AsyncIterator[list[bytes]], skip: int) -> AsyncIterator[list[bytes]]:
    """The batches less their first `skip` bytes (those the store has already)."""
    async for batch in batches:
        while skip and batch:
            if len(batch[0]) <= skip:
                skip -= len(batch.pop(0))
            else:
                batch[0], skip = batch[0][skip:], 0
        if batch:
            yield batch


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


def _refused_because(error: Exception, decoder: Decoder | None) -> str:
    """Why a download was given up, said after "<registry> sent blob <digest>"."""
    if isinstance(error, _TooSlow):
        return (
            f"too slowly ({error.received} bytes; the cache waits upstream_timeout, then "
            f"wants {FLOOR_RATE >> 10} KiB/s): given up"
        )
    if isinstance(error, _TooLarge):
        return f"without a length, and past max_size ({error.limit} bytes): refused, nothing stored"
    coding = decoder.description if decoder else "?"
    return f"with Content-Encoding {coding} that does not decode: {error}"


class _TooSlow(Exception):
    def __init__(self, received: int) -> None:
        super().__init__(f"fell behind after {received} bytes")
        self.received = received


class _TooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"more than {limit} bytes")
        self.limit = limit


class _StoreError(Exception):
    """Writing to the store failed: not upstream's fault, and not the client's."""

    def __init__(self, error: StoreError) -> None:
        super().__init__(str(error))
        self.error = error


def _relayable(headers: Mapping[str, str]) -> dict[str, str]:
    keep = ("content-type", "www-authenticate", "docker-distribution-api-version")
    return {k: v for k, v in headers.items() if k.lower() in keep}

"""Manifests: immutable by digest, and tags' answers (trust, revalidation, stale_if_error).

A manifest's bytes are kept in the blob store under their digest, its media type in
the index. A tag's answer is kept per Accept variant (a client asking for OCI indexes
and one asking for Docker schema 2 may get different manifests for the same tag). It
is trusted for the time tag_policy.py gives its tag (the first of `tag_rules` that
matches, else `tag_ttl`); after that an upstream HEAD revalidates it (Docker Hub does
not count a HEAD against the pull limit), and when upstream fails the cached answer
is served as STALE for up to `stale_if_error`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import sqlite3
import time

import aiohttp
from aiohttp import web

from .client_access import AccessRefused
from .content_coding import ContentCodingError, decode_body
from .context import CacheContext
from .exchange import Exchange
from .index import TagEntry
from .keyed_locks import KeyedLocks, TurnTimeout
from .links import RepositoryLinks, refusal
from .media_types import DOCKER_MANIFEST, INDEX_TYPES, SCHEMA1_TYPES, STORED_MANIFEST_TYPES
from .responses import API_VERSION, CACHE_HEADER, error_response, read_body, relay
from .routes import SHA256, Route
from .shared_store import BucketUnavailable, SharedStore
from .tag_policy import TagPolicy
from .upstream import UPSTREAM_ERRORS, Origin, describe

log = logging.getLogger(__name__)

# distribution refuses manifests over 4 MiB; anything larger is not a manifest.
MAX_MANIFEST_SIZE = 4 << 20
# An index's manifests taken from the bucket with it (one per platform; real ones list
# a few dozen at most).
MAX_SHARED_CHILDREN = 64
DEFAULT_MEDIA_TYPE = DOCKER_MANIFEST  # what a registry means when it names none


class UpstreamAnswerInvalid(Exception):
    pass


def accept_variant(values: list[str]) -> str:
    """The set of media types a client accepts, normalised (order and q-values dropped)."""
    types = {
        part.split(";", 1)[0].strip().lower()
        for value in values
        for part in value.split(",")
        if part.strip()
    }
    return ",".join(sorted(types))


def _reusable(media_type: str, got_by: set[str], accepted: set[str]) -> bool:
    """Whether a tag's answer of `media_type`, given to a client accepting `got_by`, is
    what the registry gives a client accepting `accepted` too.

    An index is stored, and given as it is to every client that accepts its type. An image
    manifest may instead be what the registry picked out of an index (the linux/amd64 one,
    for an old client accepting no index type) or rewrote from schema 2 into schema 1. It
    is this client's answer too only when the first client also accepted every such source
    type this client accepts: had the tag stored one of those, the first client would have
    got it as it is, and this client gets the same conversion as the first."""
    if media_type not in accepted:
        return False
    if media_type in INDEX_TYPES:
        return True
    sources = INDEX_TYPES | {DOCKER_MANIFEST} if media_type in SCHEMA1_TYPES else INDEX_TYPES
    return accepted & sources <= got_by


def _upstream_failed(status: int) -> bool:
    return status >= 500 or status == 429


def _fitting(variants: dict[str, TagEntry], variant: str) -> TagEntry | None:
    """The answer among a tag's `variants` that fits a client's Accept list (`variant`).

    A registry returns a tag's stored manifest as it is whenever the client accepts its
    media type, and converts or picks another only when it does not. So an answer that
    another client got (a `prefetch`, another Docker version) is the right one for this
    client too when it cannot be such a conversion for this client (_reusable)."""
    if variant in variants:
        return variants[variant]
    accepted = set(variant.split(",")) if variant else set()
    fitting = [
        e
        for got_by, e in variants.items()
        if _reusable(e.media_type, set(got_by.split(",")) if got_by else set(), accepted)
    ]
    return max(fitting, key=lambda e: e.checked_at, default=None)


class ManifestCache:
    def __init__(self, ctx: CacheContext, links: RepositoryLinks) -> None:
        self._locks = KeyedLocks()
        self.links = links
        self.config = ctx.config
        self.store = ctx.store
        self.index = ctx.index
        self.upstream = ctx.upstream
        self.metrics = ctx.metrics
        self.executor = ctx.executor
        self.on_store_error = ctx.maintenance.store_failed
        self.on_stored = ctx.maintenance.announce
        # The cluster's bucket (shared_store.py): tag answers go there too, and a node
        # that has none for a tag while upstream fails asks it for another node's.
        self.shared: SharedStore | None = None
        self._tag_writes: set[asyncio.Task[None]] = set()
        self.tag_policy = TagPolicy(ctx.config.tag_rules, ctx.config.tag_ttl)

    # --- answers ------------------------------------------------------------------------

    def _cached_body(self, digest: str) -> bytes | None:
        """A stored manifest's bytes (its media type is each registry's own: the link's or
        the tag answer's)."""
        entry = self.index.blob(digest)
        if entry is None or entry.media_type is None:
            return None
        try:
            reader = self.store.open(digest)
        except FileNotFoundError:
            return None
        try:
            body = reader.pread(entry.size + 1, 0)
        finally:
            reader.close()
        if len(body) != entry.size:
            return None
        self.index.touch(digest)
        return body

    def _answer(
        self, request: web.BaseRequest, body: bytes, media_type: str, digest: str, ex: Exchange
    ) -> web.Response:
        ex.sent = 0 if request.method == "HEAD" else len(body)
        source = "upstream" if ex.result == "MISS" else "cache"
        self.metrics.sent(ex.host, source, ex.sent, ex.repository)
        return web.Response(
            body=body,
            headers={
                "Content-Type": media_type,
                "Docker-Content-Digest": digest,
                "Etag": f'"{digest}"',
                CACHE_HEADER: ex.result,
                **API_VERSION,
            },
        )

    async def _store(self, digest: str, body: bytes, media_type: str) -> bool:
        """Stores a manifest; False when the store cannot take it (the answer still goes out)."""
        known = self.index.blob(digest)
        if known is not None and known.size == len(body) and self.store.size(digest) == len(body):
            # Another tag, Accept variant or registry names it: stored already.
            if known.media_type is not None:
                return True
            try:  # stored as a blob (asked for under /blobs/): now known as a manifest
                self.index.add_blob(digest, len(body), media_type)
            except sqlite3.Error as e:
                self.on_store_error(e)
                return False
            return True

        def write() -> int:
            writer = self.store.begin_write(digest)
            try:
                writer.write(body)
            except BaseException:
                writer.abort()
                raise
            return writer.commit(len(body))

        try:
            size = await asyncio.get_running_loop().run_in_executor(self.executor, write)
        except OSError as e:
            self.on_store_error(e)
            return False
        try:
            self.index.add_blob(digest, size, media_type)
        except sqlite3.Error as e:
            # Not indexed, so not kept either: a file the index does not know is never
            # counted toward max_size nor evicted. The answer still goes to the client.
            if known is None:
                with contextlib.suppress(OSError):
                    self.store.delete(digest)
            self.on_store_error(e)
            return False
        self.on_stored(digest)
        return True

    async def _read_manifest(self, upstream: aiohttp.ClientResponse) -> tuple[bytes, str, str]:
        if (upstream.content_length or 0) > MAX_MANIFEST_SIZE:
            raise UpstreamAnswerInvalid(f"manifest of {upstream.content_length} bytes is too large")
        body = await read_body(upstream, MAX_MANIFEST_SIZE)
        if len(body) > MAX_MANIFEST_SIZE:
            raise UpstreamAnswerInvalid("manifest larger than 4 MiB")
        if upstream.content_length is not None and len(body) != upstream.content_length:
            raise UpstreamAnswerInvalid("manifest body shorter than its Content-Length")
        try:
            # Asked for as identity; a front end that compressed it anyway is undone here,
            # so the digest is taken of (and the store keeps) the document itself.
            body = decode_body(body, upstream.headers, MAX_MANIFEST_SIZE)
        except ContentCodingError as e:
            raise UpstreamAnswerInvalid(f"manifest cannot be decoded: {e}") from e
        media_type = upstream.headers.get("Content-Type", DEFAULT_MEDIA_TYPE).split(";")[0].strip()
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        claimed = upstream.headers.get("Docker-Content-Digest")
        if claimed and claimed.startswith("sha256:") and claimed != digest:
            raise UpstreamAnswerInvalid(f"manifest hashes to {digest}, upstream claims {claimed}")
        return body, media_type, digest

    def _invalid(self, origin: Origin, error: Exception, ex: Exchange) -> web.Response:
        ex.note = str(error)
        self.metrics.upstream_error(origin.netloc, f"bad manifest: {error}", ex.what)
        log.error("refusing manifest from %s: %s", origin.netloc, error)
        return error_response(
            502,
            "MANIFEST_INVALID",
            f"upstream {origin.netloc} sent a bad manifest: {error}",
            ex.result,
        )

    def _deadline(self) -> float:
        return asyncio.get_running_loop().time() + self.config.upstream_timeout

    async def _get(
        self,
        request: web.BaseRequest,
        origin: Origin,
        ex: Exchange,
        deadline: float,
        method: str = "GET",
    ) -> aiohttp.ClientResponse:
        """The manifest as the registry has it (exact bytes), its head before `deadline`."""
        response = await self.upstream.request(
            method,
            origin,
            ex.path,
            request.headers,
            follow_redirects=True,
            exact=True,
            share=ex.share,
            deadline=deadline,
        )
        self.metrics.dockerhub_answer(origin.host, response.headers)
        return response

    async def _relay(
        self,
        request: web.BaseRequest,
        upstream: aiohttp.ClientResponse,
        ex: Exchange,
        deadline: float,
    ) -> web.StreamResponse:
        """Upstream's refusal, relayed as it is (its body too must come before `deadline`)."""
        async with asyncio.timeout_at(deadline):
            response, ex.sent = await relay(request, upstream, "MISS", ex.prepared)
        self.metrics.sent(ex.host, "upstream", ex.sent, ex.repository)
        return response

    def _count_pull(
        self, request: web.BaseRequest, origin: Origin, route: Route, response: web.StreamResponse
    ) -> web.StreamResponse:
        """A manifest a client got (GET, 200) counts as a pull of it there (`ls`)."""
        digest = response.headers.get("Docker-Content-Digest")
        if request.method == "GET" and response.status == 200 and digest:
            self.index.count_pull(origin.key, route.name, digest)
        return response

    # --- by digest ----------------------------------------------------------------------

    async def by_digest(
        self, request: web.BaseRequest, origin: Origin, route: Route, ex: Exchange
    ) -> web.StreamResponse:
        response = await self._by_digest(request, origin, route, ex)
        return self._count_pull(request, origin, route, response)

    async def _by_digest(
        self, request: web.BaseRequest, origin: Origin, route: Route, ex: Exchange
    ) -> web.StreamResponse:
        deadline = self._deadline()
        served = await self._from_store(request, origin, route, ex, deadline)
        if served is not None:
            return served
        # Many clients asking at once for a manifest not yet cached here: one goes upstream,
        # the others find it stored when their turn comes. Every wait, for the turn and for
        # upstream, ends at the deadline: a slow registry holds nobody longer.
        async with self._locks.hold(("digest", origin.key, route.name, route.reference), deadline):
            # Stored or linked by the request before us? Asked upstream already, if at all.
            served = await self._from_store(request, origin, route, ex, deadline, confirm=False)
            if served is not None:
                return served
            return await self._digest_from_upstream(request, origin, route, ex, deadline)

    async def _from_store(
        self,
        request: web.BaseRequest,
        origin: Origin,
        route: Route,
        ex: Exchange,
        deadline: float,
        confirm: bool = True,
    ) -> web.Response | None:
        """The stored manifest as this registry labels it, where this repository has it
        (asked, with `confirm`, when it is stored for another); the registry's no as it
        gave it; None when it must come from upstream."""
        body = self._cached_body(route.reference)
        if body is None:
            return None
        link = self.links.get(origin, route.name, route.reference)
        if confirm and (link is None or link.media_type is None):
            answer = await self.links.confirm(origin, route, request.headers, ex.share, deadline)
            if isinstance(answer, AccessRefused):
                return refusal(answer, origin, route, ex)
            link = answer
        if link is None or link.media_type is None:
            return None  # the registry has it, labelled as no manifest: see what it sends
        ex.result = "HIT"
        return self._answer(request, body, link.media_type, route.reference, ex)

    async def _digest_from_upstream(
        self,
        request: web.BaseRequest,
        origin: Origin,
        route: Route,
        ex: Exchange,
        deadline: float,
    ) -> web.StreamResponse:
        ex.result = "MISS"
        upstream = await self._get(request, origin, ex, deadline)
        try:
            if upstream.status != 200:
                return await self._relay(request, upstream, ex, deadline)
            try:
                async with asyncio.timeout_at(deadline):
                    body, media_type, digest = await self._read_manifest(upstream)
                if digest != route.reference:
                    raise UpstreamAnswerInvalid(
                        f"manifest hashes to {digest}, not {route.reference}"
                    )
            except UpstreamAnswerInvalid as e:
                return self._invalid(origin, e, ex)
        finally:
            upstream.release()
        await self._keep(origin, route.name, digest, body, media_type, ex)
        return self._answer(request, body, media_type, digest, ex)

    async def _keep(
        self, origin: Origin, name: str, digest: str, body: bytes, media_type: str, ex: Exchange
    ) -> bool:
        """Stores a manifest fetched from name at origin and links it there; a body
        labelled as no manifest goes to its own client only (False)."""
        if media_type not in STORED_MANIFEST_TYPES:
            ex.note = f"not stored: {media_type[:60]} is not a manifest type"
            return False
        if not await self._store(digest, body, media_type):
            return False
        try:
            self.links.add(origin, name, digest, media_type)
        except sqlite3.Error as e:
            self.on_store_error(e)
            return False
        return True

    # --- by tag -------------------------------------------------------------------------

    async def by_tag(
        self, request: web.BaseRequest, origin: Origin, route: Route, ex: Exchange
    ) -> web.StreamResponse:
        response = await self._by_tag(request, origin, route, ex)
        return self._count_pull(request, origin, route, response)

    async def _by_tag(
        self, request: web.BaseRequest, origin: Origin, route: Route, ex: Exchange
    ) -> web.StreamResponse:
        variant = accept_variant(request.headers.getall("Accept", []))
        key = (origin.netloc, route.name, route.reference, variant)
        fresh = self._fresh_tag(request, key, variant, ex)
        if fresh is not None:
            return fresh
        # One upstream request per tag at a time: the clients of a fleet asking at once
        # wait for it and then find the answer fresh. Nobody waits past the deadline, for
        # the turn or for upstream: then the stale answer, if any, or a 504.
        deadline = self._deadline()
        try:
            async with self._locks.hold(key, deadline):
                fresh = self._fresh_tag(request, key, variant, ex)
                if fresh is not None:
                    return fresh
                return await self._tag_from_upstream(
                    request, origin, route, key, variant, ex, deadline
                )
        except TurnTimeout as e:
            entry = self._tag_entry(key, variant)
            cached = self._cached_body(entry.digest) if entry else None
            if entry is None or cached is None:
                raise
            if time.time() - entry.checked_at >= self.config.stale_if_error:
                raise
            return self._stale(request, origin, entry, cached, e, ex)

    def _fresh_tag(
        self, request: web.BaseRequest, key: tuple[str, str, str, str], variant: str, ex: Exchange
    ) -> web.Response | None:
        entry = self._tag_entry(key, variant)
        if entry is None or time.time() - entry.checked_at >= self.tag_policy.ttl_for(*key[:3]):
            return None
        cached = self._cached_body(entry.digest)
        if cached is None:
            return None
        ex.result = "HIT"
        return self._answer(request, cached, entry.media_type, entry.digest, ex)

    async def _tag_from_upstream(
        self,
        request: web.BaseRequest,
        origin: Origin,
        route: Route,
        key: tuple[str, str, str, str],
        variant: str,
        ex: Exchange,
        deadline: float,
    ) -> web.StreamResponse:
        """A tag whose cached answer is missing or older than its tag policy allows."""
        entry = self._tag_entry(key, variant)
        cached = self._cached_body(entry.digest) if entry else None
        age = time.time() - entry.checked_at if entry else 0.0
        stale_ok = cached is not None and age < self.config.stale_if_error

        if entry is not None and cached is not None:
            revalidated = await self._revalidate(request, origin, entry, stale_ok, ex, deadline)
            if revalidated is not None:
                if ex.result == "HIT":  # a STALE answer must not restart the clock
                    self._set_tag(key, entry.digest, entry.media_type)
                return self._answer(request, cached, entry.media_type, entry.digest, ex)

        ex.result = "MISS"
        try:
            upstream = await self._get(request, origin, ex, deadline)
        except UPSTREAM_ERRORS as e:
            if stale_ok and entry is not None and cached is not None:
                return self._stale(request, origin, entry, cached, e, ex)
            shared = await self._shared_stale(request, origin, route, key, variant, e, ex)
            if shared is not None:
                return shared
            raise
        try:
            if upstream.status != 200:
                if (
                    stale_ok
                    and entry is not None
                    and cached is not None
                    and _upstream_failed(upstream.status)
                ):
                    return self._stale(request, origin, entry, cached, upstream.status, ex)
                if _upstream_failed(upstream.status):
                    shared = await self._shared_stale(
                        request, origin, route, key, variant, upstream.status, ex
                    )
                    if shared is not None:
                        return shared
                if upstream.status == 404 and entry is not None:
                    self.index.drop_tag(*key)
                return await self._relay(request, upstream, ex, deadline)
            try:
                async with asyncio.timeout_at(deadline):
                    body, media_type, digest = await self._read_manifest(upstream)
            except UpstreamAnswerInvalid as e:
                return self._invalid(origin, e, ex)
            except TimeoutError as e:
                if stale_ok and entry is not None and cached is not None:
                    return self._stale(request, origin, entry, cached, e, ex)
                raise
        finally:
            upstream.release()
        if await self._keep(origin, route.name, digest, body, media_type, ex):
            self._set_tag(key, digest, media_type)
        return self._answer(request, body, media_type, digest, ex)

    def _tag_entry(self, key: tuple[str, str, str, str], variant: str) -> TagEntry | None:
        """The cached answer for this tag that fits the client's Accept list."""
        return _fitting(self.index.tag_variants(*key[:3]), variant)

    # --- tags in the cluster's bucket ---------------------------------------------------

    def _set_tag(self, key: tuple[str, str, str, str], digest: str, media_type: str) -> None:
        """Records a tag's answer as checked now, here and (in the background, no client
        waits for it) in the cluster's bucket."""
        self.index.set_tag(*key, digest, media_type)
        if self.shared is None:
            return
        entry = TagEntry(digest, media_type, time.time())
        task = asyncio.get_running_loop().create_task(self._put_shared_tag(key, entry))
        self._tag_writes.add(task)
        task.add_done_callback(self._tag_writes.discard)

    async def _put_shared_tag(self, key: tuple[str, str, str, str], entry: TagEntry) -> None:
        assert self.shared is not None
        # The bucket's failure is its own, logged and shown by /healthz once.
        with contextlib.suppress(BucketUnavailable):
            await self.shared.put_tag(*key, entry)

    async def _shared_stale(
        self,
        request: web.BaseRequest,
        origin: Origin,
        route: Route,
        key: tuple[str, str, str, str],
        variant: str,
        cause: object,
        ex: Exchange,
    ) -> web.Response | None:
        """Upstream fails and this node has no answer for the tag it may serve: another
        node's from the bucket (within stale_if_error of its check), stored here, as
        STALE; None when the bucket has none."""
        if self.shared is None or not self.shared.available:
            return None
        try:
            entry = _fitting(await self.shared.tag_variants(*key[:3]), variant)
            if entry is None or time.time() - entry.checked_at >= self.config.stale_if_error:
                return None
            body = self._cached_body(entry.digest)
            if body is None:
                body = await self.shared.read_small(entry.digest, MAX_MANIFEST_SIZE)
        except BucketUnavailable:
            return None
        if body is None:
            return None
        if await self._keep(origin, route.name, entry.digest, body, entry.media_type, ex):
            # Stored with the other node's check time: stale_if_error counts from there.
            self.index.set_tag(*key, entry.digest, entry.media_type, entry.checked_at)
            if entry.media_type in INDEX_TYPES:
                await self._keep_shared_children(origin, route.name, body, ex)
        response = self._stale(request, origin, entry, body, cause, ex)
        ex.note += " (tag answer from the shared store)"
        return response

    async def _keep_shared_children(
        self, origin: Origin, name: str, index: bytes, ex: Exchange
    ) -> None:
        """The manifests an index from the bucket names, from the bucket too, linked in
        this repository: its clients ask for one by digest next, and upstream is down.
        Only what this repository's own tag answer names is linked, so no other
        repository's manifest becomes readable here."""
        assert self.shared is not None
        try:
            document = json.loads(index)
        except ValueError:
            return
        entries = document.get("manifests") if isinstance(document, dict) else None
        for child in (entries if isinstance(entries, list) else [])[:MAX_SHARED_CHILDREN]:
            if not isinstance(child, dict):
                continue
            digest, media_type = child.get("digest"), child.get("mediaType")
            if not (isinstance(digest, str) and SHA256.fullmatch(digest)):
                continue
            if media_type not in STORED_MANIFEST_TYPES:
                continue
            try:
                body = self._cached_body(digest) or await self.shared.read_small(
                    digest, MAX_MANIFEST_SIZE
                )
            except BucketUnavailable:
                return
            if body is not None:
                await self._keep(origin, name, digest, body, str(media_type), ex)

    async def shared_knows_host(self, host: str) -> bool:
        """Whether the cluster's bucket holds tag answers of a registry (any node's)."""
        if self.shared is None or not self.shared.available:
            return False
        try:
            return await self.shared.knows_host(host)
        except BucketUnavailable:
            return False

    async def close(self) -> None:
        if self._tag_writes:
            await asyncio.wait(set(self._tag_writes), timeout=5)

    async def _revalidate(
        self,
        request: web.BaseRequest,
        origin: Origin,
        entry: TagEntry,
        stale_ok: bool,
        ex: Exchange,
        deadline: float,
    ) -> bool | None:
        """True when upstream still names the cached digest (or is down and the cached
        answer may be served stale); None when the tag must be fetched anew."""
        try:
            head = await self._get(request, origin, ex, deadline, "HEAD")
        except UPSTREAM_ERRORS as e:
            self.metrics.upstream_error(origin.netloc, f"unreachable: {describe(e)}", ex.what)
            if stale_ok:
                ex.result, ex.note = "STALE", f"upstream unreachable: {describe(e)}"
                return True
            return None
        try:
            if head.status == 200 and head.headers.get("Docker-Content-Digest") == entry.digest:
                ex.result = "HIT"
                ex.note = "revalidated"
                return True
            if stale_ok and _upstream_failed(head.status):
                ex.result, ex.note = "STALE", f"upstream answered {head.status}"
                self.metrics.upstream_error(origin.netloc, ex.note, ex.what)
                return True
        finally:
            head.release()
        return None

    def _stale(
        self,
        request: web.BaseRequest,
        origin: Origin,
        entry: TagEntry,
        cached: bytes,
        cause: object,
        ex: Exchange,
    ) -> web.Response:
        why = describe(cause) if isinstance(cause, BaseException) else str(cause)
        ex.result, ex.note = "STALE", f"upstream {origin.netloc} failed: {why}"
        self.metrics.upstream_error(origin.netloc, ex.note, ex.what)
        return self._answer(request, cached, entry.media_type, entry.digest, ex)

"""The shared blob fetch when something goes wrong: an answer upstream that does not parse,
an error of ours, a store or an index that cannot take a write. Whatever it is, every
client gets an answer (the blob through from upstream when only the store failed, an
error or a cut connection otherwise), the digest can be fetched again, and the store and
the index agree.

The real RegistryProxy, store, index, maintenance and upstream client run in this
process, behind a plain HTTP front that hands each request to the proxy, in front of a
small fake registry on loopback (the faults are made where a real one cannot be).
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import os
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from proxy_app import blobs
from proxy_app.blobs import FilesystemBlobStore
from proxy_app.config import Config, ListenAddress
from proxy_app.context import CacheContext
from proxy_app.exchange import Exchange
from proxy_app.index import Index
from proxy_app.inflight import StoreUnavailable
from proxy_app.metrics import Metrics
from proxy_app.registry import RegistryProxy
from proxy_app.store_maintenance import StoreMaintenance
from proxy_app.upstream import Origin, Upstream

REPO = "lib/app"
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Answer:
    def __init__(self, status: int, headers: dict[str, str], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    @property
    def cache(self) -> str | None:
        return self.headers.get("X-Registry-Cache")


class Cache:
    def __init__(self, cache_dir: Path, max_size: int) -> None:
        self.config = Config(
            cache_dir=cache_dir,
            ca_dir=cache_dir / "ca",
            max_size=max_size,
            intercept=("127.0.0.1",),  # the fake registry is on loopback
        )
        self.store = FilesystemBlobStore(cache_dir)
        self.index = Index(cache_dir / "index.sqlite3")
        self.metrics = Metrics()
        self.maintenance = StoreMaintenance(self.config, self.store, self.index, self.metrics)
        self.maintenance.reconcile(False)
        self.upstream = Upstream(self.config)
        self.executor = ThreadPoolExecutor(4)
        self.registry = RegistryProxy(
            CacheContext(
                self.config,
                self.store,
                self.index,
                self.upstream,
                self.metrics,
                self.executor,
                self.maintenance,
            )
        )
        self.upstream_gets = 0
        self.base = ""
        self.session: aiohttp.ClientSession

    def metric(self, name: str) -> float:
        return self.metrics.registry.get_sample_value(name) or 0.0

    async def get(
        self, digest: str, headers: dict[str, str] | None = None, timeout: float = 10
    ) -> Answer:
        """One blob request through the cache; raises TimeoutError when no answer comes."""
        async with (
            asyncio.timeout(timeout),
            self.session.get(f"{self.base}/v2/{REPO}/blobs/{digest}", headers=headers) as r,
        ):
            return Answer(r.status, dict(r.headers), await r.read())

    async def settled(self) -> None:
        """Until no fetch is under way and every verified blob has been stored."""
        async with asyncio.timeout(10):
            while len(self.registry.inflight) or self.registry.blobs._storing:
                await asyncio.sleep(0.01)

    def consistent(self) -> bool:
        return self.store.digests() == self.index.all_digests()


@asynccontextmanager
async def running_cache(
    cache_dir: Path, upstream: Handler, max_size: int = 1 << 30, manifests: Handler | None = None
) -> AsyncIterator[Cache]:
    cache = Cache(cache_dir, max_size)

    async def registry(request: web.Request) -> web.StreamResponse:
        cache.upstream_gets += 1
        return await upstream(request)

    upstream_app = web.Application()
    upstream_app.router.add_get("/v2/{name:.+}/blobs/{digest}", registry)
    if manifests is not None:
        upstream_app.router.add_get("/v2/{name:.+}/manifests/{reference}", manifests)
    # Short shutdowns: a handler left waiting (the bug these tests catch) must not hold
    # the test for aiohttp's default minute.
    upstream_runner = web.AppRunner(upstream_app, shutdown_timeout=2)
    await upstream_runner.setup()
    await web.TCPSite(upstream_runner, "127.0.0.1", 0).start()
    origin = Origin("http", "127.0.0.1", upstream_runner.addresses[0][1])

    async def front(request: web.BaseRequest) -> web.StreamResponse:
        ex = Exchange("127.0.0.1", request.method, origin.netloc, request.path_qs)
        return await cache.registry.handle(request, origin, ex)

    front_server = web.Server(front)
    front_runner = web.ServerRunner(front_server, shutdown_timeout=2)
    await front_runner.setup()
    await web.TCPSite(front_runner, "127.0.0.1", 0).start()
    cache.base = f"http://127.0.0.1:{front_runner.addresses[0][1]}"
    await cache.upstream.start()
    cache.session = aiohttp.ClientSession(auto_decompress=False)
    try:
        yield cache
    finally:
        await cache.session.close()
        await cache.registry.close()
        await front_runner.cleanup()
        await upstream_runner.cleanup()
        await cache.upstream.close()
        cache.executor.shutdown(wait=True)
        cache.index.close()


def serving(blobs_by_digest: dict[str, bytes]) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(body=blobs_by_digest[request.match_info["digest"]])

    return handler


def slowly(body: bytes, piece: int = 64 << 10, pause: float = 0.02) -> Handler:
    """Sends `body` (with its Content-Length) in pieces, a pause after each."""

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": str(len(body))})
        await response.prepare(request)
        for i in range(0, len(body), piece):
            await response.write(body[i : i + piece])
            await asyncio.sleep(pause)
        return response

    return handler


# --- errors nobody planned for ----------------------------------------------------------


def test_a_redirect_that_does_not_parse_fails_the_fetch_and_frees_the_digest(
    tmp_path: Path,
) -> None:
    digest = digest_of(b"never sent")

    async def redirect(request: web.Request) -> web.StreamResponse:
        return web.Response(status=307, headers={"Location": "http://cdn.example:99999/x"})

    async def scenario() -> None:
        async with running_cache(tmp_path, redirect) as cache:
            # two clients on one fetch, then one more: each gets an answer, none waits
            first = await asyncio.gather(cache.get(digest), cache.get(digest))
            again = await cache.get(digest)
            for answer in (*first, again):
                assert answer.status == 502, answer.body[:300]
                assert b"UNAVAILABLE" in answer.body
            assert cache.upstream_gets == 2, "the second fetch never went upstream"
            assert len(cache.registry.inflight) == 0

    asyncio.run(scenario())


def test_an_error_of_ours_mid_download_cuts_readers_removes_the_file_and_logs_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(1 << 20)
    digest = digest_of(data)

    async def scenario() -> None:
        async with running_cache(tmp_path, slowly(data)) as cache:
            begin_write = cache.store.begin_write

            def broken_writer(d: str) -> blobs.FileWriter:
                writer = begin_write(d)

                def write_chunks(chunks: Any) -> None:
                    raise RuntimeError("a bug in the writer")

                monkeypatch.setattr(writer, "write_chunks", write_chunks)
                return writer

            monkeypatch.setattr(cache.store, "begin_write", broken_writer)
            caplog.clear()
            for outcome in await asyncio.gather(
                cache.get(digest), cache.get(digest), return_exceptions=True
            ):
                # the headers went out before the error: a cut connection is the answer
                assert isinstance(outcome, aiohttp.ClientError), outcome
            await cache.settled()
            logged = [r for r in caplog.records if "failed" in r.getMessage() and r.exc_info]
            assert len(logged) == 1, [r.getMessage() for r in logged]
            assert digest in logged[0].getMessage()
            assert list((tmp_path / "tmp").iterdir()) == [], "the half-written file was left"
            assert not cache.store.has(digest)

            monkeypatch.undo()
            answer = await cache.get(digest)
            assert (answer.status, answer.cache, answer.body == data) == (200, "MISS", True)
            await cache.settled()
            assert cache.store.has(digest) and cache.consistent()

    asyncio.run(scenario())


def test_stopping_ends_the_readers_of_an_unfinished_fetch(tmp_path: Path) -> None:
    data = os.urandom(4 << 20)
    digest = digest_of(data)

    async def scenario() -> None:
        async with running_cache(tmp_path, slowly(data, pause=0.05)) as cache:
            reader = asyncio.ensure_future(cache.get(digest))
            async with asyncio.timeout(10):
                while not cache.registry.inflight.busy(digest):
                    await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)  # some bytes are on their way
            async with asyncio.timeout(10):
                await cache.registry.close()
            with pytest.raises(aiohttp.ClientError):
                await reader
            assert len(cache.registry.inflight) == 0

    asyncio.run(scenario())


# --- a store or an index that cannot take a write ---------------------------------------


def test_a_store_error_while_evicting_serves_through_and_is_no_upstream_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = os.urandom(600_000), os.urandom(600_000)
    blobs_by_digest = {digest_of(a): a, digest_of(b): b}

    async def scenario() -> None:
        async with running_cache(tmp_path, serving(blobs_by_digest), max_size=1_000_000) as cache:
            assert (await cache.get(digest_of(a))).cache == "MISS"
            await cache.settled()
            assert cache.store.has(digest_of(a))

            def read_only(digest: str) -> bool:
                raise OSError(errno.EROFS, "Read-only file system")

            monkeypatch.setattr(cache.store, "delete", read_only)
            answer = await cache.get(digest_of(b))  # room for b means evicting a
            assert answer.status == 200, answer.body[:300]
            assert answer.cache == "MISS" and answer.body == b
            assert cache.metric("registry_cache_upstream_errors_total") == 0
            assert cache.metric("registry_cache_store_unavailable") == 1
            await cache.settled()
            # a's file could not go: its entry stays too, and b was not stored
            assert cache.index.blob(digest_of(a)) is not None and cache.consistent()
            assert cache.maintenance.size == len(a)

    asyncio.run(scenario())


def test_an_index_error_while_evicting_removes_neither_file_nor_entry(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = os.urandom(600_000), os.urandom(600_000)
    blobs_by_digest = {digest_of(a): a, digest_of(b): b}

    async def scenario() -> None:
        async with running_cache(tmp_path, serving(blobs_by_digest), max_size=1_000_000) as cache:
            await cache.get(digest_of(a))
            await cache.settled()

            def disk_full(digest: str) -> None:
                raise sqlite3.OperationalError("database or disk is full")

            monkeypatch.setattr(cache.index, "remove_blob", disk_full)
            answer = await cache.get(digest_of(b))
            assert (answer.status, answer.cache, answer.body == b) == (200, "MISS", True)
            assert cache.metric("registry_cache_store_unavailable") == 1
            await cache.settled()
            assert cache.store.has(digest_of(a)), "a's file went, its index entry stayed"
            assert cache.consistent()

    asyncio.run(scenario())


def test_a_blob_the_index_cannot_take_is_not_left_in_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(300_000)
    digest = digest_of(data)

    async def scenario() -> None:
        async with running_cache(tmp_path, serving({digest: data})) as cache:

            def disk_full(*args: Any) -> None:
                raise sqlite3.OperationalError("database or disk is full")

            monkeypatch.setattr(cache.index, "add_blob", disk_full)
            answer = await cache.get(digest)
            assert (answer.status, answer.cache, answer.body == data) == (200, "MISS", True)
            await cache.settled()
            assert not cache.store.has(digest), "stored but not indexed"
            assert cache.consistent() and cache.maintenance.size == 0
            assert cache.metric("registry_cache_store_unavailable") == 1

            monkeypatch.undo()
            assert (await cache.get(digest)).cache == "MISS"
            await cache.settled()
            assert (await cache.get(digest)).cache == "HIT"
            assert cache.consistent() and cache.maintenance.size == len(data)
            assert cache.metric("registry_cache_store_unavailable") == 0

    asyncio.run(scenario())


def test_a_manifest_the_index_cannot_take_is_not_left_in_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    manifest = b'{"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json"}'
    media_type = "application/vnd.oci.image.manifest.v1+json"
    digest = digest_of(manifest)

    async def tag(request: web.Request) -> web.StreamResponse:
        return web.Response(body=manifest, headers={"Content-Type": media_type})

    async def scenario() -> None:
        async with running_cache(tmp_path, serving({}), manifests=tag) as cache:
            url = f"{cache.base}/v2/{REPO}/manifests/1"

            def disk_full(*args: Any) -> None:
                raise sqlite3.OperationalError("database or disk is full")

            monkeypatch.setattr(cache.index, "add_blob", disk_full)
            async with cache.session.get(url, headers={"Accept": media_type}) as r:
                assert (r.status, await r.read()) == (200, manifest)
            assert not cache.store.has(digest), "stored but not indexed"
            assert cache.consistent()
            assert cache.metric("registry_cache_store_unavailable") == 1

            monkeypatch.undo()
            async with cache.session.get(url, headers={"Accept": media_type}) as r:
                assert (r.status, r.headers["X-Registry-Cache"]) == (200, "MISS")
            by_digest = f"{cache.base}/v2/{REPO}/manifests/{digest}"
            async with cache.session.get(by_digest, headers={"Accept": media_type}) as r:
                assert (r.headers["X-Registry-Cache"], await r.read()) == ("HIT", manifest)
            assert cache.consistent()

    asyncio.run(scenario())


def test_a_failed_directory_flush_after_the_rename_still_counts_as_stored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(300_000)
    digest = digest_of(data)

    def failing_fsync_dir(path: Path) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(blobs, "_fsync_dir", failing_fsync_dir)

    async def scenario() -> None:
        async with running_cache(tmp_path, serving({digest: data})) as cache:
            assert (await cache.get(digest)).cache == "MISS"
            await cache.settled()
            # the file is in the store and served from it: then the index knows it too
            assert cache.store.has(digest) and cache.index.blob(digest) is not None
            assert cache.maintenance.size == len(data)
            assert (await cache.get(digest)).cache == "HIT"

    asyncio.run(scenario())


def test_a_newcomer_to_a_verified_blob_that_could_not_be_stored_gets_it_from_upstream(
    tmp_path: Path,
) -> None:
    data = os.urandom(100_000)
    digest = digest_of(data)

    async def scenario() -> None:
        async with running_cache(tmp_path, serving({digest: data})) as cache:
            # The state between a failed flush and the fetch's end: verified, file gone.
            fetch, _ = cache.registry.inflight.claim(digest, "test-origin")
            writer = cache.store.begin_write(digest)
            fetch.begin(writer, len(data))
            writer.write(data)
            writer.verify(len(data))
            fetch.verify()
            writer.abort()
            fetch.fail("cannot store: disk full", StoreUnavailable)
            answer = await cache.get(digest)
            assert (answer.status, answer.cache, answer.body == data) == (200, "MISS", True)
            cache.registry.inflight.release(fetch)

    asyncio.run(scenario())


# --- ranges of a blob still being fetched -----------------------------------------------


def test_a_range_of_an_unverified_blob_is_never_answered_complete(tmp_path: Path) -> None:
    good = os.urandom(1 << 20)
    digest = digest_of(good)
    bad = bytes(len(good))  # other bytes of the same length: they fail verification

    async def scenario() -> None:
        async with running_cache(tmp_path, slowly(bad)) as cache:
            whole = asyncio.ensure_future(cache.get(digest))
            async with asyncio.timeout(10):
                while not cache.registry.inflight.busy(digest):
                    await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)  # the first 64 KiB have arrived, unverified
            with pytest.raises(aiohttp.ClientPayloadError):
                ranged = await cache.get(digest, {"Range": "bytes=0-65535"})
                pytest.fail(f"answered {ranged.status} with {len(ranged.body)} unverified bytes")
            with pytest.raises(aiohttp.ClientPayloadError):
                await whole
            assert not cache.store.has(digest)

    asyncio.run(scenario())


def test_a_range_of_a_blob_being_fetched_is_answered_once_verified(tmp_path: Path) -> None:
    data = os.urandom(1 << 20)
    digest = digest_of(data)

    async def scenario() -> None:
        async with running_cache(tmp_path, slowly(data)) as cache:
            whole = asyncio.ensure_future(cache.get(digest))
            async with asyncio.timeout(10):
                while not cache.registry.inflight.busy(digest):
                    await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)
            ranged = await cache.get(digest, {"Range": "bytes=1000-66535"})
            assert ranged.status == 206
            assert ranged.headers["Content-Range"] == f"bytes 1000-66535/{len(data)}"
            assert ranged.body == data[1000:66536]
            assert (await whole).body == data

    asyncio.run(scenario())


def test_hit_and_miss_counts_survive_an_index_that_cannot_take_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The app's flush moves the counts of hits and misses into the index; a full disk
    keeps them for the next flush instead of dropping them."""
    from proxy_app.app import RegistryCacheApp

    config = Config(
        listen=(ListenAddress("127.0.0.1", 0),), cache_dir=tmp_path, ca_dir=tmp_path / "ca"
    )

    async def scenario() -> None:
        app = RegistryCacheApp(config)
        await app.start()
        try:
            app.registry.pending_stats.update({"hits": 3, "misses": 1})

            def disk_full(*args: Any) -> None:
                raise sqlite3.OperationalError("database or disk is full")

            monkeypatch.setattr(app.index, "add_stats", disk_full)
            with pytest.raises(sqlite3.OperationalError):
                app.flush()
            assert app.registry.pending_stats == {"hits": 3, "misses": 1}
            monkeypatch.undo()
            app.registry.pending_stats["hits"] += 1
            app.flush()
            assert app.index.stats() == {"hits": 4, "misses": 1}
            assert app.registry.pending_stats == {}
        finally:
            await app.stop()

    asyncio.run(scenario())

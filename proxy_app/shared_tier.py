"""A node's use of the shared bucket (shared_store.py): asked on a miss, filled behind.

The node's own disk stays the hot tier: clients are served from it and from the
download that fills it. The bucket is asked on a local miss before the registry
(BucketSource, a blob_sources.BlobSource: another node fetched the blob already), and
every blob the node stores is uploaded to it afterwards, from the committed local file,
by a few background workers: no client waits for the bucket.

When the bucket cannot be reached the node carries on without it (misses go upstream,
/healthz says degraded); what it stored meanwhile is uploaded once the bucket is back,
found by comparing the local index with the bucket's listing (as at every start).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable

from .blobs import FilesystemBlobStore
from .index import Index
from .shared_store import BucketObject, BucketUnavailable, SharedStore, UploadMismatch
from .upstream import Origin

log = logging.getLogger(__name__)

UPLOADS_AT_ONCE = 2  # background uploads; the node's bandwidth is its clients' first
# An upload waits while the node downloads (its clients' pulls are under way), at most this
# many seconds after the blob was stored: on a busy node it must not wait for ever.
UPLOAD_DEFER_MAX = 30.0
# ... and goes on once no download has run for this long: a client fetching layers one
# after another leaves gaps between them that are no end of its pull.
QUIET_FOR = 1.0
WATCH_INTERVAL = 2.0  # seconds between looks at a bucket that is down


class BucketSource:
    """The bucket as a blob source: a 200 streaming the blob, or None (not there, or the
    bucket is down: then at once, without a request, while its circuit is open)."""

    name = "bucket"

    def __init__(self, shared: SharedStore) -> None:
        self.shared = shared
        self._deletes: set[asyncio.Task[None]] = set()

    async def open(self, digest: str, origin: Origin, repository: str) -> BucketObject | None:
        if not self.shared.available:
            return None
        try:
            return await self.shared.open(digest)
        except BucketUnavailable:
            return None

    async def instead(self, digest: str, origin: Origin, repository: str) -> BucketObject | None:
        """A bucket stream that broke off (its object trimmed, the store gone): the
        registry sends the rest."""
        return None

    def refute(self, digest: str) -> None:
        """An object that is not its digest's bytes (damaged in the store: every upload
        was verified) goes, so that the next fetch of it goes to the registry and its
        upload puts the right bytes in its place."""
        log.error("the shared store's %s is damaged: deleting it", self.shared.key(digest))
        task = asyncio.get_running_loop().create_task(self._delete(digest))
        self._deletes.add(task)
        task.add_done_callback(self._deletes.discard)

    async def _delete(self, digest: str) -> None:
        try:
            await self.shared.delete(digest)
        except BucketUnavailable as e:
            log.error("cannot delete the damaged %s: %s", self.shared.key(digest), e)


class SharedTier:
    def __init__(
        self,
        shared: SharedStore,
        store: FilesystemBlobStore,
        index: Index,
        remove_local: Callable[[str], object],
    ) -> None:
        self.shared = shared
        self.store = store
        self.index = index
        self.remove_local = remove_local  # a local blob found corrupt goes (purge)
        self.source = BucketSource(shared)
        self._queue: asyncio.Queue[tuple[str, float]] = asyncio.Queue()
        self._queued: set[str] = set()
        self._tasks: list[asyncio.Task[None]] = []
        self._back = asyncio.Event()  # set while the bucket answers
        self.uploaded = 0
        # The last read below which the trimmer deleted blobs (shared_trim.py), if any.
        self.upload_floor: Callable[[], Awaitable[float | None]] | None = None
        # Set while the node downloads no blob (InflightFetches.idle); the app gives it.
        self.downloads_idle: asyncio.Event | None = None

    # --- life ---------------------------------------------------------------------------

    async def start(self) -> None:
        await self.shared.start()
        if await self.shared.probe():
            self._back.set()
            try:
                aborted = await self.shared.abort_abandoned_uploads()
            except BucketUnavailable:
                aborted = 0
            log.info(
                "shared store %s/%s%s: %d abandoned multipart uploads aborted",
                self.shared.config.endpoint,
                self.shared.bucket,
                f" (prefix {self.shared.prefix})" if self.shared.prefix else "",
                aborted,
            )
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._upload_worker()) for _ in range(UPLOADS_AT_ONCE)]
        self._tasks.append(loop.create_task(self._watch()))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.shared.close()

    def health(self) -> dict[str, object]:
        return {
            "bucket": self.shared.bucket,
            "reachable": self.shared.healthy,
            "problem": self.shared.problem,
            "uploads_pending": len(self._queued),
            "uploaded": self.uploaded,
        }

    # --- uploads ------------------------------------------------------------------------

    def stored(self, digest: str, source: str | None = None) -> None:
        """A blob is committed to the local store: to the bucket, behind the clients, when
        this node downloaded it from the registry (`source` None). One that came from the
        bucket is there. One from its owner is uploaded by the owner (a second upload of
        the same bytes would only take the CPU and bandwidth the clients are using); it
        is queued here only once the owner's upload must have ended (it waits
        UPLOAD_DEFER_MAX at most, and an upload older than the store's
        abandoned_upload_age is abandoned by definition), for the case that the owner died
        before it: it costs a HEAD request, and an upload if the bucket still lacks it."""
        if source == self.source.name:
            return
        if source is not None:
            later = UPLOAD_DEFER_MAX + self.shared.config.abandoned_upload_age
            asyncio.get_running_loop().call_later(later, self._queue_upload, digest)
            return
        self._queue_upload(digest)

    def _queue_upload(self, digest: str) -> None:
        if digest not in self._queued:
            self._queued.add(digest)
            self._queue.put_nowait((digest, time.monotonic()))

    async def rescan(self) -> int:
        """Queues every local blob the bucket lacks; how many. Not those unread here since
        the trimmer deleted blobs read as late (they went, or would go, for the bound; an
        upload would make them look new)."""
        in_bucket = set()
        async for digest, _size in self.shared.list():
            in_bucket.add(digest)
        floor = await self.upload_floor() if self.upload_floor is not None else None
        self.index.flush_access()
        missing = {
            digest
            for digest, at in self.index.last_accesses().items()
            if digest not in in_bucket and (floor is None or at > floor)
        }
        for digest in missing:
            self.stored(digest)
        return len(missing)

    async def _upload_worker(self) -> None:
        while True:
            digest, stored_at = await self._queue.get()
            await self._back.wait()
            until = stored_at + UPLOAD_DEFER_MAX
            try:
                quiet = functools.partial(self._quiet, until)
                if await self.shared.upload(digest, self.store.path(digest), before_part=quiet):
                    self.uploaded += 1
                    log.debug("uploaded %s to the shared store", digest)
            except FileNotFoundError:
                pass  # evicted before its turn: another node may upload it
            except BucketUnavailable:
                # The whole set is found again by the rescan when the bucket is back.
                self._back.clear()
            except UploadMismatch as e:
                log.error("not uploading %s: %s; removing the damaged local copy", digest, e)
                self.remove_local(digest)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("uploading %s to the shared store failed", digest)
            finally:
                self._queued.discard(digest)

    async def _quiet(self, until: float) -> None:
        """Waits while the node downloads (and QUIET_FOR after), until `until` at the
        latest; asked before each part of an upload. A pull's blobs come in together:
        their uploads, which cost as much CPU as the downloads on a small host, run once
        the pull's downloads are done, not between them."""
        idle = self.downloads_idle
        if idle is None:
            return
        loop = asyncio.get_running_loop()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(loop.time() + max(0.0, until - time.monotonic())):
                while True:
                    await idle.wait()
                    await asyncio.sleep(QUIET_FOR)
                    if idle.is_set():
                        return

    async def _watch(self) -> None:
        """Rescans at start, and whenever the bucket comes back after being down."""
        rescanned = False
        while True:
            if self.shared.healthy and not rescanned:
                with contextlib.suppress(BucketUnavailable):
                    queued = await self.rescan()
                    rescanned = True
                    self._back.set()
                    if queued:
                        log.info("uploading %d local blobs the shared store lacks", queued)
            elif not self.shared.healthy:
                rescanned = False
                self._back.clear()
                if self.shared.available:
                    await self.shared.probe()
            await asyncio.sleep(WATCH_INTERVAL)

"""Blob fetches in flight: one upstream download per digest, shared by every client.

A fetch writes into the store's temporary file; clients that ask for the same blob
meanwhile read that file as it grows, so a client that joins late starts receiving at
once instead of waiting for the download to end. The last byte is held back from readers
until the digest has been verified: a blob that fails verification is never delivered
whole, and the readers' connections are cut instead. It is released as soon as the hash
matches, not after the file has been flushed to disk: readers read the page cache, and
durability is the store's concern, not theirs.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

from .blobs import BlobReader, BlobStore, BlobWriter

log = logging.getLogger(__name__)


class FetchFailed(Exception):
    """The shared download broke or its bytes failed verification."""


class StoreUnavailable(FetchFailed):
    """The blob could not be written (disk full, I/O error): readers fetch it directly."""


class BlobFetch:
    def __init__(self, digest: str) -> None:
        self.digest = digest
        self.size: int | None = None
        self.writer: BlobWriter | None = None
        # Resolves once upstream has answered: True when bytes are coming, False when the
        # initiating request got an answer other than 200 (its own to relay).
        self.started: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.verified = False  # the bytes hash to the digest: all may be read
        # What upstream answered the initiating request instead of the blob (to relay).
        self.refusal: object | None = None
        self.error: FetchFailed | None = None
        # Where it is fetched from: the registry (Origin.key) it is keyed by, and with the
        # repository the link made once it is stored.
        self.origin = ""
        self.source: tuple[str, str] | None = None
        # The cluster source (blob_sources.py) the bytes come from; None: the registry.
        self.from_source: str | None = None
        self.began = time.time()  # wall time, for the status page
        self._progress = asyncio.Event()

    @property
    def written(self) -> int:
        return self.writer.written if self.writer else 0

    def progress(self) -> dict[str, Any]:
        """How far it is, for the status page: bytes so far of its size (None: unknown)."""
        return {
            "registry": self.origin,
            "repository": self.source[1] if self.source else "",
            "digest": self.digest,
            "bytes": self.written,
            "size": self.size,
            "began": self.began,
            "verified": self.verified,
        }

    # --- writer side --------------------------------------------------------------------

    def begin(self, writer: BlobWriter, size: int | None) -> None:
        self.writer, self.size = writer, size
        if not self.started.done():
            self.started.set_result(True)

    def refuse(self) -> None:
        """Upstream did not give the blob to the initiating client; others try themselves."""
        if not self.started.done():
            self.started.set_result(False)
        self._notify()

    def progressed(self) -> None:
        self._notify()

    def verify(self) -> None:
        if self.size is None and self.writer is not None:
            self.size = self.writer.written  # upstream sent no length; now it is known
        self.verified = True
        self._notify()

    def finish(self) -> None:
        """The blob is in the store."""
        self.verified = True
        self._notify()

    def fail(self, reason: str, error: type[FetchFailed] = FetchFailed) -> None:
        self.error = error(reason)
        if not self.started.done():
            self.started.set_result(False)
        self._notify()

    def _notify(self) -> None:
        event, self._progress = self._progress, asyncio.Event()
        event.set()

    # --- reader side --------------------------------------------------------------------

    def readable(self) -> int:
        """Bytes a reader may take now: all once verified, else all but the last one."""
        written = self.written
        return written if self.verified else max(written - 1, 0)

    async def wait_beyond(self, offset: int, end: int | None = None) -> int:
        """Waits until more than `offset` bytes may be read; returns how many may. A reader
        whose response stops at `end`, short of the blob's end (a Range), is held back from
        its own last byte until verification as well: a complete answer is a verified one."""
        while True:
            # Once verified, every byte is in the file a reader has open: a failure to
            # store it after that (disk full at the flush) does not concern readers.
            if self.error is not None and not self.verified:
                raise self.error
            available = self.readable()
            if end is not None and not self.verified:
                available = min(available, end - 1)
            if available > offset or self.verified:
                return available
            await self._progress.wait()

    def open_reader(self, store: BlobStore) -> BlobReader:
        """Opens the growing file; once stored (even mid-rename) the stored one."""
        assert self.writer is not None
        try:
            return self.writer.reader()
        except FileNotFoundError:
            if self.error is not None:
                raise self.error from None
            return store.open(self.digest)


class InflightFetches:
    """The registry of fetches under way, keyed by registry and digest.

    Per registry, not by digest alone: a registry that trickles a digest another registry
    also serves must never hold up that registry's clients, nor feed them its bytes (which
    the digest check would refuse only at the end, cutting their connections). Two
    registries' fetches of one digest may run side by side; the first verified is stored.
    """

    def __init__(self, on_change: Callable[[int], None] | None = None) -> None:
        self._fetches: dict[tuple[str, str], BlobFetch] = {}
        self._on_change = on_change
        self.idle = asyncio.Event()  # set while no fetch is under way
        self.idle.set()

    def get(self, digest: str, origin: str) -> BlobFetch | None:
        """The fetch of `digest` from registry `origin` (an Origin.key)."""
        return self._fetches.get((origin, digest))

    def verified(self, digest: str) -> BlobFetch | None:
        """A fetch of `digest` from any registry whose bytes are all in and verified."""
        for (_, d), fetch in self._fetches.items():
            if d == digest and fetch.verified:
                return fetch
        return None

    def busy(self, digest: str) -> bool:
        """Whether `digest` is being fetched from any registry (not to be evicted)."""
        return any(d == digest for _, d in self._fetches)

    def claim(self, digest: str, origin: str) -> tuple[BlobFetch, bool]:
        """The fetch of `digest` from `origin`, and whether the caller created it (and
        must run it)."""
        fetch = self._fetches.get((origin, digest))
        if fetch is not None:
            return fetch, False
        fetch = BlobFetch(digest)
        fetch.origin = origin
        self._fetches[(origin, digest)] = fetch
        self._changed()
        return fetch, True

    def release(self, fetch: BlobFetch) -> None:
        key = (fetch.origin, fetch.digest)
        if self._fetches.get(key) is fetch:
            del self._fetches[key]
            self._changed()

    def __len__(self) -> int:
        return len(self._fetches)

    def progress(self) -> list[dict[str, Any]]:
        """Each fetch under way and how far it is, the oldest first."""
        return sorted((f.progress() for f in self._fetches.values()), key=lambda p: p["began"])

    def _changed(self) -> None:
        if self._fetches:
            self.idle.clear()
        else:
            self.idle.set()
        if self._on_change:
            self._on_change(len(self._fetches))

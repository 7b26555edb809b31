"""Keeping the store within its promises: start-up reconciliation, the size bound
(least recently used first), expiry of entries unused for `inactive`, reader pins that
keep a blob in place while a client reads it, and pinned images (`registry-cache pin`,
config `pinned`), whose manifests, configs and layers neither ever evicts."""

from __future__ import annotations

import hashlib
import logging
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterator

from .blobs import FilesystemBlobStore
from .config import Config
from .image_graph import ImageGraph, named_by, stored_document
from .index import BlobEntry, Index
from .inflight import InflightFetches
from .media_types import OCI_INDEX, OCI_MANIFEST
from .metrics import Metrics

log = logging.getLogger(__name__)

VERIFY_CHUNK = 4 << 20
# What a store that cannot take writes (disk full, read-only, I/O errors) raises: from the
# files (OSError) or from the index beside them (sqlite3.Error).
STORE_ERRORS = (OSError, sqlite3.Error)
StoreError = OSError | sqlite3.Error


def file_digest(store: FilesystemBlobStore, digest: str) -> str:
    h = hashlib.sha256()
    with store.path(digest).open("rb") as f:
        while chunk := f.read(VERIFY_CHUNK):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def sniff_manifest_type(store: FilesystemBlobStore, digest: str, size: int) -> str | None:
    """The media type of a stored manifest whose index entry was lost (None for layers and
    configs), so that manifests stay servable after the index is rebuilt."""
    document = stored_document(store, digest, size)
    if document is None or document.get("schemaVersion") != 2:
        return None
    media_type = document.get("mediaType")
    if isinstance(media_type, str) and "manifest" in media_type:
        return media_type
    if isinstance(document.get("manifests"), list):
        return OCI_INDEX
    if isinstance(document.get("layers"), list) and isinstance(document.get("config"), dict):
        return OCI_MANIFEST
    return None


class StoreMaintenance:
    def __init__(
        self, config: Config, store: FilesystemBlobStore, index: Index, metrics: Metrics
    ) -> None:
        self.config = config
        self.store = store
        self.index = index
        self.metrics = metrics
        self.size = 0
        self._pins: Counter[str] = Counter()
        self._store_failing = False
        # Told of each blob committed to the store, and which cluster source gave it (None:
        # the registry; the shared tier uploads those).
        self.listeners: list[Callable[[str, str | None], None]] = []
        self.graph = ImageGraph(store, index)

    # --- start-up -----------------------------------------------------------------------

    def reconcile(self, index_rebuilt: bool) -> None:
        """Brings index and store into agreement after a stop, a crash or a lost index."""
        started = time.monotonic()
        removed_tmp = self.store.empty_tmp()
        indexed = self.index.all_digests()
        on_disk = self.store.digests()
        dropped = indexed - on_disk
        self.index.remove_blobs(dropped)
        adopted: list[tuple[str, int, str | None]] = []
        deleted = 0
        for digest in on_disk - indexed:
            # A file the index does not know: verified before it may be served again.
            size = self.store.size(digest)
            if size is not None and file_digest(self.store, digest) == digest:
                adopted.append((digest, size, sniff_manifest_type(self.store, digest, size)))
            else:
                self.store.delete(digest)
                deleted += 1
        self.index.add_blobs(adopted)
        if self.index.needs_links:
            self.link_tagged_content()
        self.size = self.index.total_size()
        self._publish()
        log.info(
            "store reconciled in %.2fs: %d blobs, %d bytes; %d temp files removed, %d index "
            "entries without file dropped, %d files re-indexed, %d corrupt files deleted%s",
            time.monotonic() - started,
            len(on_disk) - deleted,
            self.size,
            removed_tmp,
            len(dropped),
            len(adopted),
            deleted,
            " (index rebuilt)" if index_rebuilt else "",
        )
        self.make_room(0)

    def link_tagged_content(self) -> None:
        """Migrates a cache made before links existed: each tag answer links its manifest
        to the tag's registry and repository, and, read from the store, what the manifest
        names (an index's manifests, an image's config and layers), which the registry
        holds in that repository since it accepted the manifest there. Everything else is
        confirmed with the registry on first use, like content another repository put in
        the store."""
        links: dict[tuple[str, str, str], str | None] = {}

        def link(host: str, name: str, digest: str, media_type: str | None, depth: int) -> None:
            key = (host, name, digest)
            if key in links and (links[key] is not None or media_type is None):
                return
            links[key] = media_type
            if media_type is None or depth > 1:
                return
            for child, child_type in named_by(self.store, digest):
                link(host, name, child, child_type, depth + 1)

        for host, name, digest, media_type in self.index.all_tags():
            link(host, name, digest, media_type, 0)
        self.index.add_links([(*key, media_type) for key, media_type in links.items()])
        self.index.set_schema_version()
        log.info("links rebuilt from the tag answers of an older cache: %d", len(links))

    # --- a store that cannot take writes (disk full, I/O errors) -------------------------

    def store_failed(self, error: StoreError) -> None:
        """Logged once per episode; clients are served straight from upstream meanwhile."""
        self.metrics.store_errors.inc()
        self.metrics.store_unavailable.set(1)
        if not self._store_failing:
            self._store_failing = True
            log.error(
                "cannot store blobs in %s: %s; serving through from upstream until it works again",
                self.config.cache_dir,
                getattr(error, "strerror", None) or error,
            )

    def store_ok(self) -> None:
        if self._store_failing:
            self._store_failing = False
            self.metrics.store_unavailable.set(0)
            log.info("storing blobs in %s works again", self.config.cache_dir)

    def refresh_size(self) -> None:
        self.size = self.index.total_size()
        self._publish()

    # --- pins ---------------------------------------------------------------------------

    def pin(self, digest: str) -> None:
        self._pins[digest] += 1

    def unpin(self, digest: str) -> None:
        self._pins[digest] -= 1
        if self._pins[digest] <= 0:
            del self._pins[digest]

    # --- the size bound -----------------------------------------------------------------

    def stored(self, digest: str, size: int, source: str | None = None) -> None:
        self.size += size
        self.announce(digest, source)
        self.make_room(0)

    def announce(self, digest: str, source: str | None = None) -> None:
        """Tells the listeners a blob (or manifest) was committed to the store, and the
        name of the cluster source that gave it (the bucket, the owner peer), if one did."""
        for listener in self.listeners:
            listener(digest, source)

    def _candidates(self, inflight: InflightFetches | None, batch: int) -> Iterator[BlobEntry]:
        """Blobs least recently used first, less those being read or fetched and those of
        pinned images (worked out once, when a first candidate is asked for)."""
        kept: set[str] | None = None
        skipped = 0
        while True:
            entries = self.index.least_recently_used(batch, offset=skipped)
            if not entries:
                return
            if kept is None:
                kept = self.graph.pinned()
            for entry in entries:
                digest = entry.digest
                if digest in self._pins or digest in kept or (inflight and inflight.busy(digest)):
                    skipped += 1
                    continue
                yield entry  # evicted, or the caller is done: either way not seen again

    def make_room(self, incoming: int, inflight: InflightFetches | None = None) -> bool:
        """Evicts least recently used blobs until `incoming` more bytes fit in max_size.
        Returns False when pinned blobs alone leave no room."""
        self.index.flush_access()
        fits = True
        if self.size + incoming > self.config.max_size:
            fits = False
            for entry in self._candidates(inflight, 256):
                self._evict(entry)
                if self.size + incoming <= self.config.max_size:
                    fits = True
                    break
        self._publish()
        return fits

    def expire_inactive(self, inflight: InflightFetches | None = None) -> int:
        cutoff = time.time() - self.config.inactive
        expired = 0
        for entry in self._candidates(inflight, 1000):
            if entry.last_access >= cutoff:
                break
            self._evict(entry)
            expired += 1
        if expired:
            log.info("removed %d blobs unused for %ds", expired, self.config.inactive)
            self._publish()
        return expired

    def remove(self, digest: str) -> int:
        """Removes a blob (purge): the bytes freed, 0 when it was not stored."""
        entry = self.index.blob(digest)
        if entry is None:
            return 0
        self._remove(entry)
        log.info("purged %s (%d bytes)", digest, entry.size)
        self._publish()
        return entry.size

    def _evict(self, entry: BlobEntry) -> None:
        self._remove(entry)
        self.metrics.evictions.inc()
        log.info("evicted %s (%d bytes)", entry.digest, entry.size)

    def _remove(self, entry: BlobEntry) -> None:
        """Removes a blob's entry, then its file; raises a STORE_ERRORS error, and changes
        nothing, when either cannot be done."""
        # The entry first: on a full or read-only disk it is the index write that fails,
        # and then the file is still there too. The other way round the file would be gone
        # and its entry left behind.
        self.index.remove_blob(entry.digest)
        try:
            self.store.delete(entry.digest)
        except OSError:
            try:
                self.index.restore_blob(entry)
            except sqlite3.Error as e:
                # The start-up recount re-indexes the file (after checking its digest).
                log.error("%s stays in the store unindexed until restart: %s", entry.digest, e)
            raise
        self.size -= entry.size

    def _publish(self) -> None:
        self.metrics.size.set(self.size)
        self.metrics.entries.set(self.index.count())

"""The shared bucket's own size bound, `shared_max_size`: least recently read blobs go
first, whichever node read them, and one node at a time trims.

- **Every node says what it read.** Each node publishes an access map every
  `shared_trim_interval`: one object `<prefix>access/<node>.json` holding, per digest,
  when the node last read it (its local index's last access: a local hit and a blob it
  took from the bucket alike), and the digests its pinned images use. One PUT per
  interval, not one per hit; an unchanged map is written again only now and then, so
  that its `written` time says the node is alive.
- **One trimmer: a lease.** `<prefix>lease/trim` holds {holder, token, expires, ...}.
  A node takes it when it is missing (If-None-Match: *) or expired, and its holder
  renews it every interval (If-Match: the ETag it last wrote); a conditional write that
  loses (412) means another node holds it. It expires 2 intervals after its last
  renewal, so when its holder dies another node takes over. The holder also writes the
  bucket's figures from its last trim into it, which every node reads (`status`).
- **The trim.** The holder lists the blobs (size, LastModified) and reads every node's
  map; a blob's last read is the latest of its LastModified and every node's read of
  it. Unpinned blobs go least recently read first until the blob total is within the
  bound; tag objects are never deleted. Maps of nodes silent for SILENT_FOR go after.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from .blobs import SHA256_DIGEST
from .image_graph import ImageGraph
from .index import Index
from .shared_store import BucketUnavailable, PreconditionFailed, SharedStore

log = logging.getLogger(__name__)

ACCESS_DIR = "access/"
LEASE_KEY = "lease/trim"
MAX_ACCESS_OBJECT = 32 << 20
MAX_LEASE_OBJECT = 64 << 10
ACCESS_ENTRIES = 200_000  # the most recent reads a node publishes (about 90 bytes each)
SILENT_FOR = 7 * 86400.0  # a node's map not written for this long is removed by the trimmer
HEARTBEAT_EVERY = 10  # intervals: an unchanged map is written again this often
LEASE_INTERVALS = 2  # the lease expires this many intervals after its last renewal


# --- the pure part: maps, ranking, the plan -------------------------------------------


@dataclass(frozen=True)
class AccessMap:
    node: str
    written: float
    reads: dict[str, float]
    pinned: frozenset[str] = frozenset()


@dataclass(frozen=True)
class BucketBlob:
    digest: str
    size: int
    modified: float  # LastModified: when it was uploaded, a read's floor


@dataclass
class TrimPlan:
    delete: list[BucketBlob]
    total: int  # the blobs' bytes before
    after: int  # and after the deletions
    # The last read of the most recently read blob the plan deletes: a node need not
    # upload again a local blob it has not read since (SharedTier.rescan).
    cut: float | None = None
    pinned_bytes: int = 0


def parse_access_map(document: Any) -> AccessMap | None:
    """A node's published map, or None when it is not one (entries not so are dropped)."""
    if not isinstance(document, dict):
        return None
    node, written, reads = document.get("node"), document.get("written"), document.get("reads")
    if not isinstance(node, str) or not isinstance(written, int | float):
        return None
    if not isinstance(reads, dict):
        return None
    clean = {
        d: float(t)
        for d, t in reads.items()
        if isinstance(d, str)
        and SHA256_DIGEST.fullmatch(d)
        and isinstance(t, int | float)
        and not isinstance(t, bool)
    }
    pinned = document.get("pinned") or []
    pins = (
        frozenset(d for d in pinned if isinstance(d, str) and SHA256_DIGEST.fullmatch(d))
        if isinstance(pinned, list)
        else frozenset()
    )
    return AccessMap(node, float(written), clean, pins)


def merge_reads(maps: Iterable[AccessMap]) -> dict[str, float]:
    """Every digest's latest read on any node."""
    merged: dict[str, float] = {}
    for access in maps:
        for digest, at in access.reads.items():
            if at > merged.get(digest, 0.0):
                merged[digest] = at
    return merged


def last_read(blob: BucketBlob, reads: dict[str, float]) -> float:
    """Its latest read on any node, its upload time at least (a blob no map names yet
    was just stored by a node whose map is not written yet)."""
    return max(blob.modified, reads.get(blob.digest, 0.0))


def plan_trim(
    blobs: Iterable[BucketBlob], reads: dict[str, float], pinned: set[str], max_size: int
) -> TrimPlan:
    """Which blobs go so that the rest fit in max_size: unpinned ones, least recently
    read first (ties: by digest, so that two trimmers pick the same)."""
    listed = list(blobs)
    total = sum(b.size for b in listed)
    pinned_bytes = sum(b.size for b in listed if b.digest in pinned)
    if total <= max_size:
        return TrimPlan([], total, total, None, pinned_bytes)
    ranked = sorted(
        (b for b in listed if b.digest not in pinned), key=lambda b: (last_read(b, reads), b.digest)
    )
    delete: list[BucketBlob] = []
    after = total
    for blob in ranked:
        if after <= max_size:
            break
        delete.append(blob)
        after -= blob.size
    cut = last_read(delete[-1], reads) if delete else None
    return TrimPlan(delete, total, after, cut, pinned_bytes)


def map_name(node: str) -> str:
    """The access map's object name for a node (`127.0.0.1:3128` -> `127.0.0.1_3128.json`)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", node) + ".json"


# --- the lease ------------------------------------------------------------------------


@dataclass
class Lease:
    """`<prefix>lease/trim`: who trims, until when. Conditional writes only."""

    shared: SharedStore
    me: str
    ttl: float
    etag: str | None = None
    document: dict[str, Any] = field(default_factory=dict)  # the last one read or written
    mine: bool = False

    @property
    def key(self) -> str:
        return self.shared.prefix + LEASE_KEY

    def held_until(self) -> float:
        return float(self.document.get("expires", 0.0)) if self.mine else 0.0

    async def read(self) -> tuple[dict[str, Any], str] | None:
        got = await self.shared.get_document(self.key, MAX_LEASE_OBJECT)
        if got is None or not isinstance(got[0], dict):
            return None
        return got[0], got[1]

    async def hold(self, figures: dict[str, Any]) -> bool:
        """Takes or renews the lease (with `figures` in it); False when another node holds
        it or won the race for it."""
        current = await self.read()
        now = time.time()
        document: dict[str, Any] = {}
        etag: str | None = None
        if current is not None:
            document, etag = current
            self.document = document
            expires = document.get("expires")
            live = isinstance(expires, int | float) and expires > now
            if document.get("holder") != self.me and live:
                self.mine = False
                return False
        taking = document.get("holder") != self.me
        new = {
            **figures,
            "holder": self.me,
            "token": uuid.uuid4().hex,  # every write a new ETag
            "acquired": now if taking else document.get("acquired", now),
            "renewed": now,
            "expires": now + self.ttl,
        }
        try:
            written = await self.shared.put_document(
                self.key, new, if_match=etag, if_absent=current is None
            )
        except PreconditionFailed:
            self.mine = False
            return False
        # Read back: a store that ignored the condition shows another writer's token.
        back = await self.read()
        if back is None or back[0].get("token") != new["token"]:
            self.mine = False
            if back is not None:
                self.document = back[0]
            return False
        if taking:
            previous = document.get("holder")
            log.info(
                "shared store trim lease taken by %s%s",
                self.me,
                f" (from {previous}, expired)" if previous else "",
            )
        self.document, self.etag, self.mine = new, back[1] or written, True
        return True

    async def release(self) -> None:
        """Gives the lease up at a clean stop: another node takes it at its next look."""
        if not self.mine or self.etag is None:
            return
        done = {**self.document, "expires": 0.0, "token": uuid.uuid4().hex}
        with contextlib.suppress(PreconditionFailed, BucketUnavailable):
            await self.shared.put_document(self.key, done, if_match=self.etag)
        self.mine = False


# --- the node's part ------------------------------------------------------------------


class SharedTrimmer:
    """Publishes this node's reads; when shared_max_size is set, competes for the lease
    and, holding it, trims the bucket."""

    def __init__(
        self,
        shared: SharedStore,
        index: Index,
        graph: ImageGraph,
        me: str,
        max_size: int | None,
        interval: float,
    ) -> None:
        self.shared = shared
        self.index = index
        self.graph = graph
        self.me = me
        self.max_size = max_size
        self.interval = interval
        self.lease = Lease(shared, me, LEASE_INTERVALS * interval)
        self.reads: dict[str, float] = {}
        self._published: tuple[int, frozenset[str]] | None = None
        self._since_written = 0
        self._loaded = False
        self.figures: dict[str, Any] = {}  # the bucket's, from this node's last trim
        self.trims = 0
        self._task: asyncio.Task[None] | None = None

    @property
    def map_key(self) -> str:
        return self.shared.prefix + ACCESS_DIR + map_name(self.me)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.lease.release(), 5)

    async def _run(self) -> None:
        while True:
            try:
                await self.tick()
            except BucketUnavailable as e:
                log.debug("shared store trim: bucket unavailable: %s", e)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("shared store trim failed; will try again")
            await asyncio.sleep(self.interval)

    async def tick(self) -> None:
        if not self.shared.available:
            return
        await self.publish()
        if self.max_size is None:
            return
        if await self.lease.hold(self.figures):
            await self.trim()

    # --- this node's reads ----------------------------------------------------------------

    async def publish(self, force: bool = False) -> bool:
        """Writes this node's access map when it changed (or as a heartbeat)."""
        if not self._loaded:
            # Reads of blobs evicted here before a restart still count.
            got = await self.shared.get_document(self.map_key, MAX_ACCESS_OBJECT)
            previous = parse_access_map(got[0]) if got is not None else None
            if previous is not None:
                self.reads = dict(previous.reads)
            self._loaded = True
        self.index.flush_access()
        for digest, at in self.index.last_accesses().items():
            if at > self.reads.get(digest, 0.0):
                self.reads[digest] = at
        if len(self.reads) > ACCESS_ENTRIES:
            keep = sorted(self.reads.items(), key=lambda kv: kv[1])[-ACCESS_ENTRIES:]
            self.reads = dict(keep)
        pinned = frozenset(self.graph.pinned())
        state = (hash(tuple(sorted(self.reads.items()))), pinned)
        self._since_written += 1
        if not force and state == self._published and self._since_written < HEARTBEAT_EVERY:
            return False
        document = {
            "node": self.me,
            "written": time.time(),
            "reads": {d: round(t, 3) for d, t in self.reads.items()},
            "pinned": sorted(pinned),
        }
        await self.shared.put_document(self.map_key, document)
        self._published, self._since_written = state, 0
        return True

    # --- the trim (lease holder only) ------------------------------------------------------

    async def trim(self) -> TrimPlan:
        assert self.max_size is not None
        started = time.time()
        blobs = [BucketBlob(d, s, m) async for d, s, m in self.shared.list_detailed()]
        maps: list[AccessMap] = []
        silent: list[str] = []
        async for key, size in self.shared.list_keys(ACCESS_DIR):
            if not key.endswith(".json") or size > MAX_ACCESS_OBJECT:
                continue
            got = await self.shared.get_document(key, MAX_ACCESS_OBJECT)
            access = parse_access_map(got[0]) if got is not None else None
            if access is None:
                continue
            maps.append(access)  # a silent node's reads and pins count until it is removed
            if access.node != self.me and started - access.written > SILENT_FOR:
                silent.append(key)
        pinned = set().union(*(m.pinned for m in maps))
        plan = plan_trim(blobs, merge_reads(maps), pinned, self.max_size)
        deleted = freed = 0
        for blob in plan.delete:
            ending = time.time() > self.lease.held_until() - self.interval / 2
            if ending and not await self.lease.hold(self.figures):
                log.warning("shared store trim: lease lost mid-trim; stopping")
                break
            await self.shared.delete(blob.digest)
            deleted += 1
            freed += blob.size
        for key in silent:
            await self.shared.delete_key(key)
            log.info("shared store: removed the access map %s (silent for long)", key)
        self.trims += 1
        self.figures = {
            "bucket_bytes": plan.total - freed,
            "bucket_blobs": len(blobs) - deleted,
            "pinned_bytes": plan.pinned_bytes,
            "nodes_mapped": len(maps) - len(silent),
            "trimmed_at": time.time(),
            "trimmed_below": plan.cut if deleted else self.lease.document.get("trimmed_below"),
            "deleted": deleted,
        }
        if deleted:
            log.info(
                "shared store trimmed: %d blobs (%d bytes) least recently read deleted; "
                "%d bytes in %d blobs left (shared_max_size %d)",
                deleted,
                freed,
                plan.total - freed,
                len(blobs) - deleted,
                self.max_size,
            )
        if plan.total - freed > self.max_size:
            log.warning(
                "shared store holds %d bytes over shared_max_size %d (pinned: %d bytes)",
                plan.total - freed - self.max_size,
                self.max_size,
                plan.pinned_bytes,
            )
        await self.lease.hold(self.figures)  # the figures for every node's status
        return plan

    # --- status ----------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        document = self.lease.document
        expires = document.get("expires")
        holder = document.get("holder") if isinstance(expires, int | float) else None
        live = holder is not None and float(expires) > time.time()  # type: ignore[arg-type]
        return {
            "holder": holder if live else None,
            "held_by_me": self.lease.mine and live,
            "expires": expires if live else None,
            "bucket_bytes": document.get("bucket_bytes"),
            "bucket_blobs": document.get("bucket_blobs"),
            "trimmed_at": document.get("trimmed_at"),
            "last_deleted": document.get("deleted"),
        }

    async def upload_floor(self) -> float | None:
        """The last read below which the trimmer deleted: a local blob not read since is
        not uploaded again by the rescan (it would be trimmed again, and look new)."""
        if self.max_size is None:
            return None
        current = await self.lease.read()
        if current is None:
            return None
        cut = current[0].get("trimmed_below")
        return float(cut) if isinstance(cut, int | float) else None

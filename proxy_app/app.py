"""The application: builds every part from the config, runs them, stops them cleanly.

This object is the only state the process has; everything else hangs off it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from . import __version__
from .admin import Admin, AdminSocket
from .blobs import FilesystemBlobStore
from .ca import CertificateAuthority
from .config import Config
from .context import CacheContext
from .index import Index
from .metrics import Metrics
from .peer_auth import peer_key
from .peers import Cluster, PeerSource
from .registry import RegistryProxy
from .server import ProxyServer
from .shared_store import SharedStore
from .shared_tier import SharedTier
from .shared_trim import SharedTrimmer
from .store_maintenance import STORE_ERRORS, StoreMaintenance
from .upstream import Upstream

log = logging.getLogger(__name__)

HOUSEKEEPING_INTERVAL = 10.0


class RegistryCacheApp:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.metrics = Metrics()
        self.executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="registry-cache-io")
        self.started_at = time.time()
        self.store: FilesystemBlobStore
        self.index: Index
        self.maintenance: StoreMaintenance
        self.registry: RegistryProxy
        self.server: ProxyServer
        self.upstream = Upstream(config, self.metrics)
        self.admin: Admin
        self.admin_socket: AdminSocket | None = None
        self.peer_source: PeerSource | None = None
        self.shared_tier: SharedTier | None = None  # store: {type: s3}
        self.trimmer: SharedTrimmer | None = None  # its access maps, lease and size bound
        self.cluster: Cluster | None = None
        self._housekeeping: asyncio.Task[None] | None = None

    async def start(self) -> None:
        cfg = self.config
        cfg.cache_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        ca = CertificateAuthority.load_or_create(cfg.ca_dir, cfg.ca_name_constraints)
        log.info("CA %s (sha256 %s)", cfg.ca_dir / "ca.crt", ca.fingerprint())
        cluster = Cluster(cfg) if cfg.peers else None  # a ConfigError before anything opens
        self.cluster = cluster
        self.store = FilesystemBlobStore(cfg.cache_dir)
        self.index, rebuilt = Index.open_or_rebuild(cfg.cache_dir / "index.sqlite3")
        self.maintenance = StoreMaintenance(cfg, self.store, self.index, self.metrics)
        self.maintenance.reconcile(rebuilt)
        await self.upstream.start()
        self.registry = RegistryProxy(
            CacheContext(
                cfg,
                self.store,
                self.index,
                self.upstream,
                self.metrics,
                self.executor,
                self.maintenance,
            )
        )
        if cfg.store.shared:
            # The bucket first: a blob any node stored is there, with no node to ask.
            await self._start_shared_tier()
        if cluster is not None:
            # The owner of a missing digest is asked next, before its registry (peers.py).
            self.peer_source = PeerSource(cfg, cluster, peer_key(ca.key))
            await self.peer_source.start()
            self.registry.blobs.sources.append(self.peer_source)
            log.info("cluster of %d nodes; this one is %s", len(cluster.nodes), cluster.me)
        self.metrics.max_size.set(cfg.max_size)
        self.admin = Admin(cfg, self.index, self.maintenance, self.registry.inflight)
        self.admin.apply_config_pins()
        self.admin.cluster_status = self.cluster_status
        if self.shared_tier is not None:
            self.admin.shared = self.shared_tier.shared
        self.server = ProxyServer(
            cfg,
            ca,
            self.registry,
            self.metrics,
            self.health,
            status=self.status,
            admin=self.admin.handle,
        )
        admin_socket = AdminSocket(cfg.admin_socket_path, self.admin.handle)
        try:
            await admin_socket.start()
            self.admin_socket = admin_socket
            await self.server.start()
        except OSError:
            if self.peer_source is not None:
                await self.peer_source.close()
            if self.trimmer is not None:
                await self.trimmer.close()
            if self.shared_tier is not None:
                await self.shared_tier.close()
            await self.server.close()
            await admin_socket.close()
            await self.upstream.close()
            self.index.close()
            raise
        self._housekeeping = asyncio.get_running_loop().create_task(self._housekeep())
        log.info(
            "registry-cache %s ready (cache %s, max_size %d bytes)",
            __version__,
            cfg.cache_dir,
            cfg.max_size,
        )

    async def _start_shared_tier(self) -> None:
        """The cluster's bucket behind the local store: asked on a miss before the
        registry, filled with every blob stored here, and holding the tag answers."""
        tier = SharedTier(
            SharedStore(self.config.store, self.executor),
            self.store,
            self.index,
            self.maintenance.remove,
        )
        trimmer = SharedTrimmer(
            tier.shared,
            self.index,
            self.maintenance.graph,
            self.node_name(),
            self.config.shared_max_size,
            self.config.shared_trim_interval,
        )
        tier.upload_floor = trimmer.upload_floor
        tier.downloads_idle = self.registry.inflight.idle
        await tier.start()
        self.shared_tier = tier
        trimmer.start()
        self.trimmer = trimmer
        self.maintenance.listeners.append(tier.stored)
        self.registry.blobs.sources.append(tier.source)
        self.registry.manifests.shared = tier.shared

    def node_name(self) -> str:
        """This node's name in the bucket's access maps and lease: its `peers` entry, else
        a name made at its first start and kept in cache_dir."""
        if self.cluster is not None:
            return self.cluster.me
        path = self.config.cache_dir / "node-name"
        try:
            name = path.read_text().strip()
        except FileNotFoundError:
            name = ""
        if not name:
            name = f"{socket.gethostname()}-{uuid.uuid4().hex[:8]}"
            path.write_text(name + "\n")
        return name

    async def _housekeep(self) -> None:
        while True:
            await asyncio.sleep(HOUSEKEEPING_INTERVAL)
            try:
                self.flush()
                self.maintenance.expire_inactive(self.registry.inflight)
                # Blobs pinned by readers when space was needed can go now.
                self.maintenance.make_room(0, self.registry.inflight)
            except STORE_ERRORS as e:
                # A full or failing disk, which blob stores report too: one line each
                # round, not a traceback.
                log.warning("housekeeping: cannot write to %s: %s", self.config.cache_dir, e)
            except Exception:
                log.exception("housekeeping failed; will try again")

    def flush(self) -> None:
        self.index.flush_access()
        stats, self.registry.pending_stats = self.registry.pending_stats, {}
        try:
            self.index.add_stats(stats)
        except STORE_ERRORS:
            # Kept for the next flush: the counts are not lost to a full disk.
            for key, value in stats.items():
                self.registry.pending_stats[key] = self.registry.pending_stats.get(key, 0) + value
            raise
        # `registry-cache gc` may have removed blobs behind our back: recount.
        self.maintenance.refresh_size()

    async def health(self) -> tuple[bool, dict[str, Any]]:
        writable = os.access(self.config.cache_dir, os.W_OK)
        status = "ok" if writable else "cache_dir not writable"
        shared: dict[str, Any] | None = None
        if self.shared_tier is not None:
            shared = self.shared_tier.health()
            if writable and not shared["reachable"]:
                # Still serving (local disk, upstream): 200, but say what is missing.
                status = "degraded"
                shared["reason"] = f"shared store unreachable: {shared['problem']}"
        details: dict[str, Any] = {
            "status": status,
            "version": __version__,
            "uptime_seconds": round(time.time() - self.started_at, 1),
            "cache_bytes": self.maintenance.size,
            "max_size": self.config.max_size,
            "inflight_fetches": len(self.registry.inflight),
        }
        if shared is not None:
            details["shared_store"] = shared
        return writable, details

    async def cluster_status(self) -> dict[str, Any]:
        """The shared store and the peers as this node sees them (`registry-cache status`,
        GET /admin/cluster). Never a credential."""
        cfg = self.config
        shared: dict[str, Any] | None = None
        if self.shared_tier is not None:
            shared = {
                "endpoint": cfg.store.endpoint,
                "bucket": cfg.store.bucket,
                "prefix": cfg.store.prefix,
                "reachable": self.shared_tier.shared.healthy,
                "problem": self.shared_tier.shared.problem,
                "shared_max_size": cfg.shared_max_size,
                "trim_interval": cfg.shared_trim_interval,
                "uploads_pending": len(self.shared_tier._queued),
            }
            if self.trimmer is not None:
                shared["node"] = self.trimmer.me
                shared["lease"] = self.trimmer.status()
        peers: list[dict[str, Any]] = []
        if self.cluster is not None:
            me = self.cluster.me

            async def look(node: str) -> dict[str, Any]:
                if node == me:
                    return {"node": node, "self": True, "reachable": True}
                return {"node": node, "self": False, "reachable": await reachable(node)}

            peers = list(await asyncio.gather(*(look(n) for n in self.cluster.nodes)))
        return {
            "node": self.trimmer.me if self.trimmer is not None else None,
            "shared_store": shared,
            "peers": peers,
        }

    def status(self) -> dict[str, Any]:
        """The status page's data (`GET /`, as HTML or JSON)."""
        now = self.metrics.activity.clock()
        return {
            "version": __version__,
            "generated_at": now,
            "uptime_seconds": round(time.time() - self.started_at, 1),
            "cache": {
                "bytes": self.maintenance.size,
                "max_size": self.config.max_size,
                "entries": self.index.count(),
            },
            **self.metrics.activity.snapshot(),
            "inflight": self.registry.inflight.progress(),
            "dockerhub": dict(self.metrics.dockerhub),
        }

    async def stop(self) -> None:
        if self._housekeeping is not None:
            self._housekeeping.cancel()
        await self.server.close()
        if self.admin_socket is not None:
            await self.admin_socket.close()
        await self.registry.close()
        if self.peer_source is not None:
            await self.peer_source.close()
        if self.trimmer is not None:
            await self.trimmer.close()
        if self.shared_tier is not None:
            await self.shared_tier.close()
        await self.upstream.close()
        self.flush()
        self.index.close()
        self.executor.shutdown(wait=False, cancel_futures=True)


async def reachable(node: str) -> bool:
    """Whether a peer's listener accepts a TCP connection within 2 s (host:port, [v6]:port)."""
    host, _, port = node.rpartition(":")
    try:
        async with asyncio.timeout(2.0):
            _reader, writer = await asyncio.open_connection(host.strip("[]"), int(port))
    except (OSError, TimeoutError, ValueError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


def quiet_tls_disconnects(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The event loop's exception handler. A client that goes away while TLS still has
    bytes for it makes the loop's TLS protocol report "Fatal error on SSL protocol" (uvloop
    with a RuntimeError on the closed handle, asyncio with a ConnectionError): a client
    leaving, not a fault of the cache, so one debug line, no traceback at ERROR. Anything
    else goes to the loop's default handler, traceback included."""
    error = context.get("exception")
    leaving = isinstance(error, ConnectionError) or (
        isinstance(error, RuntimeError) and "handler is closed" in str(error)
    )
    if str(context.get("message", "")).startswith("Fatal error on SSL") and leaving:
        log.debug("a client left while its TLS connection was written to: %s", error)
        return
    loop.default_exception_handler(context)


async def serve(config: Config) -> None:
    app = RegistryCacheApp(config)
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(quiet_tls_disconnects)
    await app.start()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping")
    await app.stop()

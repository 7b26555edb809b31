"""Prometheus metrics, kept in a registry of the app's own (no process-wide state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

CONTENT_TYPE = CONTENT_TYPE_LATEST


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "registry_cache_requests",
            "Requests answered, by kind (blob, manifest, tag, other, push, connect, tunnel)"
            " and result (hit, miss, stale, pass, denied), and the front door the client"
            " came by (connect, mirror)",
            ["kind", "result", "door"],
            registry=r,
        )
        self.bytes = Counter(
            "registry_cache_bytes",
            "Body bytes sent to clients, by where they came from",
            ["source"],
            registry=r,
        )
        self.size = Gauge("registry_cache_size_bytes", "Bytes held in the blob store", registry=r)
        self.entries = Gauge("registry_cache_entries", "Blobs held in the blob store", registry=r)
        self.evictions = Counter(
            "registry_cache_evictions", "Blobs removed to respect max_size or inactive", registry=r
        )
        self.upstream_errors = Counter(
            "registry_cache_upstream_errors",
            "Upstream requests that failed (connection, timeout, 5xx, bad digest)",
            registry=r,
        )
        self.inflight = Gauge(
            "registry_cache_inflight_fetches", "Upstream blob fetches under way", registry=r
        )
        self.access_checks = Counter(
            "registry_cache_access_checks",
            "Questions to upstream whether a client may read a repository"
            " (verify_client_access), by answer (granted, refused)",
            ["result"],
            registry=r,
        )
        self.store_errors = Counter(
            "registry_cache_store_errors",
            "Blobs that could not be stored (disk full, I/O error) and were served through",
            registry=r,
        )

        self.store_unavailable = Gauge(
            "registry_cache_store_unavailable",
            "1 while blobs cannot be stored (disk full, I/O error), else 0",
            registry=r,
        )

        self.connections = Gauge(
            "registry_cache_client_connections", "Client connections open", registry=r
        )

    def render(self) -> bytes:
        return generate_latest(self.registry)

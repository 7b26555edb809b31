"""Prometheus metrics, kept in a registry of the app's own (no process-wide state).

Every event goes through one method here, which counts it for /metrics and records it in
the app's Activity (activity.py, the status page's data): the page and /metrics agree
because they are fed by the same calls.

The `registry` label is bounded: the first MAX_REGISTRY_LABELS registries seen by the
registry API get a label of their own, later ones share `other`; Docker Hub, under any
of its names, is `docker.io`.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .activity import Activity
from .registry_names import DOCKER_HUB, display_name

CONTENT_TYPE = CONTENT_TYPE_LATEST
MAX_REGISTRY_LABELS = 50
OTHER = "other"
STATUS_CLASSES = ("2xx", "3xx", "4xx", "5xx")
FETCH_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800)
_RATELIMIT = re.compile(r"\s*(\d+)\s*(?:;.*)?")


registry_name = display_name  # a registry as the metrics and the status page name it


class RegistryLabels:
    """The registry label values: the first `limit` registries claimed, then `other`."""

    def __init__(self, limit: int = MAX_REGISTRY_LABELS) -> None:
        self.limit = limit
        self._names: set[str] = set()

    def __call__(self, netloc: str, claim: bool = True) -> str:
        """The label of `netloc`; one not seen yet takes a free label only with `claim`
        (registry API traffic), so that tunnels and refused CONNECTs cannot use them up."""
        name = registry_name(netloc)
        if name in self._names:
            return name
        if claim and name and len(self._names) < self.limit:
            self._names.add(name)
            return name
        return OTHER


def status_class(status: int | None) -> str:
    if status is None or not 200 <= status < 600:
        return "error"
    return f"{status // 100}xx"


def ratelimit_value(header: str | None) -> int | None:
    """The count of Docker Hub's `ratelimit-remaining: 76;w=21600` (None when absent)."""
    m = _RATELIMIT.fullmatch(header or "")
    return int(m.group(1)) if m else None


class Metrics:
    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self.registry = CollectorRegistry()
        self.registries = RegistryLabels()
        self.activity = Activity(clock)
        r = self.registry
        self.requests = Counter(
            "registry_cache_requests",
            "Requests answered, by kind (blob, manifest, tag, other, push, connect, tunnel)"
            " and result (hit, miss, stale, pass, denied), the front door the client"
            " came by (connect, mirror), and the registry",
            ["kind", "result", "door", "registry"],
            registry=r,
        )
        self.bytes = Counter(
            "registry_cache_bytes",
            "Body bytes sent to clients, by where they came from (cache, upstream) and registry",
            ["source", "registry"],
            registry=r,
        )
        self.bytes_saved = Counter(
            "registry_cache_bytes_saved",
            "Body bytes sent to clients that upstream did not send for them: from the store,"
            " or from a download another client's request started",
            ["registry"],
            registry=r,
        )
        self.size = Gauge("registry_cache_size_bytes", "Bytes held in the blob store", registry=r)
        self.max_size = Gauge(
            "registry_cache_max_size_bytes",
            "The size bound of the blob store (max_size)",
            registry=r,
        )
        self.entries = Gauge("registry_cache_entries", "Blobs held in the blob store", registry=r)
        self.evictions = Counter(
            "registry_cache_evictions", "Blobs removed to respect max_size or inactive", registry=r
        )
        self.upstream_errors = Counter(
            "registry_cache_upstream_errors",
            "Upstream requests that failed (connection, timeout, 5xx, bad digest), by registry",
            ["registry"],
            registry=r,
        )
        self.upstream_responses = Counter(
            "registry_cache_upstream_responses",
            "Answers of upstream registries, by status class (2xx, 3xx, 4xx, 5xx, or error:"
            " no answer)",
            ["registry", "status_class"],
            registry=r,
        )
        self.token_requests = Counter(
            "registry_cache_token_requests",
            "Bearer tokens the cache needed for mirror requests, by result (cached: one it"
            " held or was getting already; fetched; refused: the realm gave none; error: the"
            " realm could not be reached)",
            ["registry", "result"],
            registry=r,
        )
        self.fetch_duration = Histogram(
            "registry_cache_fetch_duration_seconds",
            "Upstream blob downloads, from the request to the verified last byte",
            ["registry"],
            buckets=FETCH_BUCKETS,
            registry=r,
        )
        # Exported once Docker Hub has said them: a 0 before would read as "none left".
        self.dockerhub_remaining = Gauge(
            "registry_cache_dockerhub_ratelimit_remaining",
            "Docker Hub pulls left in its window (ratelimit-remaining of its last manifest answer)",
            registry=None,
        )
        self.dockerhub_limit = Gauge(
            "registry_cache_dockerhub_ratelimit_limit",
            "Docker Hub's pull limit for its window (ratelimit-limit)",
            registry=None,
        )
        self.dockerhub: dict[str, int | float] = {}  # the same, with the time it was seen
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

    # --- events: each counted here and recorded in the activity -------------------------

    def request(
        self,
        netloc: str,
        kind: str,
        result: str,
        door: str,
        repository: str = "",
        note: str = "",
    ) -> None:
        """One answered request (`result` in lower case)."""
        label = self.registries(netloc, claim=kind not in ("connect", "tunnel"))
        self.requests.labels(kind, result, door, label).inc()
        self.activity.request(label, repository, kind, result, note)

    def sent(self, netloc: str, source: str, size: int, repository: str = "") -> None:
        """Body bytes sent to a client, from `source` (cache or upstream)."""
        label = self.registries(netloc)
        self.bytes.labels(source, label).inc(size)
        self.activity.sent(label, source, size, repository)
        if source == "cache":
            self.saved(netloc, size)

    def saved(self, netloc: str, size: int) -> None:
        label = self.registries(netloc)
        self.bytes_saved.labels(label).inc(size)
        self.activity.saved(label, size)

    def upstream_error(self, netloc: str, message: str, what: str = "") -> None:
        label = self.registries(netloc)
        self.upstream_errors.labels(label).inc()
        self.activity.upstream_error(label, what, message)

    def upstream_answer(self, netloc: str, status: int | None) -> None:
        """An upstream answer's status, or None when none came."""
        self.upstream_responses.labels(self.registries(netloc), status_class(status)).inc()

    def token(self, netloc: str, result: str) -> None:
        self.token_requests.labels(self.registries(netloc), result).inc()

    def fetched(self, netloc: str, seconds: float) -> None:
        self.fetch_duration.labels(self.registries(netloc)).observe(seconds)

    def dockerhub_answer(self, host: str, headers: Mapping[str, str]) -> None:
        """Docker Hub's pull limit, from the headers of its manifest answers."""
        if host.lower() != DOCKER_HUB:
            return
        remaining = ratelimit_value(headers.get("ratelimit-remaining"))
        limit = ratelimit_value(headers.get("ratelimit-limit"))
        if remaining is not None:
            self.dockerhub_remaining.set(remaining)
            self.dockerhub["remaining"] = remaining
        if limit is not None:
            self.dockerhub_limit.set(limit)
            self.dockerhub["limit"] = limit
        if remaining is not None or limit is not None:
            if "seen_at" not in self.dockerhub:
                self.registry.register(self.dockerhub_remaining)
                self.registry.register(self.dockerhub_limit)
            self.dockerhub["seen_at"] = self.activity.clock()

    def render(self) -> bytes:
        return generate_latest(self.registry)

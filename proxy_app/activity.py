"""What happened recently, per registry: the data of the status page (`GET /`).

Fed by the same events as the Prometheus counters (metrics.py calls it from each of its
event methods), so the page and /metrics agree. Everything here is bounded: a per-minute
history of one day (HISTORY_MINUTES buckets), one row per registry label (which
metrics.RegistryLabels caps), the TOP_TRACKED busiest repositories, and the last
RECENT_EVENTS STALE answers and upstream errors.

Hit ratio, here as in `registry-cache status`: answers from the cache (HIT and STALE)
over all cacheable answers (HIT, MISS, STALE) of blobs, manifests and tags.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

HISTORY_MINUTES = 1440  # one day of per-minute buckets
HOUR, DAY = 60, 1440  # windows of the page, in minutes
CACHEABLE_KINDS = frozenset({"blob", "manifest", "tag"})
TOP_TRACKED = 200  # repositories counted at once; the least busy goes when a new one comes
TOP_SHOWN = 10
RECENT_EVENTS = 50
MAX_TEXT = 300  # characters kept of a name or message that came from a client or upstream


def _short(text: str) -> str:
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 1] + "…"


def ratio(hits: int, stales: int, misses: int) -> float | None:
    served = hits + stales + misses
    return round((hits + stales) / served, 4) if served else None


@dataclass
class Counts:
    """Requests and bytes: of one minute, one window, or one registry."""

    requests: int = 0
    hits: int = 0
    misses: int = 0
    stales: int = 0
    bytes_cache: int = 0
    bytes_upstream: int = 0
    bytes_saved: int = 0
    errors: int = 0

    def add_request(self, kind: str, result: str) -> None:
        self.requests += 1
        if kind in CACHEABLE_KINDS:
            if result == "hit":
                self.hits += 1
            elif result == "miss":
                self.misses += 1
            elif result == "stale":
                self.stales += 1

    def add(self, other: Counts) -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)

    @property
    def hit_ratio(self) -> float | None:
        return ratio(self.hits, self.stales, self.misses)

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "hit_ratio": self.hit_ratio}


@dataclass
class RegistryActivity(Counts):
    last_error: str = ""
    last_error_at: float | None = None


@dataclass
class Event:
    at: float
    registry: str
    what: str  # the repository, or the request
    message: str


@dataclass
class Repository:
    registry: str
    name: str
    requests: int = 0
    bytes: int = 0


@dataclass
class Activity:
    """The recent past; `clock` is wall time in seconds (tests pass their own)."""

    clock: Callable[[], float] = time.time
    started: float = field(init=False)
    _minutes: dict[int, Counts] = field(default_factory=dict, init=False)
    registries: dict[str, RegistryActivity] = field(default_factory=dict, init=False)
    repositories: dict[tuple[str, str], Repository] = field(default_factory=dict, init=False)
    stale: deque[Event] = field(default_factory=lambda: deque(maxlen=RECENT_EVENTS), init=False)
    errors: deque[Event] = field(default_factory=lambda: deque(maxlen=RECENT_EVENTS), init=False)

    def __post_init__(self) -> None:
        self.started = self.clock()

    # --- events (from metrics.Metrics) ---------------------------------------------------

    def _now(self) -> tuple[float, Counts]:
        now = self.clock()
        minute = int(now // 60)
        bucket = self._minutes.get(minute)
        if bucket is None:
            bucket = self._minutes[minute] = Counts()
            oldest = minute - HISTORY_MINUTES
            for old in [m for m in self._minutes if m <= oldest]:
                del self._minutes[old]
        return now, bucket

    def _registry(self, registry: str) -> RegistryActivity:
        row = self.registries.get(registry)
        if row is None:
            row = self.registries[registry] = RegistryActivity()
        return row

    def request(
        self, registry: str, repository: str, kind: str, result: str, note: str = ""
    ) -> None:
        now, bucket = self._now()
        bucket.add_request(kind, result)
        self._registry(registry).add_request(kind, result)
        if repository:
            self._count_repository(registry, repository)
        if result == "stale":
            self.stale.append(Event(now, registry, _short(repository), _short(note)))

    def sent(self, registry: str, source: str, size: int, repository: str = "") -> None:
        _, bucket = self._now()
        row = self._registry(registry)
        for counts in (bucket, row):
            if source == "cache":
                counts.bytes_cache += size
            else:
                counts.bytes_upstream += size
        if repository:
            repo = self.repositories.get((registry, repository))
            if repo is not None:
                repo.bytes += size

    def saved(self, registry: str, size: int) -> None:
        _, bucket = self._now()
        bucket.bytes_saved += size
        self._registry(registry).bytes_saved += size

    def upstream_error(self, registry: str, what: str, message: str) -> None:
        now, bucket = self._now()
        bucket.errors += 1
        row = self._registry(registry)
        row.errors += 1
        row.last_error, row.last_error_at = _short(message), now
        self.errors.append(Event(now, registry, _short(what), _short(message)))

    def _count_repository(self, registry: str, name: str) -> None:
        key = (registry, _short(name))
        repo = self.repositories.get(key)
        if repo is None:
            if len(self.repositories) >= TOP_TRACKED:
                # The least busy makes room (it may come back, counted from one again).
                least = min(self.repositories, key=lambda k: self.repositories[k].requests)
                del self.repositories[least]
            repo = self.repositories[key] = Repository(registry, key[1])
        repo.requests += 1

    # --- reading ---------------------------------------------------------------------------

    def window(self, minutes: int) -> Counts:
        """The sums of the last `minutes` minutes, the current one included."""
        current = int(self.clock() // 60)
        total = Counts()
        for minute, counts in self._minutes.items():
            if current - minutes < minute <= current:
                total.add(counts)
        return total

    def history(self, minutes: int, step: int = 1) -> list[dict[str, Any]]:
        """The last `minutes` minutes in slots of `step` minutes, oldest first (empty
        slots included), each with its start time."""
        current = int(self.clock() // 60)
        first = current - minutes + 1
        slots = [Counts() for _ in range(-(-minutes // step))]
        for minute, counts in self._minutes.items():
            if first <= minute <= current:
                slots[(minute - first) // step].add(counts)
        return [
            {"start": (first + i * step) * 60, **slot.as_dict()} for i, slot in enumerate(slots)
        ]

    def top_repositories(self, count: int = TOP_SHOWN) -> list[Repository]:
        ranked = sorted(self.repositories.values(), key=lambda r: (-r.requests, -r.bytes))
        return ranked[:count]

    def snapshot(self) -> dict[str, Any]:
        def events(queue: deque[Event]) -> list[dict[str, Any]]:
            return [asdict(e) for e in reversed(queue)]  # the newest first

        return {
            "last_hour": self.window(HOUR).as_dict(),
            "last_day": self.window(DAY).as_dict(),
            "history_hour": self.history(HOUR),
            "history_day": self.history(DAY, 60),
            "registries": {name: row.as_dict() for name, row in sorted(self.registries.items())},
            "top_repositories": [asdict(r) for r in self.top_repositories()],
            "recent_stale": events(self.stale),
            "recent_errors": events(self.errors),
        }

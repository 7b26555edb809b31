"""The parts a request handler works with, built once by the app and shared."""

from __future__ import annotations

from concurrent.futures import Executor
from dataclasses import dataclass

from .blobs import BlobStore
from .config import Config
from .index import Index
from .metrics import Metrics
from .store_maintenance import StoreMaintenance
from .upstream import Upstream


@dataclass(frozen=True)
class CacheContext:
    config: Config
    store: BlobStore
    index: Index
    upstream: Upstream
    metrics: Metrics
    executor: Executor  # blocking file I/O runs here, never on the event loop
    maintenance: StoreMaintenance

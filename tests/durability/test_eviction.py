"""Issue 5, Must show 1: storing past max_size keeps the store at or below it, evicts the
least recently used blobs first, and never removes a blob that a client is being sent."""

from __future__ import annotations

import pytest
from support.durability import (
    PausingReader,
    blob_path,
    get_blob,
    random_blob,
    store_bytes,
    stored_blobs,
    wait_stored,
)
from support.registry import Registry, wait_until

pytestmark = pytest.mark.integration

MAX_SIZE = 5 * 1024 * 1024  # max_size: 5m


def test_lru_eviction_keeps_store_within_max_size(registry: Registry, proxy_factory):
    repo = "durable/lru"
    blobs = [random_blob(registry, repo, 1_100_000) for _ in range(8)]
    proxy = proxy_factory(max_size="5m")

    def get(i: int, expect: str) -> None:
        r = get_blob(proxy, registry.hostname, registry.port, repo, blobs[i])
        assert r.status == 200, f"blob {i}: {r.status} {r.text()[:300]}"
        assert r.complete and r.sha256 == blobs[i], f"blob {i}: wrong bytes ({r.error})"
        assert r.cache == expect, f"blob {i}: {r.cache}, expected {expect}"
        if expect == "MISS":
            assert wait_stored(proxy, blobs[i]), f"blob {i} was not stored"
        total = store_bytes(proxy.cache_dir)
        assert total <= MAX_SIZE, f"store holds {total} bytes after blob {i}, max {MAX_SIZE}"

    def survivors() -> set[int]:
        held = stored_blobs(proxy.cache_dir)
        return {i for i, d in enumerate(blobs) if d in held}

    for i in range(4):  # 4.4 MB: fits
        get(i, "MISS")
    assert survivors() == {0, 1, 2, 3}
    get(0, "HIT")
    get(2, "HIT")  # least recently used first: 1, 3, 0, 2
    get(4, "MISS")  # 5.5 MB would not fit: 1 goes
    assert survivors() == {0, 2, 3, 4}
    get(5, "MISS")  # then 3
    assert survivors() == {0, 2, 4, 5}
    get(0, "HIT")  # 2, 4, 5, 0
    get(6, "MISS")
    assert survivors() == {0, 4, 5, 6}
    get(7, "MISS")
    assert survivors() == {0, 5, 6, 7}

    assert proxy.metric("registry_cache_evictions_total") == 4
    assert proxy.metric("registry_cache_entries") == 4
    assert proxy.metric("registry_cache_size_bytes") == store_bytes(proxy.cache_dir)
    # an evicted blob is gone for good: fetched again, whole
    get(1, "MISS")


def test_blob_sent_to_a_slow_client_is_not_evicted(registry: Registry, proxy_factory):
    # The blob must be larger than what the kernel and the proxy's buffers can hold
    # (a few MB on loopback), or the proxy is done sending it before the client is.
    repo = "durable/pinned"
    max_size = 14 * 1024 * 1024
    big_size = 10_000_000
    big = random_blob(registry, repo, big_size)
    small = [random_blob(registry, repo, 2_500_000) for _ in range(3)]
    proxy = proxy_factory(max_size="14m")

    def get(digest: str, expect: str) -> None:
        r = get_blob(proxy, registry.hostname, registry.port, repo, digest)
        assert r.status == 200 and r.complete and r.sha256 == digest, (r.status, r.error)
        assert r.cache == expect
        if expect == "MISS":
            assert wait_stored(proxy, digest), f"{digest} was not stored"
        total = store_bytes(proxy.cache_dir)
        assert total <= max_size, f"store holds {total} bytes, max {max_size}"

    get(big, "MISS")
    get(small[0], "MISS")  # 12.5 MB stored
    slow = PausingReader(proxy, registry.hostname, registry.port, f"/v2/{repo}/blobs/{big}")
    slow.start()
    assert slow.status == 200 and slow.headers.get("x-registry-cache") == "HIT"
    get(small[0], "HIT")  # now `big` is the least recently used blob
    get(small[1], "MISS")  # 15 MB would not fit: `big` is first in line, but being read
    held = stored_blobs(proxy.cache_dir)
    assert big in held, "the blob a client is reading was evicted"
    assert small[0] not in held, "the next least recently used blob should have gone instead"
    get(small[2], "MISS")
    held = stored_blobs(proxy.cache_dir)
    assert big in held and small[1] not in held
    # the reader is really still in the middle of its response: not logged yet
    assert proxy.results_for(big) == ["MISS"], "the slow response ended early; test is void"
    assert slow.received < big_size

    slow.resume()
    assert slow.complete, f"slow client: {slow.error} after {slow.received} bytes"
    assert slow.sha256 == big
    # logged once the proxy's handler is done with it (and has let go of the blob)
    assert wait_until(lambda: proxy.results_for(big) == ["MISS", "HIT"]), proxy.results_for(big)
    # once the reader is gone, `big` is again the first to go
    get(small[0], "MISS")
    assert not blob_path(proxy.cache_dir, big).exists(), "unpinned LRU blob was not evicted"

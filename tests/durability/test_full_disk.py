"""Issue 5, Must show 4: the cache dir on a small tmpfs that fills up. Pulls of blobs
bigger than the free space still succeed (served through from upstream, readers of a
shared fetch continue by Range), nothing partial remains, the condition is logged once
and shown in /metrics, and once space is freed new blobs are stored again."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.client import afetch
from support.durability import get_blob, random_blob, stored_blobs, tmp_files, wait_stored
from support.registry import Registry
from support.servers import AioThread, ThrottledRelay

pytestmark = pytest.mark.integration

FULL_LOG = "cannot store blobs"


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 20 MB tmpfs (needs root: CI runs as root)."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=20m,mode=0755", "tmpfs", str(mnt)], check=True
    )
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], check=False)


def free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def fill(path: Path, leave: int) -> Path:
    """A file that takes all but `leave` bytes of the file system."""
    filler = path / "filler"
    size = free_bytes(path) - leave
    with filler.open("wb") as f:
        os.posix_fallocate(f.fileno(), 0, size)
    return filler


def test_full_disk_serves_through_and_recovers(
    small_disk: Path,
    registry: Registry,
    aio: AioThread,
    upstream_ports: set[int],
    proxy_factory,
):
    repo = "durable/full"
    small = random_blob(registry, repo, 2_000_000)
    big = random_blob(registry, repo, 8_000_000)
    later = random_blob(registry, repo, 3_000_000)
    relay = ThrottledRelay(aio, registry.port, rate=8e6).start()  # ~1 s for `big`
    upstream_ports.add(relay.port)
    # max_size far above the tmpfs: eviction cannot make room, the disk runs out first
    proxy = proxy_factory(cache_dir=str(small_disk / "cache"), max_size="1g")
    cache = proxy.cache_dir
    try:

        def get(digest: str, host: str = registry.hostname, port: int = registry.port):
            r = get_blob(proxy, host, port, repo, digest)
            assert r.status == 200, r.text()[:300]
            assert r.complete and r.sha256 == digest, f"wrong or cut blob: {r.error}"
            return r

        assert get(small).cache == "MISS"
        assert wait_stored(proxy, small)
        assert get(small).cache == "HIT"
        assert proxy.metric("registry_cache_store_unavailable") == 0

        filler = fill(small_disk, leave=3 << 20)  # 3 MB free: `big` cannot be stored

        # three clients at once on one shared fetch that runs out of space half-way
        async def three() -> list:
            return list(
                await asyncio.gather(
                    *(
                        afetch(
                            proxy.port,
                            str(proxy.ca_path),
                            "slow.rc.test",
                            relay.port,
                            "GET",
                            f"/v2/{repo}/blobs/{big}",
                            timeout=120,
                        )
                        for _ in range(3)
                    )
                )
            )

        for i, r in enumerate(asyncio.run(three())):
            assert r.status == 200, f"client {i}: {r.status} {r.text()[:300]}"
            assert r.complete and r.received == 8_000_000, f"client {i}: {r.error}"
            assert r.sha256 == big, f"client {i}: wrong bytes"
        assert big not in stored_blobs(cache), "a blob was stored in a full store?"
        assert tmp_files(cache) == [], f"partial files left: {tmp_files(cache)}"
        assert proxy.metric("registry_cache_store_unavailable") == 1
        assert proxy.metric("registry_cache_store_errors_total") >= 1

        # still full: served through again, still whole, and not logged a second time
        assert get(big).cache == "MISS"
        assert get(small).cache == "HIT"  # what is stored is still served
        assert big not in stored_blobs(cache) and tmp_files(cache) == []
        assert len(proxy.log_lines(FULL_LOG)) == 1, proxy.log_lines(FULL_LOG)
        assert proxy.metric("registry_cache_store_unavailable") == 1

        filler.unlink()  # space returns
        assert get(later).cache == "MISS"
        assert wait_stored(proxy, later), "storing did not resume after space came back"
        assert get(later).cache == "HIT"
        assert proxy.metric("registry_cache_store_unavailable") == 0
        assert get(big).cache == "MISS"
        assert wait_stored(proxy, big)
        assert get(big).cache == "HIT"
        assert tmp_files(cache) == []
        assert len(proxy.log_lines(FULL_LOG)) == 1
    finally:
        relay.stop()
        proxy.stop()  # before the tmpfs goes


def test_full_disk_while_access_times_wait_to_be_written(
    small_disk: Path, registry: Registry, proxy_factory
):
    """Making room for a blob writes the pending access times to the index first. On a
    full disk that write fails: the blob is then served through like any other that cannot
    be stored (the client never waits on it), and the access times are kept, not lost."""
    repo = "durable/pending"
    kept = random_blob(registry, repo, 1_000_000)
    new = random_blob(registry, repo, 3_000_000)
    proxy = proxy_factory(cache_dir=str(small_disk / "cache"), max_size="1g")
    cache = proxy.cache_dir
    try:

        def get(digest: str):
            r = get_blob(proxy, registry.hostname, registry.port, repo, digest, timeout=30)
            assert r.status == 200, r.text()[:300]
            assert r.complete and r.sha256 == digest, f"wrong or cut blob: {r.error}"
            return r

        assert get(kept).cache == "MISS"
        assert wait_stored(proxy, kept)
        assert get(kept).cache == "HIT"  # its access time now waits for the next flush
        # Full to the last byte, so that the index cannot grow either. This lasts well
        # under a second, seconds before the proxy's first housekeeping (10 s after start).
        filler = fill(small_disk, leave=0)
        assert get(new).cache == "MISS"
        assert proxy.metric("registry_cache_store_unavailable") == 1
        assert new not in stored_blobs(cache) and tmp_files(cache) == []
        filler.unlink()
    finally:
        proxy.stop()  # flushes the access times; before the tmpfs goes
    index = sqlite3.connect(cache / "index.sqlite3")
    try:
        stored_at, last_access = index.execute(
            "SELECT stored_at, last_access FROM blobs WHERE digest=?", (kept,)
        ).fetchone()
        indexed = {d for (d,) in index.execute("SELECT digest FROM blobs")}
    finally:
        index.close()
    assert last_access > stored_at, "the access time of the HIT was lost"
    assert indexed == set(stored_blobs(cache)) == {kept}

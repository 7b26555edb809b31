"""Issue 5, Must show 2: `kill -9` of the server in the middle of a 200 MB blob fetch,
then a restart: tmp/ is empty, no partial blob is stored or served, and the next pull
fetches the blob again and gets it whole."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading

import pytest
from support.client import Response, afetch, fetch
from support.durability import blob_path, kill9, stored_blobs, tmp_files
from support.registry import Registry, wait_until
from support.servers import AioThread, ThrottledRelay

pytestmark = pytest.mark.integration

SIZE = 200 * 1000 * 1000
RATE = 50e6  # bytes/s from the registry to the proxy: the fetch would take ~4 s


def test_kill9_mid_fetch_then_restart(
    registry: Registry, aio: AioThread, upstream_ports: set[int], proxy_factory
):
    repo = "durable/crash"
    # unique per run, cheap to make: a random MB repeated (its digest is what matters)
    data = (os.urandom(1 << 20) * (SIZE // (1 << 20) + 1))[:SIZE]
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    registry.upload_blob(repo, data, digest)
    del data
    relay = ThrottledRelay(aio, registry.port, rate=RATE).start()
    upstream_ports.add(relay.port)
    path = f"/v2/{repo}/blobs/{digest}"
    try:
        proxy = proxy_factory()
        cache = proxy.cache_dir

        def get() -> Response:
            return asyncio.run(
                afetch(
                    proxy.port,
                    str(proxy.ca_path),
                    "slow.rc.test",
                    relay.port,
                    "GET",
                    path,
                    timeout=120,
                    keep_body=False,
                )
            )

        first: list[Response] = []
        client = threading.Thread(target=lambda: first.append(get()), daemon=True)
        client.start()

        def partial() -> int:
            return max((p.stat().st_size for p in tmp_files(cache)), default=0)

        assert wait_until(lambda: partial() > SIZE // 4, timeout=30), "the fetch never started"
        kill9(proxy)
        client.join(30)
        assert first, "the client never returned"
        cut = first[0]
        assert cut.status == 200 and not cut.complete, "the client took a cut blob for whole"
        assert 0 < cut.received < SIZE
        left = tmp_files(cache)
        assert left and all(p.stat().st_size < SIZE for p in left), "no partial file: test void"
        assert digest not in stored_blobs(cache)

        proxy.start()
        assert tmp_files(cache) == [], f"tmp/ not emptied at start: {tmp_files(cache)}"
        assert digest not in stored_blobs(cache), "a partial blob got into the store"
        upstream_gets = len(registry.blob_requests(digest))

        relay.rate = 1e9  # the second fetch need not be slow
        again = get()
        assert again.status == 200, again.text()[:300]
        assert again.cache == "MISS", "served from the store without being fetched again"
        assert again.complete and again.received == SIZE
        assert again.sha256 == digest
        assert len(registry.blob_requests(digest)) == upstream_gets + 1
        # The client has every byte once the hash matches; the flush and rename follow.
        assert wait_until(lambda: stored_blobs(cache).get(digest) == SIZE, timeout=10)
        assert tmp_files(cache) == []

        on_disk = hashlib.sha256(blob_path(cache, digest).read_bytes()).hexdigest()
        assert f"sha256:{on_disk}" == digest
        head = fetch(proxy.port, str(proxy.ca_path), registry.hostname, registry.port, "HEAD", path)
        assert head.status == 200 and head.cache == "HIT"
    finally:
        relay.stop()

"""Must show 4: 20 clients, one cold 100 MB blob, one upstream fetch, streamed to all."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time

import pytest
from support.client import afetch
from support.registry import Registry
from support.servers import AioThread, ThrottledRelay

pytestmark = pytest.mark.integration

SIZE = 100 * 1000 * 1000
CLIENTS = 20
RATE = 40e6  # bytes/s between the proxy and the registry: the fetch takes ~2.5 s


def test_twenty_clients_one_upstream_fetch(
    registry: Registry, aio: AioThread, upstream_ports: set[int], proxy_factory
):
    repo = "pub/big"
    data = os.urandom(SIZE)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    registry.upload_blob(repo, data, digest)
    del data
    relay = ThrottledRelay(aio, registry.port, rate=RATE).start()
    upstream_ports.add(relay.port)
    try:
        proxy = proxy_factory()
        path = f"/v2/{repo}/blobs/{digest}"

        async def one() -> object:
            return await afetch(
                proxy.port,
                str(proxy.ca_path),
                "slow.rc.test",
                relay.port,
                "GET",
                path,
                timeout=180,
                keep_body=False,
            )

        async def all_clients() -> list:
            return list(await asyncio.gather(*(one() for _ in range(CLIENTS))))

        started = time.monotonic()
        results = asyncio.run(all_clients())
        elapsed = time.monotonic() - started
    finally:
        relay.stop()

    for i, r in enumerate(results):
        assert r.status == 200, f"client {i}: {r.status} {r.text()[:300]}"
        assert r.complete, f"client {i}: {r.error}"
        assert r.received == SIZE, f"client {i}: {r.received} bytes"
        assert r.sha256 == digest, f"client {i}: wrong bytes"

    gets = registry.blob_requests(digest)
    assert len(gets) == 1, f"upstream GETs of the blob: {gets}"
    big = [c for c in relay.conns if c.down >= SIZE]
    assert len(big) == 1, f"connections that carried the blob: {len(big)}"
    fetch_ended = big[0].last_down
    fetch_took = fetch_ended - big[0].opened
    assert fetch_took > 1.5, f"the relay did not throttle ({fetch_took:.2f}s)"
    late = [
        (i, round(r.first_byte_at - fetch_ended, 2))
        for i, r in enumerate(results)
        if r.first_byte_at is None or r.first_byte_at >= fetch_ended
    ]
    assert not late, f"clients whose first byte came after the upstream fetch ended: {late}"
    print(f"20 x 100 MB: {elapsed:.1f}s total, upstream fetch {fetch_took:.1f}s")


def test_many_clients_one_upstream_request_per_cold_manifest(
    registry: Registry, image_factory, proxy_factory
):
    """A fleet asking at once for a tag (and its manifest by digest) not yet cached costs
    one upstream request each, not one per client."""
    repo = "pub/herd"
    img = image_factory(f"{registry.netloc}/{repo}:v1", [2048])
    proxy = proxy_factory()
    accept = {"Accept": "application/vnd.oci.image.manifest.v1+json"}

    async def ask(path: str) -> list:
        return list(
            await asyncio.gather(
                *(
                    afetch(
                        proxy.port,
                        str(proxy.ca_path),
                        "registry.rc.test",
                        registry.port,
                        "GET",
                        path,
                        accept,
                    )
                    for _ in range(CLIENTS)
                )
            )
        )

    before = [r.uri for r in registry.requests()]
    paths = {f"/v2/{repo}/manifests/v1": 1, f"/v2/{repo}/manifests/{img.manifest_digest}": 0}
    for path, misses in paths.items():
        results = asyncio.run(ask(path))
        assert all(r.status == 200 for r in results), [r.status for r in results]
        assert {r.sha256 for r in results} == {img.manifest_digest}
        assert [r.cache for r in results].count("MISS") == misses
    after = [r.uri for r in registry.requests()][len(before) :]
    manifest_gets = [u for u in after if "/manifests/" in u]
    assert len(manifest_gets) == 1, manifest_gets  # the digest was stored by the tag fetch

"""Must show 5: upstream bytes that do not match the digest are never stored or served."""

from __future__ import annotations

import hashlib
import os
import time

import pytest
from support.client import fetch
from support.registry import Registry

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("size", [3_000, 3_000_000])
def test_corrupt_upstream_blob(size: int, registry: Registry, proxy_factory):
    repo = f"pub/corrupt{size}"
    data = os.urandom(size)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    registry.upload_blob(repo, data, digest)
    stored = registry.blob_data_path(digest)
    assert stored.read_bytes() == data
    stored.write_bytes(os.urandom(size))  # same length, other bytes

    proxy = proxy_factory()
    path = f"/v2/{repo}/blobs/{digest}"
    args = (proxy.port, str(proxy.ca_path), registry.hostname, registry.port)
    for attempt in (1, 2):
        resp = fetch(*args, "GET", path)
        served_whole = resp.status == 200 and resp.complete
        assert not served_whole, (
            f"attempt {attempt}: a blob that fails verification came as a complete 200 "
            f"({resp.received} bytes, sha256 {'matches' if resp.sha256 == digest else 'differs'})"
        )
        assert resp.status < 500 or resp.status in (502, 503, 504), resp.status
        assert "Traceback" not in resp.text()
        assert resp.cache != "HIT", f"attempt {attempt}: X-Registry-Cache HIT"
        time.sleep(0.3)
        assert proxy.files_in_cache_blobs() == [], "something was stored under cache_dir/blobs"
    head = fetch(*args, "HEAD", path)
    assert head.cache != "HIT"
    assert len(registry.blob_requests(digest)) == 2, "the second request did not go upstream"
    assert "Traceback" not in proxy.stderr()

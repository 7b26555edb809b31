"""Issue 5, Must show 3: the index deleted, or overwritten with garbage, while the proxy
is stopped: it starts, rebuilds the index from the store (verifying every file it did
not know), and serves HITs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from support.client import fetch
from support.durability import blob_path, cli, stored_blobs, wait_stored
from support.images import OCI_MANIFEST, pulled_blobs
from support.registry import Registry

pytestmark = pytest.mark.integration

INDEX = "index.sqlite3"


def damage_index(cache: Path, how: str) -> None:
    if how == "deleted":
        for suffix in ("", "-wal", "-shm"):
            (cache / f"{INDEX}{suffix}").unlink(missing_ok=True)
    else:
        (cache / INDEX).write_bytes(os.urandom(64 << 10))


@pytest.mark.parametrize("how", ["deleted", "garbage"])
def test_index_rebuilt_from_store(
    how: str, registry: Registry, image_factory, proxy_factory, tmp_path: Path
):
    repo = f"durable/index-{how}"
    ref = f"{registry.netloc}/{repo}:latest"
    img = image_factory(ref, [400_000, 200_000, 100_000])
    proxy = proxy_factory()
    assert set(img.blob_digests) <= pulled_blobs(proxy, ref, tmp_path / "first")
    assert wait_stored(proxy, *img.blob_digests, img.manifest_digest)
    held = stored_blobs(proxy.cache_dir)
    proxy.stop()

    damage_index(proxy.cache_dir, how)
    # and one stored file rotted: the rebuild must verify, not trust, what it finds
    rotten = img.layer_digests[1]
    path = blob_path(proxy.cache_dir, rotten)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))

    proxy.start()
    after = stored_blobs(proxy.cache_dir)
    assert rotten not in after, "a file that fails its digest was kept"
    assert after == {d: s for d, s in held.items() if d != rotten}
    if how == "garbage":
        assert (proxy.cache_dir / f"{INDEX}.corrupt").exists(), "the bad index was not kept aside"
        assert "index rebuilt" in proxy.stderr()
    assert proxy.metric("registry_cache_entries") == len(after)
    assert proxy.metric("registry_cache_size_bytes") == sum(after.values())
    status = cli(proxy, "status", "--json")
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["entries"] == len(after) and report["size_bytes"] == sum(after.values())

    upstream_before = {r.uri for r in registry.blob_requests(repo)}
    upstream_count = len(registry.blob_requests(repo))
    assert set(img.blob_digests) <= pulled_blobs(proxy, ref, tmp_path / "second")
    for digest in img.blob_digests:
        expected = ["MISS", "MISS"] if digest == rotten else ["MISS", "HIT"]
        assert proxy.results_for(digest) == expected, (digest, proxy.results_for(digest))
    fetched = registry.blob_requests(repo)[upstream_count:]
    assert [r.uri.rsplit("/", 1)[1] for r in fetched] == [rotten], fetched
    assert upstream_before  # the first pull did go upstream
    assert wait_stored(proxy, *img.blob_digests)


def test_manifest_by_digest_is_a_hit_after_index_rebuild(
    registry: Registry, image_factory, proxy_factory
):
    """A manifest in the store is worth as much after a rebuild as a layer is."""
    repo = "durable/index-manifest"
    img = image_factory(f"{registry.netloc}/{repo}:latest", [10_000])
    proxy = proxy_factory()

    def get_manifest():
        return fetch(
            proxy.port,
            str(proxy.ca_path),
            registry.hostname,
            registry.port,
            "GET",
            f"/v2/{repo}/manifests/{img.manifest_digest}",
            headers={"Accept": OCI_MANIFEST},
        )

    first = get_manifest()
    assert first.status == 200 and first.cache == "MISS"
    assert get_manifest().cache == "HIT"
    proxy.stop()
    damage_index(proxy.cache_dir, "deleted")
    proxy.start()
    assert img.manifest_digest in stored_blobs(proxy.cache_dir)
    again = get_manifest()
    assert again.status == 200 and again.sha256 == img.manifest_digest
    assert again.headers.get("content-type") == OCI_MANIFEST
    assert again.cache == "HIT", "a manifest kept in the store was fetched again after a rebuild"

"""Must show 1: a multi-layer image pulled through the proxy with skopeo, twice."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.client import fetch
from support.images import layout_blobs, pull
from support.registry import Registry, wait_until

pytestmark = pytest.mark.integration


def test_multilayer_image_miss_then_hit(
    registry: Registry, image_factory, proxy_factory, tmp_path: Path
):
    repo = "pub/multilayer"
    ref = f"{registry.netloc}/{repo}:latest"
    img = image_factory(ref, [300_000, 150_000, 60_000, 20_000, 5_000])
    assert len(img.blob_digests) == 6
    before_any = len(registry.blob_requests(repo))
    proxy = proxy_factory()

    first = pull(proxy, ref, tmp_path / "first")
    assert first.returncode == 0, f"first pull through the proxy failed:\n{first.stderr}"
    assert set(img.blob_digests) <= layout_blobs(tmp_path / "first")
    # A request's access-log line is written once its answer has gone out, which a client
    # that has the last byte may not wait for.
    wait_until(lambda: all(proxy.results_for(d) for d in img.blob_digests), timeout=10)
    for digest in img.blob_digests:
        assert proxy.results_for(digest) == ["MISS"], (
            f"first pull of {digest}: access log says {proxy.results_for(digest)}\n"
            + "\n".join(proxy.log_lines(digest))
        )
    fetched = registry.blob_requests(repo)[before_any:]
    assert sorted({r.uri.rsplit("/", 1)[1] for r in fetched}) == sorted(img.blob_digests)
    assert len(fetched) == len(img.blob_digests), "a blob was fetched upstream more than once"

    upstream_blob_requests = len(registry.blob_requests(repo, method=None))
    second = pull(proxy, ref, tmp_path / "second")
    assert second.returncode == 0, f"second pull through the proxy failed:\n{second.stderr}"
    assert set(img.blob_digests) <= layout_blobs(tmp_path / "second")
    wait_until(lambda: all(len(proxy.results_for(d)) > 1 for d in img.blob_digests), timeout=10)
    for digest in img.blob_digests:
        assert proxy.results_for(digest) == ["MISS", "HIT"], (
            f"second pull of {digest}: access log says {proxy.results_for(digest)}"
        )
    again = registry.blob_requests(repo, method=None)[upstream_blob_requests:]
    assert again == [], f"upstream saw blob requests during the second pull: {again}"

    # the same, as a client sees it: the header, the bytes, the metrics
    layer = img.layer_digests[0]
    resp = fetch(
        proxy.port,
        str(proxy.ca_path),
        registry.hostname,
        registry.port,
        "GET",
        f"/v2/{repo}/blobs/{layer}",
    )
    assert resp.status == 200
    assert resp.cache == "HIT"
    assert resp.sha256 == layer
    assert int(resp.headers["content-length"]) == img.sizes[layer]
    assert resp.headers.get("docker-content-digest") == layer
    hits = proxy.metric("registry_cache_requests_total", kind="blob", result="hit")
    assert hits >= len(img.blob_digests)


def test_head_and_range_from_cache(registry: Registry, image_factory, proxy_factory):
    repo = "pub/ranges"
    img = image_factory(f"{registry.netloc}/{repo}:latest", [50_000])
    layer = img.layer_digests[0]
    proxy = proxy_factory()
    args = (proxy.port, str(proxy.ca_path), registry.hostname, registry.port)
    path = f"/v2/{repo}/blobs/{layer}"
    full = fetch(*args, "GET", path)
    assert full.status == 200 and full.sha256 == layer
    head = fetch(*args, "HEAD", path)
    assert head.status == 200
    assert head.cache == "HIT"
    assert int(head.headers["content-length"]) == len(full.body)
    part = fetch(*args, "GET", path, {"Range": "bytes=100-199"})
    assert part.status == 206
    assert part.body == full.body[100:200]
    assert part.cache == "HIT"

"""Issue 5: `registry-cache status`, `gc` and `prefetch`, run as an operator would, against
the same cache_dir and config as a proxy under test."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from support.durability import (
    cli,
    get_blob,
    make_multiplatform_image,
    push_all,
    random_blob,
    stored_blobs,
    wait_stored,
)
from support.images import pulled_blobs
from support.registry import Registry
from support.topology import Pki

pytestmark = pytest.mark.integration

AMD64, ARM64 = "linux/amd64", "linux/arm64"


def upstream_gets(registry: Registry, repo: str) -> list[str]:
    """GETs of blobs and manifests by digest (the tag's answer is checked on its own)."""
    return [
        r.uri
        for r in registry.requests()
        if r.method == "GET" and f"/{repo}/" in r.uri and "sha256:" in r.uri
    ]


def test_prefetch_warms_every_platform(registry: Registry, pki: Pki, proxy_factory, tmp_path: Path):
    repo = "durable/prefetch-all"
    ref = f"{registry.netloc}/{repo}:1.0"
    image = make_multiplatform_image(
        tmp_path / "mp", {AMD64: [300_000, 100_000], ARM64: [250_000, 80_000]}
    )
    push_all(image.layout, ref, pki.cert_dir)
    proxy = proxy_factory()

    res = cli(proxy, "prefetch", ref)
    assert res.returncode == 0, res.stderr
    assert ref in res.stdout, res.stdout
    wanted = image.digests() | {image.index_digest}
    assert wait_stored(proxy, *wanted), (
        f"prefetch left out {wanted - stored_blobs(proxy.cache_dir).keys()}"
    )

    before = len(upstream_gets(registry, repo))
    got = pulled_blobs(proxy, ref, tmp_path / "pulled", "--all")
    assert image.digests() <= got
    for platform in (AMD64, ARM64):
        p = image.platforms[platform]
        for digest in [p.manifest_digest, *p.blob_digests]:
            assert proxy.results_for(digest)[-1:] == ["HIT"], (platform, digest)
    after = upstream_gets(registry, repo)[before:]
    assert after == [], f"the pull after prefetch still went upstream: {after}"


def test_prefetch_one_platform(registry: Registry, pki: Pki, proxy_factory, tmp_path: Path):
    repo = "durable/prefetch-one"
    ref = f"{registry.netloc}/{repo}:1.0"
    image = make_multiplatform_image(
        tmp_path / "mp", {AMD64: [200_000, 90_000], ARM64: [210_000, 70_000]}
    )
    push_all(image.layout, ref, pki.cert_dir)
    proxy = proxy_factory()

    res = cli(proxy, "prefetch", "--platform", ARM64, ref)
    assert res.returncode == 0, res.stderr
    assert wait_stored(proxy, *image.digests(ARM64))
    held = stored_blobs(proxy.cache_dir).keys()
    assert image.digests(ARM64) <= held
    assert not image.digests(AMD64) & held, "--platform linux/arm64 also fetched amd64"

    before = len(upstream_gets(registry, repo))
    pulled_blobs(
        proxy, ref, tmp_path / "pulled", "--override-os", "linux", "--override-arch", "arm64"
    )
    arm = image.platforms[ARM64]
    for digest in [arm.manifest_digest, *arm.blob_digests]:
        assert proxy.results_for(digest)[-1:] == ["HIT"], digest
    assert upstream_gets(registry, repo)[before:] == []

    bad = cli(proxy, "prefetch", "--platform", "linux/s390x", ref)
    assert bad.returncode != 0 and "s390x" in bad.stderr, (bad.returncode, bad.stderr)


def test_status_and_gc(registry: Registry, proxy_factory):
    repo = "durable/status"
    sizes = [300_000, 200_000, 100_000]
    blobs = [random_blob(registry, repo, n) for n in sizes]
    started = time.time()
    proxy = proxy_factory()

    def get(i: int, expect: str) -> None:
        r = get_blob(proxy, registry.hostname, registry.port, repo, blobs[i])
        assert r.status == 200 and r.sha256 == blobs[i] and r.cache == expect
        if expect == "MISS":
            assert wait_stored(proxy, blobs[i])

    for i in range(3):
        get(i, "MISS")
    get(0, "HIT")
    get(2, "HIT")  # least recently used first: 1, 0, 2
    proxy.stop()  # counters reach the index on stop (or every 10 s)

    res = cli(proxy, "status", "--json")
    assert res.returncode == 0, res.stderr
    report = json.loads(res.stdout)
    assert report["entries"] == 3
    assert report["size_bytes"] == sum(sizes) == sum(stored_blobs(proxy.cache_dir).values())
    assert (report["hits"], report["misses"]) == (2, 3)
    assert report["hit_ratio"] == pytest.approx(0.4)
    assert started - 1 <= report["oldest_access"] <= time.time()
    text = cli(proxy, "status")
    assert text.returncode == 0 and "40.0%" in text.stdout, text.stdout

    # gc with a smaller max_size (an override, as after a config change): LRU goes first
    gc = cli(proxy, "gc", env={"REGISTRY_CACHE_MAX_SIZE": "400000"})
    assert gc.returncode == 0, gc.stderr
    held = stored_blobs(proxy.cache_dir)
    assert set(held) == {blobs[0], blobs[2]}, "gc did not evict the least recently used"
    assert sum(held.values()) <= 400_000

    # gc with `inactive`: whatever was not used for that long goes
    time.sleep(1.2)
    gc = cli(proxy, "gc", env={"REGISTRY_CACHE_INACTIVE": "1s"})
    assert gc.returncode == 0, gc.stderr
    assert stored_blobs(proxy.cache_dir) == {}
    report = json.loads(cli(proxy, "status", "--json").stdout)
    assert (report["entries"], report["size_bytes"]) == (0, 0)
    assert (report["hits"], report["misses"]) == (2, 3)  # history is kept

    proxy.start()  # the server agrees with what gc did
    assert proxy.metric("registry_cache_entries") == 0
    get(2, "MISS")


def test_pull_after_prefetch_gets_the_tag_from_the_cache(
    registry: Registry, pki: Pki, proxy_factory, tmp_path: Path
):
    repo = "durable/prefetch-tag"
    ref = f"{registry.netloc}/{repo}:2.0"
    image = make_multiplatform_image(tmp_path / "mp", {AMD64: [50_000], ARM64: [40_000]})
    push_all(image.layout, ref, pki.cert_dir)
    proxy = proxy_factory()
    assert cli(proxy, "prefetch", ref).returncode == 0
    pulled_blobs(proxy, ref, tmp_path / "pulled", "--all")
    assert proxy.results_for(f"/{repo}/manifests/2.0") == ["MISS", "HIT"]

"""Must show 6: tags are trusted for tag_ttl, then revalidated; STALE while upstream is down."""

from __future__ import annotations

import time

import pytest
from support.client import get_tag

pytestmark = pytest.mark.integration


def test_moved_tag_seen_after_ttl_and_stale_when_upstream_down(
    make_registry, image_factory, proxy_factory
):
    reg = make_registry()
    repo, tag = "app/moving", "v1"
    ttl = 3.0
    old = image_factory(f"{reg.netloc}/{repo}:{tag}", [1000])
    new = image_factory(f"{reg.netloc}/{repo}:{tag}-next", [2000])
    proxy = proxy_factory(tag_ttl=f"{ttl:g}s", stale_if_error="1h")

    first = get_tag(proxy, reg, repo, tag)
    cached_at = time.monotonic()
    assert first.status == 200, first.text()
    assert first.headers.get("docker-content-digest") == old.manifest_digest
    assert first.cache == "MISS"
    assert first.sha256 == old.manifest_digest

    # move the tag upstream: the manifest of `new` under the same tag
    status, _, body = reg.api(
        "PUT",
        f"/v2/{repo}/manifests/{tag}",
        body=(new.layout / "blobs/sha256" / new.manifest_digest.split(":")[1]).read_bytes(),
        headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"},
    )
    assert status == 201, body
    assert reg.manifest_digest(repo, tag) == new.manifest_digest

    before_ttl = get_tag(proxy, reg, repo, tag)
    assert time.monotonic() - cached_at < ttl, "test too slow to check the ttl window"
    assert before_ttl.status == 200
    assert before_ttl.cache == "HIT"
    assert before_ttl.headers.get("docker-content-digest") == old.manifest_digest
    assert before_ttl.sha256 == old.manifest_digest

    time.sleep(max(0.0, ttl + 0.3 - (time.monotonic() - cached_at)))
    after_ttl = get_tag(proxy, reg, repo, tag)
    revalidated_at = time.monotonic()
    assert after_ttl.status == 200
    assert after_ttl.headers.get("docker-content-digest") == new.manifest_digest
    assert after_ttl.sha256 == new.manifest_digest
    assert after_ttl.cache in ("MISS", "HIT"), after_ttl.cache
    heads = [
        r for r in reg.requests() if r.method == "HEAD" and f"/{repo}/manifests/{tag}" in r.uri
    ]
    assert heads, "the tag was not revalidated with an upstream HEAD"

    reg.stop()
    time.sleep(max(0.0, ttl + 0.3 - (time.monotonic() - revalidated_at)))
    stale = get_tag(proxy, reg, repo, tag)
    assert stale.status == 200, (stale.status, stale.text())
    assert stale.cache == "STALE"
    assert stale.headers.get("docker-content-digest") == new.manifest_digest
    assert stale.sha256 == new.manifest_digest
    head = get_tag(proxy, reg, repo, tag, "HEAD")
    assert head.status == 200 and head.cache == "STALE"
    assert "Traceback" not in proxy.stderr()


def test_stale_if_error_has_an_end(make_registry, image_factory, proxy_factory):
    reg = make_registry()
    repo, tag = "app/stale", "v1"
    img = image_factory(f"{reg.netloc}/{repo}:{tag}", [1000])
    proxy = proxy_factory(tag_ttl="1s", stale_if_error="2s")
    first = get_tag(proxy, reg, repo, tag)
    t0 = time.monotonic()
    assert first.status == 200 and first.sha256 == img.manifest_digest
    reg.stop()
    time.sleep(max(0.0, 1.4 - (time.monotonic() - t0)))
    stale = get_tag(proxy, reg, repo, tag)
    assert stale.status == 200 and stale.cache == "STALE", (stale.status, stale.cache)
    time.sleep(max(0.0, 3.6 - (time.monotonic() - t0)))
    gone = get_tag(proxy, reg, repo, tag)
    assert gone.status >= 500, f"served past stale_if_error: {gone.status} {gone.cache}"
    assert gone.status in (502, 503, 504), gone.status
    assert gone.cache != "HIT"
    assert "Traceback" not in gone.text()

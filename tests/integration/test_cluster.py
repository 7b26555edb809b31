"""Issue 18's shared tier: cache nodes on one S3 bucket (real SeaweedFS, real registry,
real proxies). A blob one node fetched is served by another from the bucket without
asking upstream; a bucket that goes away leaves the nodes serving, degraded; what was
stored meanwhile reaches the bucket once it is back."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from support.admin import admin, admin_json
from support.durability import make_multiplatform_image, push_all
from support.images import layout_blobs, pull
from support.proxy import Proxy
from support.registry import Registry, wait_until
from support.seaweed import Seaweed

pytestmark = pytest.mark.integration


def s3_store(seaweed: Seaweed, bucket: str, prefix: str = "cluster/") -> dict[str, Any]:
    return {
        "type": "s3",
        "endpoint": seaweed.endpoint,
        "bucket": bucket,
        "prefix": prefix,
        "access_key_id": seaweed.access_key,
        "secret_access_key": seaweed.secret_key,
    }


def blob_keys(seaweed: Seaweed, bucket: str, prefix: str = "cluster/") -> set[str]:
    start = f"{prefix}blobs/sha256/"
    return {"sha256:" + k[len(start) :] for k in seaweed.keys(bucket, start)}


def health(proxy: Proxy) -> tuple[int, dict[str, Any]]:
    with urllib.request.urlopen(f"{proxy.url}/healthz", timeout=10) as r:
        return r.status, json.loads(r.read())


def node(proxy_factory, seaweed: Seaweed, bucket: str, ca_dir: Path, tmp_path: Path, name: str):
    """A cache node: its own cache_dir, the cluster's CA (a copy), the shared bucket."""
    own_ca = tmp_path / f"ca-{name}"
    if ca_dir.exists():
        shutil.copytree(ca_dir, own_ca)
    return proxy_factory(ca_dir=str(own_ca), store=s3_store(seaweed, bucket))


def assert_secret_kept(seaweed: Seaweed, *proxies: Proxy) -> None:
    for proxy in proxies:
        assert seaweed.secret_key not in proxy.output(), f"secret in {proxy.dir}'s log"


def test_second_node_pulls_from_the_bucket(
    registry: Registry, image_factory, proxy_factory, seaweed: Seaweed, bucket: str, tmp_path
):
    repo = "cluster/shared"
    ref = f"{registry.netloc}/{repo}:latest"
    img = image_factory(ref, [2_000_000, 300_000, 40_000])
    a = node(proxy_factory, seaweed, bucket, tmp_path / "none", tmp_path, "a")
    before = len(registry.blob_requests(repo))
    res = pull(a, ref, tmp_path / "pull-a")
    assert res.returncode == 0, res.stderr
    assert set(img.blob_digests) <= layout_blobs(tmp_path / "pull-a")
    fetched = registry.blob_requests(repo)[before:]
    assert sorted({r.uri.rsplit("/", 1)[1] for r in fetched}) == sorted(img.blob_digests)
    # Uploaded behind the client: the blobs and the manifest reach the bucket.
    wanted = {*img.blob_digests, registry.manifest_digest(repo, "latest")}
    wait_until(lambda: wanted <= blob_keys(seaweed, bucket), timeout=30)
    for digest in img.blob_digests:
        key = f"cluster/blobs/sha256/{digest[7:]}"
        assert seaweed.keys(bucket, key) == {key: img.sizes[digest]}
    tags = seaweed.keys(bucket, "cluster/tags/")
    assert any(f"/{repo}:latest/" in k for k in tags), tags

    # Node B, started afterwards with a cache of its own and A's CA.
    b = node(proxy_factory, seaweed, bucket, Path(a.ca_path).parent, tmp_path, "b")
    assert b.ca_path.read_bytes() == a.ca_path.read_bytes()
    before = len(registry.blob_requests(repo, method=None))
    res = pull(b, ref, tmp_path / "pull-b")
    assert res.returncode == 0, res.stderr
    assert set(img.blob_digests) <= layout_blobs(tmp_path / "pull-b")
    for digest in img.blob_digests:
        data = (tmp_path / "pull-b" / "blobs" / "sha256" / digest[7:]).read_bytes()
        assert len(data) == img.sizes[digest]
    again = registry.blob_requests(repo, method=None)[before:]
    assert again == [], f"node B asked upstream for blobs: {again}"
    wait_until(lambda: all(b.results_for(d) for d in img.blob_digests), timeout=10)
    for digest in img.blob_digests:
        assert b.results_for(digest) == ["MISS"]
        assert any("from bucket" in line for line in b.log_lines(digest)), b.log_lines(digest)
        # verified into B's own tier: the next request is a local HIT
        assert (b.cache_dir / "blobs" / "sha256" / digest[7:9] / digest[7:]).is_file()
    # bytes from the bucket are the cache's, not upstream's
    layers = sum(img.sizes[d] for d in img.blob_digests)
    assert b.metric("registry_cache_bytes_total", source="cache") >= layers
    assert b.metric("registry_cache_bytes_total", source="upstream") < layers
    status, body = health(b)
    assert status == 200 and body["status"] == "ok", body
    assert body["shared_store"]["reachable"] is True
    assert_secret_kept(seaweed, a, b)


def test_bucket_unreachable(
    make_registry, image_factory, proxy_factory, make_seaweed, tmp_path: Path
):
    server = make_seaweed()
    bucket = server.make_bucket()
    registry = make_registry()
    cached_ref = f"{registry.netloc}/outage/cached:latest"
    cached = image_factory(cached_ref, [500_000, 20_000])
    new_ref = f"{registry.netloc}/outage/new:latest"
    new = image_factory(new_ref, [400_000, 30_000])
    a = node(proxy_factory, server, bucket, tmp_path / "none", tmp_path, "a")
    assert pull(a, cached_ref, tmp_path / "one").returncode == 0
    wait_until(lambda: set(cached.blob_digests) <= blob_keys(server, bucket), timeout=30)

    server.stop()
    # cached: from the local tier
    res = pull(a, cached_ref, tmp_path / "two")
    assert res.returncode == 0, res.stderr
    assert set(cached.blob_digests) <= layout_blobs(tmp_path / "two")
    # a miss: straight from upstream, the bucket asked at most once (fails fast)
    before = len(registry.blob_requests("outage/new"))
    res = pull(a, new_ref, tmp_path / "three")
    assert res.returncode == 0, res.stderr
    assert set(new.blob_digests) <= layout_blobs(tmp_path / "three")
    fetched = registry.blob_requests("outage/new")[before:]
    assert sorted({r.uri.rsplit("/", 1)[1] for r in fetched}) == sorted(new.blob_digests)
    status, body = health(a)
    assert status == 200
    assert body["status"] == "degraded", body
    assert "shared store unreachable" in body["shared_store"]["reason"]
    assert server.secret_key not in json.dumps(body)

    server.start()
    # Stored meanwhile: in the bucket once it is back (and /healthz ok again).
    wait_until(lambda: set(new.blob_digests) <= blob_keys(server, bucket), timeout=60)
    wait_until(lambda: health(a)[1]["status"] == "ok", timeout=30)
    assert server.multipart_uploads(bucket) == []

    assert_secret_kept(server, a)


def test_tag_answer_from_the_bucket_while_upstream_is_down(
    make_registry, image_factory, proxy_factory, seaweed: Seaweed, bucket: str, tmp_path: Path
):
    """A node that never saw a tag answers it while upstream is down, from another
    node's answer in the bucket (STALE), and its blobs from the bucket.

    Doubtful: the same steps right after a restart of SeaweedFS failed once (node B's
    ListObjectsV2 under <prefix>tags/<host>/ came back empty while a botocore listing of
    the same prefix from the test found the objects); not understood yet."""
    registry = make_registry()
    ref = f"{registry.netloc}/outage/cached:latest"
    img = image_factory(ref, [300_000, 20_000])
    a = node(proxy_factory, seaweed, bucket, tmp_path / "none", tmp_path, "a")
    assert pull(a, ref, tmp_path / "one").returncode == 0
    wait_until(lambda: set(img.blob_digests) <= blob_keys(seaweed, bucket), timeout=30)
    tags = seaweed.keys(bucket, f"cluster/tags/{registry.netloc}/")
    assert any("/outage/cached:latest/" in k for k in tags), seaweed.keys(bucket, "cluster/tags/")
    b = node(proxy_factory, seaweed, bucket, Path(a.ca_path).parent, tmp_path, "b")
    registry.stop()
    res = pull(b, ref, tmp_path / "two")
    assert res.returncode == 0, res.stderr
    assert set(img.blob_digests) <= layout_blobs(tmp_path / "two")
    wait_until(lambda: b.results_for("outage/cached/manifests/latest"), timeout=10)
    assert "STALE" in b.results_for("outage/cached/manifests/latest")
    assert_secret_kept(seaweed, a, b)


def test_a_damaged_object_in_the_bucket_is_not_served_and_goes(
    registry: Registry, proxy_factory, seaweed: Seaweed, bucket: str, tmp_path
):
    """The bucket holds other bytes under a blob's name (damaged there; uploads are all
    verified): the node's fetch from it fails instead of finishing them, the object is
    deleted, the next try gets the registry's bytes, and the node's upload puts the
    right ones in its place."""
    repo = "cluster/damaged"
    data = os.urandom(3 << 20)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    registry.upload_blob(repo, data, digest)
    key = f"cluster/blobs/sha256/{digest[7:]}"
    damaged = data[:-1] + bytes([data[-1] ^ 1])
    seaweed.client().put_object(Bucket=bucket, Key=key, Body=damaged)
    a = node(proxy_factory, seaweed, bucket, tmp_path / "none", tmp_path, "a")

    first = a.get(registry.netloc, f"/v2/{repo}/blobs/{digest}")
    assert first.status != 200 or not first.complete, (first.status, first.sha256)
    assert registry.blob_requests(digest) == []
    assert a.log_lines("is damaged: deleting it"), a.output()[-3000:]
    assert wait_until(lambda: key not in seaweed.keys(bucket, key), timeout=10)

    again = a.get(registry.netloc, f"/v2/{repo}/blobs/{digest}")
    assert again.status == 200 and again.sha256 == digest, again.text()[:300]
    assert len(registry.blob_requests(digest)) == 1
    assert wait_until(lambda: key in seaweed.keys(bucket, key), timeout=30)
    assert seaweed.get(bucket, key) == data


def test_a_multi_platform_tag_from_the_bucket_while_upstream_is_down(
    make_registry, proxy_factory, seaweed: Seaweed, bucket: str, pki, tmp_path: Path
):
    """A fresh node answers a tag that names an image index from the bucket (STALE),
    and the platform manifest its client asks for next by digest too (taken from the
    bucket with the index, for this repository only), then the blobs."""
    registry = make_registry()
    image = make_multiplatform_image(
        tmp_path / "multi", {"linux/amd64": [200_000, 3000], "linux/arm64": [100_000]}
    )
    ref = f"{registry.netloc}/outage/multi:latest"
    push_all(image.layout, ref, pki.cert_dir)
    amd64 = image.platforms["linux/amd64"]
    a = node(proxy_factory, seaweed, bucket, tmp_path / "none", tmp_path, "a")
    assert pull(a, ref, tmp_path / "one").returncode == 0
    wanted = {image.index_digest, amd64.manifest_digest, *amd64.blob_digests}
    assert wait_until(lambda: wanted <= blob_keys(seaweed, bucket), timeout=30)

    b = node(proxy_factory, seaweed, bucket, Path(a.ca_path).parent, tmp_path, "b")
    registry.stop()
    res = pull(b, ref, tmp_path / "two")
    assert res.returncode == 0, res.stderr
    assert set(amd64.blob_digests) <= layout_blobs(tmp_path / "two")
    assert wait_until(lambda: b.results_for(amd64.manifest_digest), timeout=10)
    assert b.results_for(amd64.manifest_digest) == ["HIT"]
    # Another repository of the same registry does not get the manifest by digest.
    other = b.get(registry.netloc, f"/v2/outage/other/manifests/{amd64.manifest_digest}")
    assert other.status != 200, other.status


def test_a_purged_tag_does_not_come_back_from_the_bucket(
    make_registry, image_factory, proxy_factory, make_seaweed, tmp_path: Path
):
    """A purge removes the tag's answers from the bucket too (every node's), so neither
    the node that purged nor another answers the tag from the bucket while upstream is
    down; a node that never had the tag purges it from the bucket all the same; with the
    bucket unreachable the purge says it is half done (exit 1, what to do)."""
    server = make_seaweed()
    bucket = server.make_bucket()
    registry = make_registry()
    repo = "purged/app"
    refs = {tag: f"{registry.netloc}/{repo}:{tag}" for tag in ("one", "two", "three")}
    images = {tag: image_factory(ref, [30_000]) for tag, ref in refs.items()}
    tags_prefix = f"cluster/tags/{registry.netloc}/{repo}:"

    def bucket_tags() -> set[str]:
        return {key[len(tags_prefix) :].split("/")[0] for key in server.keys(bucket, tags_prefix)}

    a = node(proxy_factory, server, bucket, tmp_path / "none", tmp_path, "a")
    b = node(proxy_factory, server, bucket, Path(a.ca_path).parent, tmp_path, "b")
    for tag, ref in refs.items():
        assert pull(a, ref, tmp_path / f"a-{tag}").returncode == 0
    wait_until(lambda: bucket_tags() == set(refs), timeout=30)
    three = images["three"]
    wait_until(
        lambda: {three.manifest_digest, *three.blob_digests} <= blob_keys(server, bucket),
        timeout=60,
    )

    on_a = admin_json(a, "purge", refs["one"])
    assert on_a["tags_removed"] == 1 and on_a["shared_tags_removed"] >= 1, on_a
    # b never pulled "two": nothing of it here, its answer in the bucket goes all the same
    on_b = admin(b, "purge", refs["two"])
    assert on_b.returncode == 0, on_b.stderr
    assert "0 tag answers" in on_b.stdout and "removed from the shared store" in on_b.stdout
    assert bucket_tags() == {"three"}
    nowhere = admin(b, "purge", f"{registry.netloc}/{repo}:never")
    assert nowhere.returncode == 1 and "is not cached" in nowhere.stderr, nowhere.stderr

    registry.stop()
    for proxy, tag in ((a, "one"), (b, "one"), (b, "two")):
        res = pull(proxy, refs[tag], tmp_path / f"down-{proxy.port}-{tag}")
        assert res.returncode != 0, f"{tag} came back through {proxy.port} with upstream down"
    res = pull(b, refs["three"], tmp_path / "down-three")
    assert res.returncode == 0, res.stderr  # what was not purged still answers (STALE)

    server.stop()
    half = admin(a, "purge", refs["three"])
    assert half.returncode == 1, half.stdout
    assert "1 tag answers" in half.stdout
    assert "not removed" in half.stderr and "purge again" in half.stderr, half.stderr
    assert server.secret_key not in half.stdout + half.stderr
    assert_secret_kept(server, a, b)

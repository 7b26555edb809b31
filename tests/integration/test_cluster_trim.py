"""Issue 18, the shared store's size bound: three cache nodes (separate processes, one
CA, `peers`) on one real SeaweedFS bucket with a shared_max_size that holds two of three
images. The least recently read image (on any node) leaves the bucket, the one read
again stays; a lease holder killed with SIGKILL is replaced once its lease expires;
`registry-cache status` shows the bucket, the lease and the peers."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from typing import Any

import pytest
import yaml
from support.durability import kill9
from support.images import Image, pull
from support.proxy import Proxy, proxy_python
from support.registry import Registry, wait_until
from support.seaweed import Seaweed

pytestmark = pytest.mark.integration

PREFIX = "cluster/"
LAYER = 400_000  # random bytes: each image is one layer of this size, a config, a manifest
BOUND = 1_000_000  # two images fit, three do not
INTERVAL = 1.0  # shared_trim_interval: the lease expires 2 s after its last renewal


def s3_store(seaweed: Seaweed, bucket: str) -> dict[str, Any]:
    return {
        "type": "s3",
        "endpoint": seaweed.endpoint,
        "bucket": bucket,
        "prefix": PREFIX,
        "access_key_id": seaweed.access_key,
        "secret_access_key": seaweed.secret_key,
    }


def bucket_blobs(seaweed: Seaweed, bucket: str) -> dict[str, int]:
    start = f"{PREFIX}blobs/sha256/"
    return {"sha256:" + k[len(start) :]: v for k, v in seaweed.keys(bucket, start).items()}


def image_digests(img: Image) -> set[str]:
    return {img.manifest_digest, *img.blob_digests}


def lease(seaweed: Seaweed, bucket: str) -> dict[str, Any] | None:
    if not seaweed.keys(bucket, f"{PREFIX}lease/trim"):
        return None
    return json.loads(seaweed.get(bucket, f"{PREFIX}lease/trim"))


def read_at(seaweed: Seaweed, bucket: str, digest: str) -> float:
    """The latest read of `digest` in any node's published access map."""
    latest = 0.0
    for key in seaweed.keys(bucket, f"{PREFIX}access/"):
        reads = json.loads(seaweed.get(bucket, key)).get("reads", {})
        latest = max(latest, float(reads.get(digest, 0.0)))
    return latest


def uploaded_at(seaweed: Seaweed, bucket: str, digest: str) -> float:
    key = f"{PREFIX}blobs/sha256/{digest[7:]}"
    return seaweed.client().head_object(Bucket=bucket, Key=key)["LastModified"].timestamp()


def name_of(node: Proxy) -> str:
    return f"127.0.0.1:{node.port}"


def status(node: Proxy, *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [proxy_python(), "-m", "proxy_app", "status", "--config", str(node.config_path), *extra],
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )


def test_bucket_trimmed_to_shared_max_size_by_one_node_at_a_time(
    registry: Registry, image_factory, proxy_factory, seaweed: Seaweed, bucket: str, tmp_path
):
    # A map of a node gone for 8 days: removed by the trimmer (and its pins with it).
    gone = {"node": "10.9.9.9:3128", "written": time.time() - 8 * 86400, "reads": {}}
    seaweed.client().put_object(
        Bucket=bucket, Key=f"{PREFIX}access/10.9.9.9_3128.json", Body=json.dumps(gone).encode()
    )
    nodes = [
        proxy_factory(
            start=False,
            store=s3_store(seaweed, bucket),
            shared_max_size=BOUND,
            shared_trim_interval=f"{INTERVAL}s",
        )
        for _ in range(3)
    ]
    for node in nodes:
        node.config["peers"] = [name_of(n) for n in nodes]
        node.config_path.write_text(yaml.safe_dump(node.config))
    nodes[0].start()
    for node in nodes[1:]:
        shutil.copytree(nodes[0].cache_dir / "ca", node.cache_dir / "ca")
        node.start()
    a, b, c = nodes

    images = [image_factory(f"{registry.netloc}/trim/img{i}:latest", [LAYER]) for i in (1, 2, 3)]
    one, two, three = images
    assert sum(img.sizes[img.layer_digests[0]] for img in images) > BOUND

    def pulled(node: Proxy, img: Image, name: str) -> None:
        res = pull(node, f"{registry.netloc}/trim/{name}:latest", tmp_path / f"{name}-{node.port}")
        assert res.returncode == 0, res.stderr
        assert wait_until(lambda: image_digests(img) <= set(bucket_blobs(seaweed, bucket)), 30)

    pulled(a, one, "img1")
    pulled(b, two, "img2")
    # Image 1 read again, on another node (from the bucket): later than image 2's upload.
    pulled(b, one, "img1")
    newest_two = max(uploaded_at(seaweed, bucket, d) for d in image_digests(two))
    layer_one = one.layer_digests[0]
    assert wait_until(lambda: read_at(seaweed, bucket, layer_one) > newest_two, 15), (
        "node B's read of image 1 never reached its access map"
    )
    # Image 3 makes three: over the bound. Image 2, the least recently read, goes.
    res = pull(c, f"{registry.netloc}/trim/img3:latest", tmp_path / "img3")
    assert res.returncode == 0, res.stderr

    def trimmed() -> bool:
        held = bucket_blobs(seaweed, bucket)
        return image_digests(three) <= set(held) and sum(held.values()) <= BOUND

    assert wait_until(trimmed, 60), bucket_blobs(seaweed, bucket)
    held = set(bucket_blobs(seaweed, bucket))
    assert image_digests(one) <= held, "the image read again was trimmed"
    assert two.layer_digests[0] not in held, "the least recently read layer stayed"
    # tag answers are not blobs: never trimmed
    tags = seaweed.keys(bucket, f"{PREFIX}tags/")
    assert all(any(f"/trim/img{i}:latest/" in k for k in tags) for i in (1, 2, 3)), tags
    # every node publishes its reads; the silent node's map is gone
    maps = set(seaweed.keys(bucket, f"{PREFIX}access/"))
    assert wait_until(
        lambda: (
            f"{PREFIX}access/10.9.9.9_3128.json"
            not in set(seaweed.keys(bucket, f"{PREFIX}access/"))
        ),
        15,
    ), maps
    for node in nodes:
        assert f"{PREFIX}access/{name_of(node).replace(':', '_')}.json" in maps

    # One holder at a time; `status` on each node names it.
    first = lease(seaweed, bucket)
    assert first is not None and first["holder"] in {name_of(n) for n in nodes}
    assert first["bucket_bytes"] <= BOUND
    holder = next(n for n in nodes if name_of(n) == first["holder"])
    others = [n for n in nodes if n is not holder]
    shown = status(others[0])
    assert shown.returncode == 0, shown.stderr
    assert f"bucket {bucket} prefix {PREFIX} (reachable)" in shown.stdout, shown.stdout
    assert f"trim lease  held by {first['holder']}," in shown.stdout, shown.stdout
    assert f"{name_of(others[0])} (this node)" in shown.stdout
    assert "UNREACHABLE" not in shown.stdout
    assert seaweed.secret_key not in shown.stdout + shown.stderr

    # The holder dies without a word: another node takes the lease once it expired.
    expired_at = float(lease(seaweed, bucket)["expires"])  # type: ignore[index]
    kill9(holder)

    def taken_over() -> dict[str, Any] | None:
        now = lease(seaweed, bucket)
        return now if now and now["holder"] != first["holder"] else None

    after = wait_until(taken_over, 30)
    assert after is not None, lease(seaweed, bucket)
    assert after["holder"] in {name_of(n) for n in others}
    # not before the old lease ran out (one host, one clock; renewals only push it later)
    assert after["acquired"] >= expired_at - 0.05, (after, expired_at)
    shown = status(others[0], "--json")
    assert shown.returncode == 0, shown.stderr
    view = json.loads(shown.stdout)["cluster"]
    peers = {p["node"]: p for p in view["peers"]}
    assert peers[name_of(holder)]["reachable"] is False
    assert peers[name_of(others[1])]["reachable"] is True
    assert peers[name_of(others[0])]["self"] is True
    assert view["shared_store"]["shared_max_size"] == BOUND
    assert "secret" not in json.dumps(view["shared_store"])
    assert wait_until(
        lambda: (
            json.loads(status(others[0], "--json").stdout)["cluster"]["shared_store"]["lease"][
                "holder"
            ]
            == after["holder"]
        ),
        10,
    )
    for node in others:
        assert seaweed.secret_key not in node.output()

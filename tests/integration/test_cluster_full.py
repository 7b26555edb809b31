"""Issue 18 with both cluster pieces at once: three cache nodes on one S3 bucket (real
SeaweedFS) that also list each other as `peers` (one CA), against a real registry.

- 30 clients spread over the three nodes pull one cold image at once: one upstream GET
  per blob, every digest right; a fourth node started afterwards on the same bucket
  serves the image with no upstream blob request.
- The owner of a large blob is killed (SIGKILL) half way through its download: the
  other nodes' clients still get the right bytes (the rest fetched anew); the bucket
  never holds an object under the digest that is not the whole, verified blob; and the
  killed node's incomplete multipart upload is gone after its next start.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import threading
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.client import afetch
from support.durability import kill9
from support.images import pulled_blobs
from support.proxy import Proxy
from support.registry import Registry, wait_until
from support.seaweed import Seaweed
from support.servers import AioThread, ThrottledRelay

from proxy_app.peers import owner

pytestmark = pytest.mark.integration

CLIENTS = 30
PREFIX = "cluster/"


def s3_store(seaweed: Seaweed, bucket: str, endpoint: str | None = None, **extra: Any) -> dict:
    return {
        "type": "s3",
        "endpoint": endpoint or seaweed.endpoint,
        "bucket": bucket,
        "prefix": PREFIX,
        "access_key_id": seaweed.access_key,
        "secret_access_key": seaweed.secret_key,
        **extra,
    }


def name_of(node: Proxy) -> str:
    return f"127.0.0.1:{node.port}"


def owner_of(nodes: list[Proxy], digest: str) -> Proxy:
    chosen = owner([name_of(n) for n in nodes], digest)
    return next(n for n in nodes if name_of(n) == chosen)


def set_peers(node: Proxy, peers: list[Proxy]) -> None:
    node.config["peers"] = [name_of(p) for p in peers]
    node.config_path.write_text(yaml.safe_dump(node.config))


def start_with_ca(node: Proxy, first: Proxy) -> None:
    """Starts `node` with a copy of the first node's CA (the cluster's one CA)."""
    if first is not node:
        shutil.copytree(first.cache_dir / "ca", node.cache_dir / "ca")
    node.start()


def make_cluster(proxy_factory, stores: list[dict[str, Any]]) -> list[Proxy]:
    """One node per store config, each listing all of them in `peers`, one CA."""
    nodes = [proxy_factory(start=False, store=store) for store in stores]
    for node in nodes:
        set_peers(node, nodes)
    for node in nodes:
        start_with_ca(node, nodes[0])
    return nodes


def blob_key(digest: str) -> str:
    return f"{PREFIX}blobs/sha256/{digest[7:]}"


def bucket_blobs(seaweed: Seaweed, bucket: str) -> set[str]:
    start = f"{PREFIX}blobs/sha256/"
    return {"sha256:" + k[len(start) :] for k in seaweed.keys(bucket, start)}


def health(node: Proxy) -> dict[str, Any]:
    with urllib.request.urlopen(f"{node.url}/healthz", timeout=10) as r:
        return dict(json.loads(r.read()))


def layout_digests_right(layout: Path, digests: set[str]) -> list[str]:
    """The digests whose blob in the OCI layout does not hash to its name."""
    wrong = []
    for digest in digests:
        data = (layout / "blobs" / "sha256" / digest[7:]).read_bytes()
        if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
            wrong.append(digest)
    return wrong


def test_thirty_clients_three_nodes_one_bucket_then_a_fourth_node(
    registry: Registry,
    image_factory,
    proxy_factory,
    seaweed: Seaweed,
    bucket: str,
    tmp_path: Path,
):
    repo = "pub/cluster-full-herd"
    ref = f"{registry.netloc}/{repo}:v1"
    img = image_factory(ref, [3 << 20, 2 << 20, 1 << 20, 64 << 10])
    nodes = make_cluster(proxy_factory, [s3_store(seaweed, bucket)] * 3)
    wanted = set(img.blob_digests)
    owners = {name_of(owner_of(nodes, d)) for d in wanted}
    assert len(owners) >= 2, f"the image's blobs all have one owner: {owners}"

    def pull(i: int) -> set[str]:
        return pulled_blobs(nodes[i % len(nodes)], ref, tmp_path / f"pull-{i}")

    with ThreadPoolExecutor(CLIENTS) as pool:
        results = list(pool.map(pull, range(CLIENTS)))
    for i, got in enumerate(results):
        assert wanted <= got, f"client {i} (node {i % 3}) lacks {wanted - got}"
        wrong = layout_digests_right(tmp_path / f"pull-{i}", wanted)
        assert not wrong, f"client {i}: blobs whose bytes are not their digest's: {wrong}"
    for digest in wanted:
        gets = registry.blob_requests(digest)
        assert len(gets) == 1, f"{digest}: {len(gets)} upstream GETs: {gets}"

    # Behind the clients every blob (and the manifest) reaches the bucket, once each.
    manifest = registry.manifest_digest(repo, "v1")
    assert wait_until(lambda: {*wanted, manifest} <= bucket_blobs(seaweed, bucket), timeout=60)
    for digest in wanted:
        assert seaweed.keys(bucket, blob_key(digest)) == {blob_key(digest): img.sizes[digest]}
        data = seaweed.get(bucket, blob_key(digest))
        assert "sha256:" + hashlib.sha256(data).hexdigest() == digest
    assert seaweed.multipart_uploads(bucket) == []

    # A fourth node, started afterwards on the same bucket. A node must find itself in
    # its own `peers` (peers.find_self), so its list names the four; the first three
    # still list three: the lists differ, which the nodes allow (a peer's fetch never
    # asks a peer). The bucket is asked before any owner, and holds every blob.
    fourth = proxy_factory(start=False, store=s3_store(seaweed, bucket))
    set_peers(fourth, [*nodes, fourth])
    start_with_ca(fourth, nodes[0])
    before = len(registry.blob_requests(repo, method=None))
    got = pulled_blobs(fourth, ref, tmp_path / "pull-fourth")
    assert wanted <= got
    assert not layout_digests_right(tmp_path / "pull-fourth", wanted)
    again = registry.blob_requests(repo, method=None)[before:]
    assert again == [], f"the fourth node asked upstream for blobs: {again}"
    for digest in wanted:
        assert any("from bucket" in ln for ln in fourth.log_lines(digest)), fourth.log_lines(digest)
    for node in [*nodes, fourth]:
        assert seaweed.secret_key not in node.output()


class BucketWatch:
    """Polls the bucket for some keys while a test runs: each must be absent, or the
    whole object with the right sha256 (read once, when it first appears)."""

    def __init__(self, seaweed: Seaweed, bucket: str, blobs: dict[str, int]) -> None:
        self.seaweed = seaweed
        self.bucket = bucket
        self.blobs = blobs  # digest -> size
        self.seen: dict[str, int] = {}  # digest -> polls it was present in
        self.problems: list[str] = []
        self.polls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> BucketWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll()
            self._stop.wait(0.1)

    def poll(self) -> None:
        self.polls += 1
        for digest, size in self.blobs.items():
            try:
                found = self.seaweed.keys(self.bucket, blob_key(digest))
            except Exception as e:  # the watch must not die of a slow answer
                self.problems.append(f"listing failed: {e}")
                continue
            if not found:
                continue
            if found != {blob_key(digest): size}:
                self.problems.append(f"{digest}: object of {found}, not {size} bytes")
                continue
            if digest not in self.seen:
                data = self.seaweed.get(self.bucket, blob_key(digest))
                if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
                    self.problems.append(f"{digest}: object whose bytes are not the digest's")
            self.seen[digest] = self.seen.get(digest, 0) + 1


def random_blob(size: int) -> tuple[bytes, str]:
    data = os.urandom(size)
    return data, "sha256:" + hashlib.sha256(data).hexdigest()


def test_owner_killed_mid_fetch_with_a_bucket(
    registry: Registry,
    aio: AioThread,
    upstream_ports: set[int],
    proxy_factory,
    seaweed: Seaweed,
    bucket: str,
):
    size = 200 * 1000 * 1000  # the 200 MB: 5 s through the relay at 40 MB/s
    repo = "pub/cluster-full-kill"
    big, digest = random_blob(size)
    registry.upload_blob(repo, big, digest)
    del big
    relay = ThrottledRelay(aio, registry.port, rate=40e6).start()
    upstream_ports.add(relay.port)
    # The killed node's bucket traffic goes through a relay that slows its uploads, so
    # that it is killed in the middle of a multipart upload too (another blob's).
    s3_relay = ThrottledRelay(aio, seaweed.ports["s3"], rate=1e12, up_rate=4e6).start()
    # Short, so that the killed node's next start finds its upload abandoned.
    age = {"abandoned_upload_age": "2s"}
    plain = s3_store(seaweed, bucket, **age)
    try:
        nodes = [proxy_factory(start=False, store=plain) for _ in range(3)]
        for node in nodes:
            set_peers(node, nodes)
        holder = owner_of(nodes, digest)
        holder.config["store"] = s3_store(
            seaweed, bucket, endpoint=f"http://127.0.0.1:{s3_relay.port}", **age
        )
        holder.config_path.write_text(yaml.safe_dump(holder.config))
        for node in nodes:
            start_with_ca(node, nodes[0])
        others = [n for n in nodes if n is not holder]

        # A blob of the holder's, stored before the kill: its upload runs (4 MB/s)
        # when the holder is killed.
        while True:
            medium, medium_digest = random_blob(48 * 1000 * 1000)
            if owner_of(nodes, medium_digest) is holder:
                break
        registry.upload_blob(repo, medium, medium_digest)
        r = holder.get(registry.netloc, f"/v2/{repo}/blobs/{medium_digest}")
        assert r.status == 200 and r.sha256 == medium_digest
        del medium

        def uploading() -> list[dict[str, Any]]:
            return [
                u
                for u in seaweed.multipart_uploads(bucket, PREFIX)
                if u["Key"] == blob_key(medium_digest)
            ]

        assert wait_until(uploading, timeout=30), "the holder's upload did not start"
        jobs = [(others[i % 2], relay.port) for i in range(6)]

        async def run() -> list:
            clients = asyncio.ensure_future(
                asyncio.gather(
                    *(
                        afetch(
                            node.port,
                            str(node.ca_path),
                            "slow.rc.test",
                            port,
                            "GET",
                            f"/v2/{repo}/blobs/{digest}",
                            timeout=240,
                            keep_body=False,
                        )
                        for node, port in jobs
                    )
                )
            )
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            while not any(c.down >= size // 2 for c in relay.conns):
                assert loop.time() < deadline, "the owner's download never got half way"
                await asyncio.sleep(0.05)
            kill9(holder)
            return list(await clients)

        blobs = {digest: size, medium_digest: 48 * 1000 * 1000}
        with BucketWatch(seaweed, bucket, blobs) as watch:
            results = asyncio.run(run())
            killed_uploads = uploading()
            assert killed_uploads, "the holder was not killed mid-upload"
            s3_relay.up_rate = None  # its next start uploads at full speed
            for i, r in enumerate(results):
                assert r.status == 200 and r.complete, f"client {i}: {r.status} {r.error}"
                assert r.sha256 == digest and r.received == size, f"client {i}: wrong bytes"
            # the owner's one GET, then the new owner's one for the rest (the other node
            # asked the new owner)
            assert len(registry.blob_requests(digest)) == 2
            for node in others:
                assert node.log_lines("broke off after"), node.output()[-3000:]
            # The other nodes upload it once they have it; the watch sees it appear.
            assert wait_until(lambda: digest in watch.seen, timeout=120), "never in the bucket"
            assert wait_until(
                lambda: all(health(n)["shared_store"]["uploads_pending"] == 0 for n in others),
                timeout=60,
            )
            # Only the killed node's upload is left incomplete (the others' completed).
            left = seaweed.multipart_uploads(bucket, PREFIX)
            assert [u["UploadId"] for u in left] == [u["UploadId"] for u in killed_uploads]

            # Its next start aborts it (older than abandoned_upload_age), and uploads
            # the blob it had stored again, from its local copy.
            holder.start()
            assert holder.log_lines("1 abandoned multipart uploads aborted"), holder.output()[
                -3000:
            ]
            assert wait_until(lambda: medium_digest in watch.seen, timeout=60)
            assert wait_until(
                lambda: health(holder)["shared_store"]["uploads_pending"] == 0, timeout=60
            )
            watch.poll()
        assert watch.polls > 20, watch.polls
        assert not watch.problems, watch.problems
        assert seaweed.multipart_uploads(bucket, PREFIX) == []
        assert seaweed.multipart_uploads(bucket) == []
    finally:
        relay.stop()
        s3_relay.stop()


def test_uploads_wait_while_the_node_downloads(
    registry: Registry,
    aio: AioThread,
    upstream_ports: set[int],
    proxy_factory,
    seaweed: Seaweed,
    bucket: str,
):
    """A blob stored while another download runs reaches the bucket after it, not during
    it: on a small host the upload would take the CPU the download's clients need."""
    repo = "pub/cluster-quiet"
    first, first_digest = random_blob(1 << 20)
    slow, slow_digest = random_blob(12 * 1000 * 1000)
    registry.upload_blob(repo, first, first_digest)
    registry.upload_blob(repo, slow, slow_digest)
    relay = ThrottledRelay(aio, registry.port, rate=2e6).start()  # the slow one: ~6 s
    upstream_ports.add(relay.port)
    try:
        node = proxy_factory(store=s3_store(seaweed, bucket))

        async def run() -> tuple[Any, bool]:
            slow_get = asyncio.ensure_future(
                afetch(
                    node.port,
                    str(node.ca_path),
                    "slow.rc.test",
                    relay.port,
                    "GET",
                    f"/v2/{repo}/blobs/{slow_digest}",
                    timeout=120,
                    keep_body=False,
                )
            )
            while not relay.conns or relay.conns[-1].down < 1_000_000:
                await asyncio.sleep(0.05)
            # The slow download runs: the first blob is stored now, its upload queued.
            r = await afetch(
                node.port,
                str(node.ca_path),
                "slow.rc.test",
                registry.port,
                "GET",
                f"/v2/{repo}/blobs/{first_digest}",
                timeout=60,
            )
            assert r.status == 200 and r.sha256 == first_digest
            await asyncio.sleep(3)
            during = first_digest in bucket_blobs(seaweed, bucket)
            return await slow_get, during

        done, during = asyncio.run(run())
        assert done.status == 200 and done.sha256 == slow_digest
        assert not during, "uploaded while the node was downloading"
        assert wait_until(lambda: first_digest in bucket_blobs(seaweed, bucket), timeout=20)
        assert wait_until(lambda: slow_digest in bucket_blobs(seaweed, bucket), timeout=30)
    finally:
        relay.stop()


def test_a_blob_whose_owner_died_before_uploading_it_reaches_the_bucket(
    registry: Registry,
    aio: AioThread,
    proxy_factory,
    seaweed: Seaweed,
    bucket: str,
):
    """A node that took a blob from its owner leaves the upload to the owner; the owner
    dies in the middle of it, and the node uploads the blob itself once the owner's
    upload must have ended (UPLOAD_DEFER_MAX + abandoned_upload_age)."""
    repo = "pub/cluster-orphan"
    data, digest = random_blob(10 * 1000 * 1000)
    registry.upload_blob(repo, data, digest)
    s3_relay = ThrottledRelay(aio, seaweed.ports["s3"], rate=1e12, up_rate=100e3).start()
    age = {"abandoned_upload_age": "2s"}
    try:
        nodes = [proxy_factory(start=False, store=s3_store(seaweed, bucket, **age)) for _ in "ab"]
        for node in nodes:
            set_peers(node, nodes)
        holder = owner_of(nodes, digest)
        asker = next(n for n in nodes if n is not holder)
        holder.config["store"] = s3_store(
            seaweed, bucket, endpoint=f"http://127.0.0.1:{s3_relay.port}", **age
        )
        holder.config_path.write_text(yaml.safe_dump(holder.config))
        for node in nodes:
            start_with_ca(node, nodes[0])
        r = asker.get(registry.netloc, f"/v2/{repo}/blobs/{digest}")
        assert r.status == 200 and r.sha256 == digest
        assert len(registry.blob_requests(digest)) == 1
        assert wait_until(
            lambda: any(u["Key"] == blob_key(digest) for u in seaweed.multipart_uploads(bucket)),
            timeout=30,
        ), "the owner's upload did not start"
        kill9(holder)
        assert digest not in bucket_blobs(seaweed, bucket)
        assert wait_until(lambda: digest in bucket_blobs(seaweed, bucket), timeout=90)
        assert seaweed.get(bucket, blob_key(digest)) == data
        assert health(asker)["shared_store"]["uploaded"] >= 1
    finally:
        s3_relay.stop()

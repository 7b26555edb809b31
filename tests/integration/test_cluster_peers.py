"""Issue 18, many nodes, one fetch: three cache nodes (separate processes, one CA, their
own cache_dirs, `peers` naming all three) against a real registry.

The owner of a digest (rendezvous hashing, as the nodes compute it) fetches it once for
every node; the others ask it and stream its bytes to their clients as they come; a
killed owner's askers carry on from the registry; an owner that is down is not waited
for; a peer request needs the cluster's key and can reach only where a client could.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import shutil
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from support.client import afetch
from support.durability import blob_path, kill9
from support.images import pulled_blobs
from support.proxy import Proxy
from support.registry import Registry, wait_until
from support.servers import AioThread, ThrottledRelay

from proxy_app import peer_auth
from proxy_app.peers import owner

pytestmark = pytest.mark.integration

CLIENTS = 30


def make_cluster(proxy_factory, n: int = 3, **config: Any) -> list[Proxy]:
    """n nodes on 127.0.0.1, each listing all n in `peers`, sharing the first one's CA."""
    nodes = [proxy_factory(start=False, **config) for _ in range(n)]
    peers = [f"127.0.0.1:{node.port}" for node in nodes]
    for node in nodes:
        node.config["peers"] = peers
        node.config_path.write_text(yaml.safe_dump(node.config))
    nodes[0].start()
    for node in nodes[1:]:
        shutil.copytree(nodes[0].cache_dir / "ca", node.cache_dir / "ca")
        node.start()
    return nodes


def name_of(node: Proxy) -> str:
    return f"127.0.0.1:{node.port}"


def owner_of(nodes: list[Proxy], digest: str) -> Proxy:
    chosen = owner([name_of(n) for n in nodes], digest)
    return next(n for n in nodes if name_of(n) == chosen)


def cluster_key(node: Proxy) -> bytes:
    key = serialization.load_pem_private_key((node.cache_dir / "ca" / "ca.key").read_bytes(), None)
    return peer_auth.peer_key(key)  # type: ignore[arg-type]


def peer_get(node: Proxy, target: str, header: str | None) -> tuple[int, bytes]:
    headers = {peer_auth.HEADER: header} if header is not None else {}
    request = urllib.request.Request(f"{node.url}{target}", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def big_blob(registry: Registry, repo: str, size: int) -> str:
    data = os.urandom(size)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    registry.upload_blob(repo, data, digest)
    return digest


async def gather_fetches(jobs: list[tuple[Proxy, int]], host: str, path: str) -> list:
    return list(
        await asyncio.gather(
            *(
                afetch(
                    node.port,
                    str(node.ca_path),
                    host,
                    port,
                    "GET",
                    path,
                    timeout=240,
                    keep_body=False,
                )
                for node, port in jobs
            )
        )
    )


def test_thirty_clients_on_three_nodes_one_upstream_get_per_blob(
    registry: Registry, image_factory, proxy_factory, tmp_path: Path
):
    repo = "pub/cluster-herd"
    ref = f"{registry.netloc}/{repo}:v1"
    img = image_factory(ref, [3 << 20, 2 << 20, 1 << 20, 64 << 10])
    nodes = make_cluster(proxy_factory)
    wanted = set(img.blob_digests)
    # every node owns some of this image's blobs, or the test would prove less
    owners = {name_of(owner_of(nodes, d)) for d in wanted}
    assert len(owners) >= 2, f"the image's blobs all have one owner: {owners}"

    def pull(i: int) -> set[str]:
        return pulled_blobs(nodes[i % len(nodes)], ref, tmp_path / f"pull-{i}")

    with ThreadPoolExecutor(CLIENTS) as pool:
        results = list(pool.map(pull, range(CLIENTS)))

    for i, got in enumerate(results):
        assert wanted <= got, f"client {i} (node {i % 3}) lacks {wanted - got}"
    for digest in wanted:
        gets = registry.blob_requests(digest)
        assert len(gets) == 1, f"{digest}: {len(gets)} upstream GETs: {gets}"
        # the owner fetched it (its access log has the peers' requests, door `peer`)
        holder = owner_of(nodes, digest)
        asked = [ln for ln in holder.log_lines(digest) if ln.rstrip().endswith("peer")]
        assert asked, f"{name_of(holder)} owns {digest} but no peer asked it"
        for node in nodes:
            if node is not holder:
                assert not [ln for ln in node.log_lines(digest) if ln.rstrip().endswith("peer")]


def test_a_node_streams_the_owners_download_to_its_clients_while_it_runs(
    registry: Registry, aio: AioThread, upstream_ports: set[int], proxy_factory
):
    size = 60 * 1000 * 1000
    repo = "pub/cluster-stream"
    digest = big_blob(registry, repo, size)
    relay = ThrottledRelay(aio, registry.port, rate=20e6).start()  # ~3 s upstream
    upstream_ports.add(relay.port)
    try:
        nodes = make_cluster(proxy_factory)
        holder = owner_of(nodes, digest)
        others = [n for n in nodes if n is not holder]
        jobs = [(others[i % 2], relay.port) for i in range(6)] + [(holder, relay.port)] * 2
        results = asyncio.run(gather_fetches(jobs, "slow.rc.test", f"/v2/{repo}/blobs/{digest}"))
    finally:
        relay.stop()
    for i, r in enumerate(results):
        assert r.status == 200 and r.complete, f"client {i}: {r.status} {r.error}"
        assert r.sha256 == digest and r.received == size, f"client {i}: wrong bytes"
    assert len(registry.blob_requests(digest)) == 1
    carried = [c for c in relay.conns if c.down >= size]
    assert len(carried) == 1, f"connections that carried the blob: {len(carried)}"
    ended = carried[0].last_down
    assert ended - carried[0].opened > 1.5, "the relay did not throttle"
    late = [i for i, r in enumerate(results[:6]) if r.first_byte_at >= ended]
    assert not late, f"clients of other nodes whose first byte came after the download: {late}"


def test_owner_killed_mid_fetch_the_other_nodes_clients_still_get_the_blob(
    registry: Registry, aio: AioThread, upstream_ports: set[int], proxy_factory
):
    size = 100 * 1000 * 1000
    repo = "pub/cluster-kill"
    digest = big_blob(registry, repo, size)
    relay = ThrottledRelay(aio, registry.port, rate=20e6).start()  # ~5 s upstream
    upstream_ports.add(relay.port)
    try:
        nodes = make_cluster(proxy_factory)
        holder = owner_of(nodes, digest)
        others = [n for n in nodes if n is not holder]
        jobs = [(others[i % 2], relay.port) for i in range(6)]

        async def run() -> list:
            clients = asyncio.ensure_future(
                gather_fetches(jobs, "slow.rc.test", f"/v2/{repo}/blobs/{digest}")
            )
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            while not any(c.down >= size // 2 for c in relay.conns):
                assert loop.time() < deadline, "the owner's download never got half way"
                await asyncio.sleep(0.05)
            kill9(holder)
            return await clients

        results = asyncio.run(run())
    finally:
        relay.stop()
    for i, r in enumerate(results):
        assert r.status == 200 and r.complete, f"client {i}: {r.status} {r.error}"
        assert r.sha256 == digest and r.received == size, f"client {i}: wrong bytes"
    for node in others:
        assert node.log_lines("broke off after"), node.output()[-3000:]
        blob = node.cache_dir / "blobs" / "sha256" / digest[7:9] / digest[7:]
        assert wait_until(blob.exists, timeout=30), f"{name_of(node)} did not store it"
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == digest[7:]
    # The owner's one GET, then the new owner's (the one of the two left that rendezvous
    # hashing picks) for the rest; the other asked the new owner.
    assert len(registry.blob_requests(digest)) == 2
    successor = owner_of(others, digest)
    other = next(n for n in others if n is not successor)
    assert successor.log_lines("the rest from slow.rc.test"), successor.output()[-3000:]
    assert other.log_lines("the rest from owner peer"), other.output()[-3000:]
    # the rest came with a Range: no node downloaded the whole blob again
    resumed = [c for c in relay.conns if c.down > 0 and c is not max(relay.conns, key=_down)]
    assert all(c.down < size for c in resumed), [c.down for c in resumed]


def _down(conn: ThrottledRelay.Conn) -> int:
    return conn.down


def test_an_owner_that_is_down_is_not_waited_for(registry: Registry, proxy_factory):
    nodes = make_cluster(proxy_factory)
    holder = owner_of(nodes, "")  # stopped now; each digest below is owned by it
    asker = next(n for n in nodes if n is not holder)
    repo = "pub/cluster-down"
    digests = []
    while len(digests) < 2:
        data = os.urandom(4096)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if owner_of(nodes, digest) is holder:
            registry.upload_blob(repo, data, digest)
            digests.append(digest)
    kill9(holder)
    for digest in digests:
        started = time.monotonic()
        r = asker.get(registry.netloc, f"/v2/{repo}/blobs/{digest}")
        took = time.monotonic() - started
        assert r.status == 200 and r.sha256 == digest, r.text()[:300]
        assert took < 5, f"{took:.1f}s for a blob whose owner is down"
    # asked once, then remembered as down: the second miss did not try it
    assert len(asker.log_lines("cannot be asked")) == 1, asker.output()[-2000:]


def test_peer_requests_need_the_cluster_key_and_reach_only_where_clients_may(
    registry: Registry, proxy_factory
):
    nodes = make_cluster(proxy_factory, 2)
    node = nodes[0]
    repo = "pub/cluster-auth"
    data = os.urandom(10000)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    registry.upload_blob(repo, data, digest)
    target = f"/_peer/v2/{repo}/blobs/{digest}?registry=registry.rc.test%3A{registry.port}"
    key = cluster_key(node)
    assert key == cluster_key(nodes[1])
    stranger = peer_auth.peer_key(ec.generate_private_key(ec.SECP256R1()))
    assert peer_get(node, target, None)[0] == 403
    assert peer_get(node, target, peer_auth.sign(stranger, "GET", target))[0] == 403
    assert peer_get(node, target, peer_auth.sign(key, "GET", target + "&x=1"))[0] == 403
    assert peer_get(node, target, peer_auth.sign(key, "GET", target, time.time() - 300))[0] == 403
    assert registry.blob_requests(digest) == []  # none of them reached the registry
    # signed: the blob, through the node's cache (and so a MISS then a HIT)
    status, body = peer_get(node, target, peer_auth.sign(key, "GET", target))
    assert status == 200 and body == data
    assert len(registry.blob_requests(digest)) == 1
    # only blobs, by digest, from registries a client could reach through this node
    at = f"registry=registry.rc.test%3A{registry.port}"
    refused = {
        "metadata": f"/_peer/v2/{repo}/blobs/{digest}?registry=169.254.169.254",
        "port": f"/_peer/v2/{repo}/blobs/{digest}?registry=registry.rc.test%3A22",
        "loopback by glob": f"/_peer/v2/{repo}/blobs/{digest}?registry=localhost.localdomain",
        "manifest": f"/_peer/v2/{repo}/manifests/{digest}?{at}",
        "tag": f"/_peer/v2/{repo}/manifests/latest?{at}",
    }
    for why, path in refused.items():
        status, body = peer_get(node, path, peer_auth.sign(key, "GET", path))
        assert status in (400, 403), f"{why}: {status} {body[:200]!r}"


def test_a_registry_outside_intercept_is_refused_to_peers(registry: Registry, proxy_factory):
    nodes = make_cluster(proxy_factory, 2, intercept=[f"registry.rc.test:{registry.port}"])
    node = nodes[0]
    key = cluster_key(node)
    digest = "sha256:" + "0" * 64
    for registry_name in ("example.com", "ghcr.io", f"private.rc.test%3A{registry.port}"):
        path = f"/_peer/v2/pub/x/blobs/{digest}?registry={registry_name}"
        status, body = peer_get(node, path, peer_auth.sign(key, "GET", path))
        assert status == 403 and b"intercept" in body, (registry_name, status, body[:200])


def test_a_peer_that_sends_wrong_bytes_is_not_asked_again(registry: Registry, proxy_factory):
    """The owner's stored copy is damaged (same size, other bytes: a bad disk): the
    asking node's fetch fails instead of storing or finishing them, the owner is not
    asked again for a while, and the client's next try gets the registry's bytes."""
    nodes = make_cluster(proxy_factory, n=2)
    repo = "pub/cluster-lying-peer"
    while True:
        data = os.urandom(1 << 20)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if owner_of(nodes, digest) is nodes[0]:
            break
    registry.upload_blob(repo, data, digest)
    holder, asker = nodes
    r = holder.get(registry.netloc, f"/v2/{repo}/blobs/{digest}")
    assert r.status == 200 and r.sha256 == digest
    path = blob_path(holder.cache_dir, digest)
    path.write_bytes(bytes(b ^ 0xFF for b in path.read_bytes()[:4096]) + data[4096:])

    first = asker.get(registry.netloc, f"/v2/{repo}/blobs/{digest}")
    # Cut short (or refused): never the damaged bytes as a whole answer.
    assert first.status != 200 or not first.complete, (first.status, first.sha256)
    assert not blob_path(asker.cache_dir, digest).exists()
    assert asker.log_lines("sent wrong bytes"), asker.output()[-3000:]
    assert len(registry.blob_requests(digest)) == 1  # the holder's only

    again = asker.get(registry.netloc, f"/v2/{repo}/blobs/{digest}")
    assert again.status == 200 and again.sha256 == digest, again.text()[:300]
    assert len(registry.blob_requests(digest)) == 2  # from the registry, not the owner
    stored = blob_path(asker.cache_dir, digest)
    assert "sha256:" + hashlib.sha256(stored.read_bytes()).hexdigest() == digest

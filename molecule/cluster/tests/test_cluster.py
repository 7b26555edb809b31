"""Two cache nodes with one CA and one S3 bucket: each node serves the same CA, every
client trusts it, Docker clients spread over the nodes, a blob fetched through one node
is served through the other from the bucket (no second upstream GET), and the containerd
client still pulls with its first mirror stopped. In this order."""

from __future__ import annotations

import re
import secrets
import time

import yaml
from conftest import (
    BUCKET,
    CA_DIR,
    CLIENT_CA,
    DOCKER_CLIENTS,
    NODES,
    PORT,
    REGISTRY,
    blob_requests,
    docker_clean,
    get,
    image_blobs,
    ok,
)
from testinfra.host import Host

APP = "public/app"
OTHER = "public/other"
TAG = "1"
# containerd falls back to the registry itself when every mirror fails; an unreachable
# proxy for direct traffic (the mirrors exempt) proves that a mirror served the pull.
NO_DIRECT = (
    f"HTTPS_PROXY=http://127.0.0.1:9 HTTP_PROXY=http://127.0.0.1:9 NO_PROXY={','.join(NODES)}"
)


def served_ca(host: Host) -> str:
    return ok(host, "curl -fsS http://127.0.0.1:%s/ca.crt", str(PORT))


def test_both_nodes_serve_the_same_ca(node1: Host, node2: Host) -> None:
    first = served_ca(node1)
    assert "BEGIN CERTIFICATE" in first
    assert served_ca(node2) == first
    for name in ("ca.crt", "ca.key"):
        assert node1.file(f"{CA_DIR}/{name}").sha256sum == node2.file(f"{CA_DIR}/{name}").sha256sum
    key = node2.file(f"{CA_DIR}/ca.key")
    assert key.mode == 0o600
    assert key.user == "registry-cache"
    # No rotation under way: no next or previous CA on either node.
    for host in (node1, node2):
        assert not host.file(f"{CA_DIR}/next.crt").exists
        assert not host.file(f"{CA_DIR}/previous.crt").exists


def test_each_node_names_the_bucket_and_every_peer(node: Host) -> None:
    config = yaml.safe_load(ok(node, "cat /etc/registry-cache/config.yml"))
    assert config["store"]["type"] == "s3"
    assert config["store"]["bucket"] == BUCKET
    assert config["store"]["endpoint"] == "http://rc-seaweed:8333"
    assert config["peers"] == [f"{n}:{PORT}" for n in NODES]
    assert config["shared_max_size"] == "4g"
    assert node.file("/etc/registry-cache/config.yml").mode == 0o640


def test_each_client_trusts_the_cluster_ca(node1: Host, docker_client: tuple[Host, str]) -> None:
    client, node = docker_client
    assert client.file(CLIENT_CA).content_string == served_ca(node1)
    drop_in = client.file("/etc/systemd/system/docker.service.d/http-proxy.conf").content_string
    assert f"HTTPS_PROXY=http://{node}:{PORT}" in drop_in
    info = ok(client, "docker info --format '{{.HTTPSProxy}}'").strip()
    assert info == f"http://{node}:{PORT}"


def test_the_containerd_client_lists_both_nodes(node1: Host, containerd: Host) -> None:
    bundle = containerd.file("/etc/containerd/registry-cache/bundle.crt").content_string
    assert served_ca(node1) in bundle
    hosts_toml = containerd.file(f"/etc/containerd/certs.d/{REGISTRY}/hosts.toml").content_string
    mirrors = re.findall(r'^\[host\."https://([^"]+)"\]', hosts_toml, re.M)
    assert sorted(mirrors) == sorted(f"{n}:{PORT}" for n in NODES)


def test_the_second_node_serves_from_the_bucket(upstream: Host, seaweed: Host) -> None:
    """rc-cl-docker1 pulls through rc-node1 (the blobs come from upstream and go to the
    bucket), then rc-cl-docker2 through rc-node2: no blob is fetched upstream again."""
    first, second = (get(name) for name in sorted(DOCKER_CLIENTS))
    for client in (first, second):
        docker_clean(client)
    ok(first, "docker pull -q %s/%s:%s", REGISTRY, APP, TAG)
    fetched = blob_requests(upstream, APP)
    assert [r for r in fetched if r.method == "GET"], "the first pull fetched nothing upstream"

    # The node that fetched a blob uploads it behind its clients: it waits while it is
    # still downloading (at most 30 s), so the bucket fills a little after the pull.
    hexdigests = [d.split(":", 1)[1] for d in image_blobs(upstream, APP, TAG)]
    missing = bucket_missing(seaweed, hexdigests)
    deadline = time.monotonic() + 120
    while missing and time.monotonic() < deadline:
        time.sleep(2)
        missing = bucket_missing(seaweed, hexdigests)
    assert not missing, f"not in the bucket 120 s after the pull: {missing}"

    ok(second, "docker pull -q %s/%s:%s", REGISTRY, APP, TAG)
    again = blob_requests(upstream, APP)
    assert [r for r in again if r.method == "GET"] == [r for r in fetched if r.method == "GET"]


def bucket_missing(seaweed: Host, hexdigests: list[str]) -> list[str]:
    """The digests no key of the bucket names (the key layout is the proxy's)."""
    listing = ok(seaweed, "curl -fsS 'http://127.0.0.1:8333/%s?list-type=2'", BUCKET)
    keys = re.findall(r"<Key>([^<]+)</Key>", listing)
    return [h for h in hexdigests if not any(h in key for key in keys)]


def test_containerd_pulls_with_its_first_mirror_stopped(containerd: Host) -> None:
    hosts_toml = containerd.file(f"/etc/containerd/certs.d/{REGISTRY}/hosts.toml").content_string
    first = re.findall(r'^\[host\."https://([^":]+):\d+"\]', hosts_toml, re.M)[0]
    stopped = get(first)
    ok(stopped, "systemctl stop registry-cache.service")
    try:
        namespace = f"rc-test-{secrets.token_hex(4)}"
        ok(
            containerd,
            f"{NO_DIRECT} ctr -n %s images pull --hosts-dir /etc/containerd/certs.d %s",
            namespace,
            f"{REGISTRY}/{OTHER}:{TAG}",
        )
    finally:
        ok(stopped, "systemctl start registry-cache.service")
        ok(
            stopped,
            "for i in $(seq 60); do curl -fsS http://127.0.0.1:%s/healthz && exit 0; sleep 1; done;"
            " exit 1",
            str(PORT),
        )

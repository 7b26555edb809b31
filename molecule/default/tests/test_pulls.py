"""Docker pulls through the cache: first from upstream, then from the cache, with the
cache's credentials for a private repository; pushes are refused. In this order."""

from __future__ import annotations

from conftest import (
    CACHE_DIR,
    PUSH_REFUSED,
    REGISTRY,
    blob_requests,
    docker_clean,
    image_blobs,
    ipv4,
    ok,
    requests_total,
    upstream_digest,
    upstream_log,
)
from testinfra.host import Host

MULTI = "public/multi"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
PUBLIC = "public/app"
PRIVATE = "private/app"
TAG = "1"


def pulled_digest(client: Host, repo: str) -> str:
    ref = ok(
        client, "docker image inspect -f '{{index .RepoDigests 0}}' %s/%s:%s", REGISTRY, repo, TAG
    )
    return ref.strip().split("@", 1)[1]


def test_public_pull_on_client1(cache: Host, upstream: Host, client1: Host) -> None:
    docker_clean(client1)
    served_before = requests_total(cache, "blob", "HIT") + requests_total(cache, "blob", "MISS")
    ok(client1, "docker pull %s/%s:%s", REGISTRY, PUBLIC, TAG)
    assert pulled_digest(client1, PUBLIC) == upstream_digest(upstream, PUBLIC, TAG)
    served = requests_total(cache, "blob", "HIT") + requests_total(cache, "blob", "MISS")
    assert served - served_before >= len(image_blobs(upstream, PUBLIC, TAG))
    # the blobs came to the cache from the upstream, asked for by the cache, not the client
    fetched = {r.uri.rsplit("/", 1)[1] for r in blob_requests(upstream, PUBLIC) if r.status == 200}
    assert image_blobs(upstream, PUBLIC, TAG) <= fetched
    client_ips = {ipv4(client1)}
    assert not [r for r in upstream_log(upstream) if r.client in client_ips]


def test_same_pull_on_client2_is_served_from_the_cache(
    cache: Host, upstream: Host, client2: Host
) -> None:
    docker_clean(client2)
    hits_before = requests_total(cache, "blob", "HIT")
    upstream_blobs_before = len(blob_requests(upstream, PUBLIC))
    ok(client2, "docker pull %s/%s:%s", REGISTRY, PUBLIC, TAG)
    assert pulled_digest(client2, PUBLIC) == upstream_digest(upstream, PUBLIC, TAG)
    assert requests_total(cache, "blob", "HIT") - hits_before >= len(
        image_blobs(upstream, PUBLIC, TAG)
    )
    assert len(blob_requests(upstream, PUBLIC)) == upstream_blobs_before, (
        "blobs fetched upstream again"
    )


def test_multiarch_pull_through_a_front_that_gzips(
    cache: Host, upstream: Host, client1: Host, client2: Host
) -> None:
    """The registry's nginx gzips every answer for clients that accept gzip, as Docker
    does: the cache asks for the exact bytes, and stores the registry's own index."""
    index = upstream_digest(upstream, MULTI, TAG, OCI_INDEX)
    for client in (client1, client2):
        ok(client, "docker pull %s/%s:%s", REGISTRY, MULTI, TAG)
        assert pulled_digest(client, MULTI) == index
    hexd = index.split(":", 1)[1]
    stored = ok(cache, "sha256sum %s/blobs/sha256/%s/%s", CACHE_DIR, hexd[:2], hexd)
    assert stored.split()[0] == hexd


def test_private_pull_with_the_cache_credentials(
    cache: Host, upstream: Host, client1: Host
) -> None:
    # the repository is private: without credentials the registry refuses it
    status = ok(
        upstream,
        "curl -sk -o /dev/null -w '%%{http_code}' https://127.0.0.1/v2/%s/manifests/%s",
        PRIVATE,
        TAG,
    )
    assert status == "401"
    # the client holds no credentials of its own
    assert not client1.file("/root/.docker/config.json").exists
    docker_clean(client1)
    ok(client1, "docker pull %s/%s:%s", REGISTRY, PRIVATE, TAG)
    assert pulled_digest(client1, PRIVATE) == upstream_digest(upstream, PRIVATE, TAG)
    authed = [r for r in blob_requests(upstream, PRIVATE) if r.status == 200]
    assert authed and all(r.user == "puller" for r in authed)


def test_push_through_the_cache_is_refused(cache: Host, upstream: Host, client1: Host) -> None:
    ref = f"{REGISTRY}/public/pushed:{TAG}"
    # an image of its own, so that the push has a new layer to upload
    ok(client1, "tar -C /etc -c hostname machine-id | docker import - %s", ref)
    refused_before = requests_total(cache, "push", "PASS")
    res = client1.run("docker push %s", ref)
    assert res.rc != 0
    assert PUSH_REFUSED in res.stdout + res.stderr
    assert requests_total(cache, "push", "PASS") > refused_before
    writes = [r for r in upstream_log(upstream) if r.method in {"POST", "PUT", "PATCH", "DELETE"}]
    assert not writes, f"a write reached the upstream: {writes}"


def test_clients_never_reached_the_upstream_directly(
    upstream: Host,
    client1: Host,
    client2: Host,
    docker_mirror: Host,
    containerd: Host,
    podman: Host,
) -> None:
    hosts = (client1, client2, docker_mirror, containerd, podman)
    client_ips = {ipv4(host) for host in hosts}
    assert len(client_ips) == len(hosts)
    assert not [r for r in upstream_log(upstream) if r.client in client_ips]

"""A tag's answer cached for one Accept variant is given to another client only when the
registry would have given that client the same manifest.

distribution 2.8 (as Docker Hub) gives a client that accepts no manifest list the
linux/amd64 image manifest of a multi-platform tag instead of the list: that answer must
never reach a client that accepts lists (on an arm64 host it would pull amd64).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.client import Response, get_tag
from support.durability import cli, make_multiplatform_image
from support.images import skopeo
from support.registry import Registry
from support.topology import Pki

pytestmark = pytest.mark.integration

AMD64, ARM64 = "linux/amd64", "linux/arm64"
V2 = "application/vnd.docker.distribution.manifest.v2+json"
LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"

OLD = f"{OCI_MANIFEST}, {V2}"  # a client that knows no manifest lists
V2_ONLY = V2  # another such client, with another Accept variant
MODERN = f"{V2}, {LIST}, {OCI_INDEX}, {OCI_MANIFEST}"  # Docker 25+
DOCKER_20 = f"{MODERN}, application/vnd.docker.distribution.manifest.v1+prettyjws"


def push_list(reg: Registry, pki: Pki, layout: Path, repo: str, *tags: str) -> None:
    """Pushes the layout's index as a Docker manifest list (with schema 2 images), the
    type distribution picks the amd64 image out of for a client that does not accept it."""
    for tag in tags:
        res = skopeo(
            "copy",
            "--all",
            "--format",
            "v2s2",
            "--dest-cert-dir",
            str(pki.cert_dir),
            f"oci:{layout}:latest",
            f"docker://{reg.netloc}/{repo}:{tag}",
        )
        assert res.returncode == 0, f"skopeo push --all {repo}:{tag} failed:\n{res.stderr}"


def direct(reg: Registry, repo: str, tag: str, accept: str) -> tuple[str, str, bytes]:
    """What upstream answers this Accept itself: (digest, media type, body)."""
    status, headers, body = reg.api("GET", f"/v2/{repo}/manifests/{tag}", None, {"Accept": accept})
    assert status == 200, (status, body)
    return headers["Docker-Content-Digest"], headers["Content-Type"].split(";")[0], body


def answered(r: Response) -> tuple[str | None, str]:
    return r.headers.get("docker-content-digest"), r.headers.get("content-type", "").split(";")[0]


def multi_arch_upstream(
    make_registry, pki: Pki, tmp_path: Path, repo: str, *tags: str
) -> tuple[Registry, str, str]:
    """A registry holding a linux/amd64 + linux/arm64 manifest list under `tags`; returns
    it, the list's digest and the digest of the amd64 image an old client gets instead."""
    reg = make_registry()
    image = make_multiplatform_image(tmp_path / "mp", {AMD64: [2000], ARM64: [3000]})
    push_list(reg, pki, image.layout, repo, *tags)
    list_digest, list_type, body = direct(reg, repo, tags[0], MODERN)
    assert list_type == LIST
    platforms = {
        f"{m['platform']['os']}/{m['platform']['architecture']}": m["digest"]
        for m in json.loads(body)["manifests"]
    }
    assert set(platforms) == {AMD64, ARM64}
    # the harness premise: upstream down-converts for a client that accepts no list
    amd64_digest, amd64_type, _ = direct(reg, repo, tags[0], OLD)
    assert (amd64_digest, amd64_type) == (platforms[AMD64], V2)
    return reg, list_digest, amd64_digest


def test_old_clients_amd64_answer_never_given_to_a_multi_arch_client(
    make_registry, pki: Pki, proxy_factory, tmp_path: Path
):
    repo = "variants/multi"
    reg, list_digest, amd64_digest = multi_arch_upstream(
        make_registry, pki, tmp_path, repo, "latest", "down"
    )
    proxy = proxy_factory(tag_ttl="5m", stale_if_error="1h")

    old = get_tag(proxy, reg, repo, "latest", accept=OLD)
    assert old.status == 200, old.text()
    assert answered(old) == (amd64_digest, V2) and old.cache == "MISS"

    for accept in (MODERN, DOCKER_20):
        head = get_tag(proxy, reg, repo, "latest", "HEAD", accept)
        assert head.status == 200, head.text()
        assert answered(head) == (list_digest, LIST), (accept, head.cache)
        got = get_tag(proxy, reg, repo, "latest", accept=accept)
        assert got.status == 200, got.text()
        assert answered(got) == (list_digest, LIST), (accept, got.cache)
        assert got.sha256 == list_digest

    # each cached answer now a HIT for its own kind of client
    for accept, want in ((OLD, (amd64_digest, V2)), (MODERN, (list_digest, LIST))):
        again = get_tag(proxy, reg, repo, "latest", accept=accept)
        assert answered(again) == want and again.cache == "HIT", (accept, again.cache)

    # upstream down: the old client's answer is not served STALE to a multi-arch client
    cached = get_tag(proxy, reg, repo, "down", accept=OLD)
    assert answered(cached) == (amd64_digest, V2)
    reg.stop()
    refused = get_tag(proxy, reg, repo, "down", accept=MODERN)
    assert refused.status in (502, 503, 504), (refused.status, answered(refused), refused.cache)
    assert get_tag(proxy, reg, repo, "down", accept=V2_ONLY).cache in ("HIT", "STALE")


def test_answers_reused_where_the_registry_gives_the_same(
    make_registry, pki: Pki, proxy_factory, tmp_path: Path
):
    repo = "variants/reverse"
    reg, list_digest, amd64_digest = multi_arch_upstream(make_registry, pki, tmp_path, repo, "1.0")
    proxy = proxy_factory(tag_ttl="5m")

    first = get_tag(proxy, reg, repo, "1.0", accept=MODERN)
    assert answered(first) == (list_digest, LIST) and first.cache == "MISS"
    # the list, stored as it is upstream, is every list-accepting client's answer
    other = get_tag(proxy, reg, repo, "1.0", accept=DOCKER_20)
    assert answered(other) == (list_digest, LIST) and other.cache == "HIT"
    # ... but not an old client's: it gets what upstream gives it
    old = get_tag(proxy, reg, repo, "1.0", accept=OLD)
    assert answered(old) == (amd64_digest, V2) and old.cache == "MISS"
    assert old.sha256 == amd64_digest
    # and that amd64 image is the answer of another client accepting no list
    v2 = get_tag(proxy, reg, repo, "1.0", accept=V2_ONLY)
    assert answered(v2) == (amd64_digest, V2) and v2.cache == "HIT"
    assert answered(get_tag(proxy, reg, repo, "1.0", accept=MODERN)) == (list_digest, LIST)


def test_prefetched_answers_are_docker_hits(
    make_registry, image_factory, pki: Pki, proxy_factory, tmp_path: Path
):
    repo = "variants/prefetched"
    reg, list_digest, amd64_digest = multi_arch_upstream(make_registry, pki, tmp_path, repo, "mp")
    single = image_factory(f"{reg.netloc}/{repo}:single", [3000])
    proxy = proxy_factory(tag_ttl="5m")
    for tag in ("mp", "single"):
        res = cli(proxy, "prefetch", f"{reg.netloc}/{repo}:{tag}")
        assert res.returncode == 0, res.stderr

    # the prefetched index, and a single-platform image prefetch got while accepting
    # every index type, are what Docker gets from upstream: HITs
    for accept in (MODERN, DOCKER_20):
        mp = get_tag(proxy, reg, repo, "mp", accept=accept)
        assert answered(mp) == (list_digest, LIST) and mp.cache == "HIT", (accept, mp.cache)
    for accept in (MODERN, DOCKER_20, OLD):
        one = get_tag(proxy, reg, repo, "single", accept=accept)
        assert answered(one) == (single.manifest_digest, OCI_MANIFEST), accept
        assert one.cache == "HIT", (accept, one.cache)
    # an old client gets the amd64 image, as from upstream, not the index
    old = get_tag(proxy, reg, repo, "mp", accept=OLD)
    assert answered(old) == (amd64_digest, V2) and old.cache == "MISS"

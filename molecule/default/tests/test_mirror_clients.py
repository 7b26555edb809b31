"""The mirror clients after site.yml: Docker in mirror mode (rc-mirror), containerd
(rc-containerd) and podman (rc-podman) ask the cache first, trust its CA for the cache
alone, kept the settings they had, and a real pull on each is served by the cache's
mirror door (its access log names the client and the door)."""

from __future__ import annotations

import json
import secrets
import tomllib

from conftest import (
    CACHE_DIR,
    CLIENT_CA,
    DROP_IN,
    MIRROR_URL,
    REGISTRY,
    image_blobs,
    mirror_log,
    ok,
    upstream_digest,
)
from testinfra.host import Host

CERTS_DIR = "rc-cache:3128"
# Direct access fails for these pulls: containerd and podman fall back to the registry
# itself when the mirror fails, so only a pull that cannot go direct proves the mirror.
STARTS = "journalctl -u containerd.service -o cat | grep -c '^Started containerd'"
NO_DIRECT = "HTTPS_PROXY=http://127.0.0.1:9 HTTP_PROXY=http://127.0.0.1:9 NO_PROXY=rc-cache"


def cache_ca(cache: Host) -> str:
    return cache.file(f"{CACHE_DIR}/ca/ca.crt").content_string


def served_by_mirror(cache: Host, client: Host, repo: str, before: int) -> list[dict[str, str]]:
    """Mirror entries for repo's manifests and blobs after the first `before` entries."""
    entries = mirror_log(cache, client)[before:]
    return [e for e in entries if f"/v2/{repo}/" in e["url"] and e["status"] == "200"]


# --- Docker, mirror mode ---------------------------------------------------------------


def test_docker_daemon_json_keeps_its_keys(docker_mirror: Host) -> None:
    config = json.loads(docker_mirror.file("/etc/docker/daemon.json").content_string)
    assert config["registry-mirrors"] == [MIRROR_URL, "https://mirror.site.example"]
    assert config["log-driver"] == "json-file"
    assert config["log-opts"] == {"max-size": "10m", "max-file": "3"}


def test_docker_trusts_the_cache_for_the_mirror_only(cache: Host, docker_mirror: Host) -> None:
    assert docker_mirror.file(f"/etc/docker/certs.d/{CERTS_DIR}/ca.crt").content_string == cache_ca(
        cache
    )
    assert not docker_mirror.file(CLIENT_CA).exists
    assert not docker_mirror.file(DROP_IN).exists


def test_docker_info_shows_the_mirror_and_no_proxy(docker_mirror: Host) -> None:
    mirrors = json.loads(ok(docker_mirror, "docker info -f '{{json .RegistryConfig.Mirrors}}'"))
    assert mirrors[0] == MIRROR_URL + "/"
    assert ok(docker_mirror, "docker info -f '{{.HTTPSProxy}}'").strip() == ""


def test_docker_pulls_docker_hub_names_through_the_mirror(
    cache: Host, upstream: Host, docker_mirror: Host
) -> None:
    before = len(mirror_log(cache, docker_mirror))
    # Docker Hub is out of reach here: a pull that succeeds came from the mirror, which
    # answers Docker Hub's names from the test registry (mirror_default_registry).
    for repo in ("public/app", "private/app"):
        ok(docker_mirror, "docker pull -q %s:1", repo)
        digests = ok(docker_mirror, "docker image inspect -f '{{json .RepoDigests}}' %s:1", repo)
        assert upstream_digest(upstream, repo, "1") in digests
        served = served_by_mirror(cache, docker_mirror, repo, before)
        assert any("/manifests/" in e["url"] for e in served), served
        assert {e["url"].split("/")[0] for e in served} == {REGISTRY}


# --- containerd ------------------------------------------------------------------------


def test_containerd_hosts_toml(containerd: Host) -> None:
    for registry, server in (
        ("docker.io", "https://registry-1.docker.io"),
        (REGISTRY, f"https://{REGISTRY}"),
        ("_default", None),
    ):
        hosts = tomllib.loads(
            containerd.file(f"/etc/containerd/certs.d/{registry}/hosts.toml").content_string
        )
        assert hosts.get("server") == server
        host = hosts["host"][MIRROR_URL]
        assert host["capabilities"] == ["pull", "resolve"]
        assert host["ca"] == "/etc/containerd/registry-cache/bundle.crt"


def test_containerd_ca_is_the_caches(cache: Host, containerd: Host) -> None:
    ca = containerd.file("/etc/containerd/registry-cache/ca.crt")
    assert ca.content_string == cache_ca(cache)
    assert ca.mode == 0o644
    # outside a rotation the bundle hosts.toml names holds that one CA
    bundle = containerd.file("/etc/containerd/registry-cache/bundle.crt")
    assert bundle.content_string == cache_ca(cache)
    assert not containerd.file(CLIENT_CA).exists


def test_containerd_config_keeps_its_settings(containerd: Host) -> None:
    config = tomllib.loads(containerd.file("/etc/containerd/config.toml").content_string)
    cri = config["plugins"]["io.containerd.grpc.v1.cri"]
    assert cri["registry"]["config_path"] == "/etc/containerd/certs.d"
    # Debian's own settings and the site's (molecule prepare) are all still there.
    assert cri["cni"] == {"bin_dir": "/usr/lib/cni", "conf_dir": "/etc/cni/net.d"}
    assert config["plugins"]["io.containerd.internal.v1.opt"]["path"] == "/var/lib/containerd/opt"
    assert config["debug"]["level"] == "info"
    assert cri["registry"]["configs"][REGISTRY]["auth"]["username"] == "site-user"
    dump = ok(containerd, "containerd config dump")
    assert 'config_path = "/etc/containerd/certs.d"' in dump


def test_containerd_restarted_once(containerd: Host) -> None:
    """Once at converge (config.toml changed), not at the idempotence run."""
    before = int(containerd.file("/root/containerd-starts.before").content_string)
    now = int(ok(containerd, STARTS))
    assert now == before + 1
    assert containerd.service("containerd").is_running


def test_containerd_pulls_through_the_mirror(cache: Host, upstream: Host, containerd: Host) -> None:
    before = len(mirror_log(cache, containerd))
    namespace = f"rc-test-{secrets.token_hex(4)}"
    for repo in ("public/app", "private/app"):
        ok(
            containerd,
            f"{NO_DIRECT} ctr -n %s images pull --hosts-dir /etc/containerd/certs.d %s",
            namespace,
            f"{REGISTRY}/{repo}:1",
        )
        served = served_by_mirror(cache, containerd, repo, before)
        assert any("/manifests/" in e["url"] for e in served), served
        # containerd shares blobs between namespaces: a blob already held (from an
        # earlier run) is not fetched again, so count every blob the mirror ever served it.
        ever = served_by_mirror(cache, containerd, repo, 0)
        blobs = {e["url"].rsplit("/", 1)[1] for e in ever if "/blobs/" in e["url"]}
        assert blobs == image_blobs(upstream, repo, "1"), ever


# --- podman ----------------------------------------------------------------------------


def test_podman_drop_in(podman: Host) -> None:
    dropin = podman.file("/etc/containers/registries.conf.d/50-registry-cache.conf")
    assert dropin.mode == 0o644
    registries = tomllib.loads(dropin.content_string)["registry"]
    assert [(r["prefix"], r["location"], r["mirror"]) for r in registries] == [
        (name, name, [{"location": f"{CERTS_DIR}/{name}"}]) for name in ("docker.io", REGISTRY)
    ]
    info = json.loads(ok(podman, "podman info -f '{{json .Registries}}'"))
    assert info[REGISTRY]["Mirrors"][0]["Location"] == f"{CERTS_DIR}/{REGISTRY}"


def test_podman_site_drop_in_left_alone(podman: Host) -> None:
    site = "/etc/containers/registries.conf.d/10-site.conf"
    before = podman.file("/root/rc-snapshot.before").content_string
    digest = ok(podman, "sha256sum %s", site).strip()
    assert digest in before.splitlines()


def test_podman_trusts_the_cache_for_the_mirror_only(cache: Host, podman: Host) -> None:
    assert podman.file(f"/etc/containers/certs.d/{CERTS_DIR}/ca.crt").content_string == cache_ca(
        cache
    )
    assert not podman.file(CLIENT_CA).exists


def test_podman_pulls_through_the_mirror(cache: Host, upstream: Host, podman: Host) -> None:
    before = len(mirror_log(cache, podman))
    for repo in ("public/app", "private/app"):
        ok(podman, f"{NO_DIRECT} podman pull -q %s", f"{REGISTRY}/{repo}:1")
        served = served_by_mirror(cache, podman, repo, before)
        assert any("/manifests/" in e["url"] for e in served), served
        digest = ok(podman, "podman image inspect -f '{{.Digest}}' %s", f"{REGISTRY}/{repo}:1")
        assert digest.strip().startswith("sha256:")


def test_kubelet_style_pull_follows_config_path(cache: Host, containerd: Host) -> None:
    """A pull through the CRI plugin (what kubelet asks for) finds hosts.toml through
    config.toml's config_path. containerd itself has no proxy and does not trust the
    test registry's CA, so the pull can only have come from the cache."""
    namespace_images = "ctr -n k8s.io images ls -q"
    before = len(mirror_log(cache, containerd))
    ref = f"{REGISTRY}/public/multi:1"
    ok(containerd, "ctr -n k8s.io images rm %s || true", ref)
    ok(containerd, "cri-pull %s", ref)
    assert ref in ok(containerd, namespace_images).split()
    served = served_by_mirror(cache, containerd, "public/multi", before)
    assert any("/manifests/" in e["url"] for e in served), served

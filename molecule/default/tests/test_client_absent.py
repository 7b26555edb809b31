"""Client 2 after `docker_client_state: absent` (side_effect.yml): no drop-in, no CA, and
Docker pulls straight from the registry again, not through the cache."""

from __future__ import annotations

import pytest
from conftest import (
    CLIENT_CA,
    DROP_IN,
    REGISTRY,
    docker_clean,
    get,
    ipv4,
    leaf_via_cache,
    ok,
    requests_total,
    upstream_log,
)
from testinfra.host import Host

pytestmark = pytest.mark.absent

DIRECT = "public/pushme"


def test_no_drop_in(client2: Host) -> None:
    assert not client2.file(DROP_IN).exists


def test_no_proxy_in_dockers_environment(client2: Host) -> None:
    env = ok(client2, "systemctl show docker -p Environment --value")
    assert "PROXY" not in env.upper()
    info = ok(client2, "docker info -f '{{.HTTPProxy}}|{{.HTTPSProxy}}'").strip()
    assert info == "|"
    assert client2.service("docker").is_running


def test_cache_ca_no_longer_trusted(client2: Host) -> None:
    assert not client2.file(CLIENT_CA).exists
    assert not client2.file("/etc/ssl/certs/registry-cache-ca.pem").exists
    path = ok(client2, "mktemp").strip()
    try:
        leaf_via_cache(client2, path)  # the cache still answers; the client no longer trusts it
        res = client2.run("openssl verify -CAfile /etc/ssl/certs/ca-certificates.crt %s", path)
        assert res.rc != 0, res.stdout
    finally:
        client2.run("rm -f %s", path)


def test_pulls_directly(cache: Host, upstream: Host, client2: Host) -> None:
    docker_clean(client2)
    served_before = requests_total(cache, "blob", "HIT") + requests_total(cache, "blob", "MISS")
    ok(client2, "docker pull %s/%s:1", REGISTRY, DIRECT)
    mine = [r for r in upstream_log(upstream) if r.client == ipv4(client2)]
    assert any(r.uri.startswith(f"/v2/{DIRECT}/blobs/") and r.status == 200 for r in mine)
    served = requests_total(cache, "blob", "HIT") + requests_total(cache, "blob", "MISS")
    assert served == served_before, "the cache served a blob to a client that left it"


# --- the mirror clients after state: absent ---------------------------------------------


@pytest.mark.parametrize("name", ["rc-mirror", "rc-containerd", "rc-podman"])
def test_mirror_client_left_as_it_was(name: str) -> None:
    """Every file a client role may touch is as it was before converge (rc-snapshot)."""
    host = get(name)
    before = host.file("/root/rc-snapshot.before").content_string
    assert ok(host, "rc-snapshot") == before

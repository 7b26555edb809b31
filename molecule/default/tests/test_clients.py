"""Each Docker host: trusts the cache's CA and sends Docker's pulls through the cache."""

from __future__ import annotations

from conftest import CACHE, CACHE_PORT, DROP_IN, REGISTRY, leaf_via_cache, ok
from testinfra.host import Host

PROXY_URL = f"http://{CACHE}:{CACHE_PORT}"


def test_cache_ca_in_system_trust(client: Host, tmpfile: str) -> None:
    leaf_via_cache(client, tmpfile)
    # the leaf the cache makes for the upstream's name verifies with the system's CAs only
    res = client.run("openssl verify -CAfile /etc/ssl/certs/ca-certificates.crt %s", tmpfile)
    assert res.rc == 0 and res.stdout.strip().endswith(": OK"), res.stdout + res.stderr
    names = ok(client, "openssl x509 -in %s -noout -ext subjectAltName", tmpfile)
    assert f"DNS:{REGISTRY}" in names


def test_drop_in(client: Host) -> None:
    drop_in = client.file(DROP_IN)
    assert drop_in.is_file
    assert drop_in.user == "root"
    text = drop_in.content_string
    assert "[Service]" in text
    assert f'Environment="HTTP_PROXY={PROXY_URL}"' in text
    assert f'Environment="HTTPS_PROXY={PROXY_URL}"' in text
    assert 'Environment="NO_PROXY=localhost,127.0.0.1,::1"' in text


def test_docker_service_environment(client: Host) -> None:
    env = ok(client, "systemctl show docker -p Environment --value").split()
    assert f"HTTP_PROXY={PROXY_URL}" in env
    assert f"HTTPS_PROXY={PROXY_URL}" in env
    assert client.service("docker").is_running


def test_docker_info_shows_the_proxy(client: Host) -> None:
    info = ok(client, "docker info -f '{{.HTTPProxy}}|{{.HTTPSProxy}}|{{.NoProxy}}'").strip()
    assert info == f"{PROXY_URL}|{PROXY_URL}|localhost,127.0.0.1,::1"

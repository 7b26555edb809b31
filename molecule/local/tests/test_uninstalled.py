"""After `make uninstall` on both hosts: no trace of the roles is left, each check naming
what it looked for; the cache data and the CA stay (make uninstall keeps them unless
registry_cache_purge_data is true), and Docker pulls without the cache."""

from __future__ import annotations

import pytest
import testinfra
from testinfra.host import Host

pytestmark = pytest.mark.uninstalled

HOSTS = ("rc-local", "rc-local-bare")
GONE_FILES = (
    "/etc/systemd/system/registry-cache.service",
    "/etc/registry-cache",
    "/opt/registry-cache",
    "/etc/systemd/system/docker.service.d/http-proxy.conf",
    "/etc/systemd/system/docker.service.d/http-proxy.env",
    "/usr/local/share/ca-certificates/registry-cache-ca.crt",
    "/usr/local/share/ca-certificates/registry-cache-ca-next.crt",
    "/usr/local/share/ca-certificates/registry-cache-ca-previous.crt",
)
KEPT_FILES = ("/var/lib/registry-cache/index.sqlite3", "/var/lib/registry-cache/ca/ca.crt")


@pytest.fixture(scope="module", params=HOSTS)
def host(request: pytest.FixtureRequest) -> Host:
    return testinfra.get_host(f"docker://{request.param}")


@pytest.mark.parametrize("path", GONE_FILES)
def test_file_gone(host: Host, path: str) -> None:
    assert not host.file(path).exists


def test_service_gone(host: Host) -> None:
    state = host.run("systemctl show -p LoadState --value registry-cache.service").stdout.strip()
    assert state == "not-found"
    assert not host.socket("tcp://0.0.0.0:3128").is_listening


def test_user_and_group_gone(host: Host) -> None:
    assert not host.user("registry-cache").exists
    assert not host.group("registry-cache").exists


def test_ca_no_longer_trusted(host: Host) -> None:
    bundle = host.file("/etc/ssl/certs/ca-certificates.crt").content_string
    ca = host.file("/var/lib/registry-cache/ca/ca.crt").content_string.strip()
    assert ca and ca not in bundle


def test_docker_without_the_proxy(host: Host) -> None:
    info = host.run("docker info -f '{{.HTTPProxy}}|{{.HTTPSProxy}}'")
    assert info.rc == 0 and info.stdout.strip() == "|"


@pytest.mark.parametrize("path", KEPT_FILES)
def test_cache_data_and_ca_kept(host: Host, path: str) -> None:
    assert host.file(path).is_file

"""After `make install` on rc-local (with Docker) and rc-local-bare (without: make install
installed Debian's docker.io): the cache runs there, the local Docker pulls through it.

(Molecule's idempotence step already ran `make install` a second time and found nothing
changed.) Instances as in ../molecule.yml, reached with `docker exec`.
"""

from __future__ import annotations

import json
import re

import pytest
import testinfra
from testinfra.host import Host

REGISTRY = "registry.example.test"
PROXY_URL = "http://127.0.0.1:3128"
IMAGE = "public/app"


HOSTS = ("rc-local", "rc-local-bare")


@pytest.fixture(scope="module", params=HOSTS)
def local(request: pytest.FixtureRequest) -> Host:
    return testinfra.get_host(f"docker://{request.param}")


@pytest.fixture(scope="module")
def registry() -> Host:
    return testinfra.get_host("docker://rc-local-registry")


def ok(host: Host, command: str, *args: str) -> str:
    res = host.run(command, *args)
    assert res.rc == 0, f"{command} failed ({res.rc}):\n{res.stdout}\n{res.stderr}"
    return res.stdout


def blob_requests(local: Host) -> float:
    """Blob requests the cache answered so far (any result)."""
    text = ok(local, "curl -fsS %s/metrics", PROXY_URL)
    total = 0.0
    for m in re.finditer(r"^registry_cache_requests_total\{([^}]*)\} (\S+)$", text, re.M):
        if 'kind="blob"' in m[1]:
            total += float(m[2])
    return total


def test_cache_service_running(local: Host) -> None:
    service = local.service("registry-cache")
    assert service.is_running
    assert service.is_enabled
    assert local.socket("tcp://0.0.0.0:3128").is_listening
    health = json.loads(ok(local, "curl -fsS %s/healthz", PROXY_URL))
    assert health["status"] == "ok"


def test_local_docker_configured(local: Host) -> None:
    info = ok(local, "docker info -f '{{.HTTPProxy}}|{{.HTTPSProxy}}'").strip()
    assert info == f"{PROXY_URL}|{PROXY_URL}"
    served = ok(local, "curl -fsS %s/ca.crt", PROXY_URL).strip()
    installed = local.file("/usr/local/share/ca-certificates/registry-cache-ca.crt")
    assert installed.content_string.strip() == served


def test_docker_pull_goes_through_the_cache(local: Host, registry: Host) -> None:
    ok(local, "docker image prune -af")
    before = blob_requests(local)
    ok(local, "docker pull %s/%s:1", REGISTRY, IMAGE)
    manifest = json.loads(
        ok(
            registry,
            "curl -fsS -H %s http://127.0.0.1:5000/v2/%s/manifests/1",
            "Accept: application/vnd.docker.distribution.manifest.v2+json",
            IMAGE,
        )
    )
    digests = [manifest["config"]["digest"], *(layer["digest"] for layer in manifest["layers"])]
    assert blob_requests(local) - before >= len(digests), "the cache did not count the pull's blobs"
    # and its access log names each blob of the image
    log = ok(local, "journalctl -u registry-cache --no-pager -o cat")
    for digest in digests:
        assert f"{REGISTRY}/v2/{IMAGE}/blobs/{digest}" in log
    # the image Docker holds is the registry's
    ref = ok(local, "docker image inspect -f '{{index .RepoDigests 0}}' %s/%s:1", REGISTRY, IMAGE)
    head = ok(
        registry,
        "curl -fsSI -H %s http://127.0.0.1:5000/v2/%s/manifests/1",
        "Accept: application/vnd.docker.distribution.manifest.v2+json",
        IMAGE,
    )
    assert ref.strip().split("@")[1] in head


def test_docker_io_installed_where_there_was_none() -> None:
    bare = testinfra.get_host("docker://rc-local-bare")
    assert bare.package("docker.io").is_installed
    assert bare.service("docker").is_enabled


def test_make_install_ran_the_oldest_supported_ansible_core(local: Host) -> None:
    """The wheelhouse holds ansible-core 2.16 only (molecule/local/prepare.yml): the
    minimum the README and the roles' meta state is the one make install ran."""
    version = ok(local, "/root/registry-cache/.venv-install/bin/ansible --version")
    assert version.splitlines()[0].startswith("ansible [core 2.16."), version

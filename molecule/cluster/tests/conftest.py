"""Fixtures for the cluster scenario's Testinfra checks (names as in ../molecule.yml).

The helpers that read the upstream registry and the instances are the default scenario's
(molecule/default/tests/conftest.py), imported from there; the fixtures are this
scenario's own instances.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import testinfra
from testinfra.host import Host

_DEFAULT = Path(__file__).resolve().parents[2] / "default" / "tests" / "conftest.py"
_spec = importlib.util.spec_from_file_location("default_conftest", _DEFAULT)
assert _spec and _spec.loader
shared = importlib.util.module_from_spec(_spec)
sys.modules["default_conftest"] = shared
_spec.loader.exec_module(shared)

UPSTREAM = "rc-cl-upstream"
SEAWEED = "rc-seaweed"
NODES = ("rc-node1", "rc-node2")
# The node each Docker client's inventory name hashes to (sha1 modulo 2).
DOCKER_CLIENTS = {"rc-cl-docker1": "rc-node1", "rc-cl-docker2": "rc-node2"}
CONTAINERD = "rc-cl-containerd"
BUCKET = "registry-cache"
PORT = 3128
CA_DIR = "/var/lib/registry-cache/ca"
CLIENT_CA = shared.CLIENT_CA
REGISTRY = shared.REGISTRY

ok = shared.ok
ipv4 = shared.ipv4
blob_requests = shared.blob_requests
image_blobs = shared.image_blobs
docker_clean = shared.docker_clean


def get(name: str) -> Host:
    return testinfra.get_host(f"docker://{name}")


@pytest.fixture(scope="session")
def upstream() -> Host:
    return get(UPSTREAM)


@pytest.fixture(scope="session")
def seaweed() -> Host:
    return get(SEAWEED)


@pytest.fixture(scope="session")
def node1() -> Host:
    return get(NODES[0])


@pytest.fixture(scope="session")
def node2() -> Host:
    return get(NODES[1])


@pytest.fixture(scope="session", params=NODES)
def node(request: pytest.FixtureRequest) -> Host:
    return get(request.param)


@pytest.fixture(scope="session", params=sorted(DOCKER_CLIENTS))
def docker_client(request: pytest.FixtureRequest) -> tuple[Host, str]:
    """A Docker client and the node it should use."""
    return get(request.param), DOCKER_CLIENTS[request.param]


@pytest.fixture(scope="session")
def containerd() -> Host:
    return get(CONTAINERD)

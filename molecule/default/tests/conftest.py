"""Fixtures for the fleet's Testinfra checks: one testinfra host per instance.

The instances are reached with `docker exec` (testinfra's docker backend), which is
faster than going through Ansible for every command. Names as in ../molecule.yml.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import testinfra
from testinfra.host import Host

UPSTREAM = "rc-upstream"
CACHE = "rc-cache"
CLIENTS = ("rc-client1", "rc-client2")
# The mirror clients: Docker in mirror mode, containerd, podman.
DOCKER_MIRROR = "rc-mirror"
CONTAINERD = "rc-containerd"
PODMAN = "rc-podman"
MIRROR_URL = "https://rc-cache:3128"
REGISTRY = "registry.example.test"
CACHE_PORT = 3128
CACHE_USER = "registry-cache"
CACHE_DIR = "/var/lib/registry-cache"
CLIENT_CA = "/usr/local/share/ca-certificates/registry-cache-ca.crt"
DROP_IN = "/etc/systemd/system/docker.service.d/http-proxy.conf"
UPSTREAM_LOG = "/var/log/nginx/registry-access.log"
PUSH_REFUSED = "push is disabled on this registry cache"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "absent: checks after docker_client_state: absent (side_effect.yml runs them)"
    )


def get(name: str) -> Host:
    return testinfra.get_host(f"docker://{name}")


@pytest.fixture(scope="session")
def cache() -> Host:
    return get(CACHE)


@pytest.fixture(scope="session")
def upstream() -> Host:
    return get(UPSTREAM)


@pytest.fixture(scope="session", params=CLIENTS)
def client(request: pytest.FixtureRequest) -> Host:
    return get(request.param)


@pytest.fixture(scope="session")
def client1() -> Host:
    return get(CLIENTS[0])


@pytest.fixture(scope="session")
def client2() -> Host:
    return get(CLIENTS[1])


def ok(host: Host, command: str, *args: str) -> str:
    """Runs a command that must succeed; returns its stdout."""
    res = host.run(command, *args)
    assert res.rc == 0, f"{command % args if args else command} failed ({res.rc}):\n{res.stderr}"
    return res.stdout


METRIC_RE = re.compile(r"^(?P<name>[a-z_]+)(\{(?P<labels>[^}]*)\})? (?P<value>\S+)$")


def metrics(cache: Host) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    """The cache's /metrics, parsed: {(name, labels): value}."""
    out: dict[tuple[str, frozenset[tuple[str, str]]], float] = {}
    text = ok(cache, "curl -fsS http://127.0.0.1:%s/metrics", str(CACHE_PORT))
    for line in text.splitlines():
        m = METRIC_RE.match(line)
        if not m:
            continue
        labels = frozenset(re.findall(r'(\w+)="([^"]*)"', m["labels"] or ""))
        out[(m["name"], labels)] = float(m["value"])
    return out


def requests_total(cache: Host, kind: str, result: str) -> float:
    """registry_cache_requests_total{kind, result} (result compared without case)."""
    return sum(
        value
        for (name, labels), value in metrics(cache).items()
        if name == "registry_cache_requests_total"
        and dict(labels).get("kind") == kind
        and dict(labels).get("result", "").lower() == result.lower()
    )


@pytest.fixture(scope="session")
def docker_mirror() -> Host:
    return get(DOCKER_MIRROR)


@pytest.fixture(scope="session")
def containerd() -> Host:
    return get(CONTAINERD)


@pytest.fixture(scope="session")
def podman() -> Host:
    return get(PODMAN)


ACCESS_RE = re.compile(
    r"registry_cache\.access: (?P<client>\S+) (?P<user>\S+) (?P<method>\S+) (?P<url>\S+) "
    r"(?P<status>\d{3}) (?P<result>\S+) (?P<bytes>\d+) \S+s (?P<door>\S+)"
)


def mirror_log(cache: Host, client: Host) -> list[dict[str, str]]:
    """The cache's access-log entries of mirror requests (door `mirror`) from a client:
    client, user, method, url (registry and path), status, result, bytes, door."""
    address = ipv4(client)
    text = ok(cache, "journalctl -u registry-cache.service -o cat --no-pager")
    entries = [m.groupdict() for m in map(ACCESS_RE.search, text.splitlines()) if m]
    return [e for e in entries if e["client"] == address and e["door"] == "mirror"]


@dataclass
class LogLine:
    client: str
    method: str
    uri: str
    status: int
    user: str


LOG_RE = re.compile(r'^(\S+) "(\S+) (\S+) [^"]*" (\d{3}) \d+ "([^"]*)"$')


def upstream_log(upstream: Host) -> list[LogLine]:
    """The upstream registry's access log (nginx, format `registry` of test-registry.yml)."""
    lines = []
    for raw in ok(upstream, "cat %s", UPSTREAM_LOG).splitlines():
        m = LOG_RE.match(raw)
        if m:
            lines.append(LogLine(m[1], m[2], m[3], int(m[4]), m[5]))
    return lines


def blob_requests(upstream: Host, repo: str) -> list[LogLine]:
    return [r for r in upstream_log(upstream) if r.uri.startswith(f"/v2/{repo}/blobs/")]


def ipv4(host: Host) -> str:
    """The instance's address on the test network (eth0; docker0 is the inner engine's)."""
    return ok(host, "ip -4 -o addr show dev eth0").split()[3].split("/")[0]


def upstream_digest(
    upstream: Host,
    repo: str,
    tag: str,
    accept: str = "application/vnd.docker.distribution.manifest.v2+json",
) -> str:
    """The manifest digest the registry itself holds for repo:tag (asked on loopback)."""
    headers = ok(
        upstream,
        "curl -fsSI -H %s http://127.0.0.1:5000/v2/%s/manifests/%s",
        f"Accept: {accept}",
        repo,
        tag,
    )
    for line in headers.splitlines():
        if line.lower().startswith("docker-content-digest:"):
            return line.split(":", 1)[1].strip()
    raise AssertionError(f"no Docker-Content-Digest for {repo}:{tag}:\n{headers}")


def image_blobs(upstream: Host, repo: str, tag: str) -> set[str]:
    """Digests of the config and layers of repo:tag, from the registry itself."""
    manifest = json.loads(
        ok(
            upstream,
            "curl -fsS -H %s http://127.0.0.1:5000/v2/%s/manifests/%s",
            "Accept: application/vnd.docker.distribution.manifest.v2+json",
            repo,
            tag,
        )
    )
    return {manifest["config"]["digest"], *(layer["digest"] for layer in manifest["layers"])}


def docker_clean(host: Host) -> None:
    """Removes every image from the client's engine, so that a pull fetches every blob."""
    ok(host, "docker image prune -af")
    assert ok(host, "docker images -q").strip() == ""


def leaf_via_cache(client: Host, path: str, proxy: str = f"{CACHE}:{CACHE_PORT}") -> None:
    """Writes to path (on the client) the certificate the cache presents for the upstream."""
    ok(
        client,
        "openssl s_client -proxy %s -connect %s:443 -servername %s </dev/null 2>/dev/null"
        " | openssl x509 -out %s",
        proxy,
        REGISTRY,
        REGISTRY,
        path,
    )


@pytest.fixture
def tmpfile(client: Host) -> Iterator[str]:
    path = ok(client, "mktemp").strip()
    yield path
    client.run("rm -f %s", path)

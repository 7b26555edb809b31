"""Fixtures of the security tests (issue 6). The TLS registries on loopback, the image
pusher and the proxy runner are the integration fixtures, imported, not copied."""

from __future__ import annotations

import fcntl
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from integration.conftest import (  # noqa: F401
    aio,
    hosts,
    image_factory,
    make_registry,
    pki,
    private_registry,
    proxy_factory,
    registry,
    token_setup,
    upstream_ports,
    workroot,
)
from security.secsupport import NetLab
from support.net import HOSTNAMES
from support.proxy import Proxy
from support.topology import Pki

# Names that resolve where a proxy must not connect, and that no test config intercepts
# by name (the integration configs name only *.rc.test explicitly).
LOOPBACK_ALIAS = "loopback-alias.rcsec.test"
METADATA_ALIAS = "metadata-alias.rcsec.test"
HOSTS_MARK = "# registry-cache security tests"


@pytest.fixture(scope="session")
def hostile_names() -> Iterator[dict[str, str]]:
    """/etc/hosts entries for a name resolving to loopback and one to 169.254.169.254."""
    entries = {LOOPBACK_ALIAS: "127.0.0.1", METADATA_ALIAS: "169.254.169.254"}
    lines = [f"{ip} {name} {HOSTS_MARK}" for name, ip in entries.items()]

    def rewrite(add: bool) -> None:
        with Path("/etc/hosts").open("r+") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            kept = [ln for ln in f.read().splitlines() if not ln.endswith(HOSTS_MARK)]
            f.seek(0)
            f.truncate()
            f.write("\n".join(kept + (lines if add else [])) + "\n")

    rewrite(True)
    try:
        for name, ip in entries.items():
            assert socket.gethostbyname(name) == ip, name
        yield entries
    finally:
        rewrite(False)


@pytest.fixture(scope="session")
def netlab() -> Iterator[NetLab]:
    """Two network namespaces on veth pairs (removed at teardown, even after a failure)."""
    lab = NetLab.create()
    try:
        yield lab
    finally:
        lab.destroy()


def proxy_config(test_pki: Pki, ports: set[int], **config: Any) -> dict[str, Any]:
    """The integration proxy_factory's base config, with `config` on top."""
    base: dict[str, Any] = {
        "upstream_ca_bundle": str(test_pki.ca_path),
        "intercept": ["*", *HOSTNAMES],
        "allowed_ports": sorted({443, *ports}),
        "tag_ttl": "5m",
    }
    base.update(config)
    return base


@pytest.fixture(scope="module")
def module_proxy(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., Proxy]]:
    """A proxy shared by one module's tests (start it after the upstreams it needs)."""
    made: list[Proxy] = []
    test_pki: Pki = request.getfixturevalue("pki")
    ports: set[int] = request.getfixturevalue("upstream_ports")

    def make(**config: Any) -> Proxy:
        workdir = tmp_path_factory.mktemp("secproxy")
        proxy = Proxy(workdir, proxy_config(test_pki, ports, **config))
        made.append(proxy)
        return proxy.start()

    yield make
    for proxy in made:
        proxy.stop()
    broken = [p.stderr_path for p in made if "Traceback" in p.stderr()]
    if broken:
        pytest.fail(f"proxy stderr has a Traceback: {[str(b) for b in broken]}")

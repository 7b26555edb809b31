"""Fixtures for the integration tests: real registries over TLS on loopback, a token
issuer, a redirecting front with a "CDN", a throttling relay and the proxy itself.

Everything listens on 127.0.0.1 on free ports under names in *.rc.test (added to
/etc/hosts), lives in pytest's tmp dirs and is stopped at teardown.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from support.images import Image, make_image, push
from support.net import HOSTNAMES, ensure_hosts_entries
from support.pki import TestCA
from support.proxy import Proxy
from support.registry import Registry
from support.seaweed import Seaweed
from support.servers import AioThread, Front, TokenIssuer
from support.topology import PRIVATE_CREDS, TOKEN_CREDS, Pki, TokenSetup


@pytest.fixture(scope="session")
def hosts() -> None:
    ensure_hosts_entries()


@pytest.fixture(scope="session")
def workroot(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("rc")


@pytest.fixture(scope="session")
def pki(workroot: Path, hosts: None) -> Pki:
    ca = TestCA(workroot / "pki")
    server = ca.issue("server", [*HOSTNAMES, "127.0.0.1"])
    signer = ca.issue("token-signer", ["rc-test-token-signer"], server=False)
    cert_dir = workroot / "pki-certs.d"
    cert_dir.mkdir()
    (cert_dir / "ca.crt").write_bytes(ca.cert_path.read_bytes())
    return Pki(ca, server, signer, cert_dir)


@pytest.fixture(scope="session")
def upstream_ports() -> set[int]:
    """Every port a test upstream listens on: the proxy's allowed_ports."""
    return set()


@pytest.fixture(scope="session")
def aio() -> Iterator[AioThread]:
    loop = AioThread()
    yield loop
    loop.close()


@pytest.fixture(scope="session")
def registry(workroot: Path, pki: Pki, upstream_ports: set[int]) -> Iterator[Registry]:
    """The public registry: no auth."""
    reg = Registry(workroot / "registry-public", "registry.rc.test", pki.server).start()
    upstream_ports.add(reg.port)
    yield reg
    reg.stop()


@pytest.fixture(scope="session")
def private_registry(workroot: Path, pki: Pki, upstream_ports: set[int]) -> Iterator[Registry]:
    """The private registry: htpasswd (distribution's htpasswd auth is registry-wide)."""
    reg = Registry(
        workroot / "registry-private", "private.rc.test", pki.server, htpasswd=PRIVATE_CREDS
    ).start()
    upstream_ports.add(reg.port)
    yield reg
    reg.stop()


@pytest.fixture(scope="session")
def token_setup(
    workroot: Path, pki: Pki, aio: AioThread, upstream_ports: set[int]
) -> Iterator[TokenSetup]:
    issuer = TokenIssuer(
        aio,
        "auth.rc.test",
        pki.server,
        pki.signer,
        pki.ca_path,
        service="tokenreg.rc.test",
        issuer="rc-test-issuer",
        user=TOKEN_CREDS[0],
        password=TOKEN_CREDS[1],
    ).start()
    reg = Registry(
        workroot / "registry-token",
        "tokenreg.rc.test",
        pki.server,
        token=issuer.registry_auth_config(),
    ).start()
    front = Front(aio, "tokenreg.rc.test", pki.server, reg.netloc, pki.ca_path).start()
    upstream_ports.update({issuer.port, reg.port, front.port})
    yield TokenSetup(issuer, reg, front)
    front.stop()
    reg.stop()
    issuer.stop()


@pytest.fixture
def make_registry(
    tmp_path: Path, pki: Pki, upstream_ports: set[int]
) -> Iterator[Callable[..., Registry]]:
    """Dedicated registries for tests that stop or damage their upstream."""
    made: list[Registry] = []
    counter = itertools.count()

    def make(hostname: str = "scratch.rc.test", **kw: Any) -> Registry:
        reg = Registry(tmp_path / f"registry-{next(counter)}", hostname, pki.server, **kw).start()
        upstream_ports.add(reg.port)
        made.append(reg)
        return reg

    yield make
    for reg in made:
        reg.stop()


@pytest.fixture
def image_factory(tmp_path: Path, pki: Pki) -> Callable[..., Image]:
    """make_image + push: a generated image with random layers, pushed to `ref`."""
    counter = itertools.count()

    def make(
        ref: str,
        layer_sizes: list[int] | None = None,
        creds: tuple[str, str] | None = None,
        base: Image | None = None,
    ) -> Image:
        """`base`: an image whose layers this one starts with (shared blobs)."""
        img = make_image(tmp_path / f"image-{next(counter)}", layer_sizes or [4096], base=base)
        push(img, ref, pki.cert_dir, creds)
        return img

    return make


@pytest.fixture
def proxy_factory(
    tmp_path: Path, pki: Pki, upstream_ports: set[int]
) -> Iterator[Callable[..., Proxy]]:
    """Start `python -m proxy_app serve` with a test config (keys override defaults)."""
    made: list[Proxy] = []
    counter = itertools.count()

    def make(start: bool = True, command_prefix: tuple[str, ...] = (), **config: Any) -> Proxy:
        base: dict[str, Any] = {
            "upstream_ca_bundle": str(pki.ca_path),
            "intercept": ["*", *HOSTNAMES],  # loopback upstreams must be named exactly
            "allowed_ports": sorted({443, *upstream_ports}),
            "tag_ttl": "5m",
        }
        base.update(config)
        proxy = Proxy(tmp_path / f"proxy-{next(counter)}", base, command_prefix)
        made.append(proxy)
        return proxy.start() if start else proxy

    yield make
    for proxy in made:
        proxy.stop()
    # whatever a test did, the proxy never printed a traceback (stop included)
    broken = [p.stderr_path for p in made if "Traceback" in p.stderr()]
    if broken:
        pytest.fail(f"proxy stderr has a Traceback: {[str(b) for b in broken]}")


@pytest.fixture(scope="session")
def seaweed(workroot: Path) -> Iterator[Seaweed]:
    """SeaweedFS's S3 gateway on loopback, with credentials; each test makes its bucket."""
    server = Seaweed(workroot / "seaweed").start()
    yield server
    server.stop()


@pytest.fixture
def bucket(seaweed: Seaweed) -> str:
    return seaweed.make_bucket()


@pytest.fixture
def make_seaweed(tmp_path: Path) -> Iterator[Callable[[], Seaweed]]:
    """A SeaweedFS of a test's own, for tests that stop and start it."""
    made: list[Seaweed] = []
    counter = itertools.count()

    def make() -> Seaweed:
        server = Seaweed(tmp_path / f"seaweed-{next(counter)}").start()
        made.append(server)
        return server

    yield make
    for server in made:
        server.stop()

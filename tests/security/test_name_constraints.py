"""Issue 6, Must show 4: a CA with name constraints (ca_name_constraints: [rc.test]).

Through the running proxy, a client's TLS check of the leaf for registry.rc.test succeeds
(Python's ssl, and skopeo, which is Go); the proxy refuses to CONNECT (and so to sign)
for other names. A leaf that the proxy's own CA key does sign for a name outside the
constraints, as a thief of the key would, fails the client's TLS check (Python and Go).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from security.conftest import LOOPBACK_ALIAS
from security.secsupport import connect_head, exchange, pull_args, skopeo_via
from support.client import read_response
from support.images import layout_blobs, skopeo
from support.proxy import Proxy
from support.registry import Registry

from proxy_app.ca import CertificateAuthority

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def constrained(module_proxy, registry: Registry, hostile_names) -> Proxy:
    return module_proxy(ca_name_constraints=["rc.test"])


@pytest.fixture(scope="module")
def served_ca(constrained: Proxy, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The CA as a client gets it: from the running proxy's /ca.crt."""
    with urllib.request.urlopen(f"{constrained.url}/ca.crt", timeout=10) as r:
        pem = r.read()
    d = tmp_path_factory.mktemp("served-ca")
    (d / "ca.crt").write_bytes(pem)
    return d


def test_served_ca_carries_the_constraints(served_ca: Path):
    cert = x509.load_pem_x509_certificate((served_ca / "ca.crt").read_bytes())
    ext = cert.extensions.get_extension_for_class(x509.NameConstraints)
    assert ext.critical
    assert ext.value.permitted_subtrees == [x509.DNSName("rc.test")]


def test_permitted_name_verifies_through_the_proxy(
    constrained: Proxy, served_ca: Path, registry: Registry, image_factory, tmp_path: Path
):
    async def check() -> tuple[dict, int]:
        reader, writer = await asyncio.open_connection("127.0.0.1", constrained.port)
        try:
            writer.write(connect_head(registry.netloc))
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), head
            ctx = ssl.create_default_context(cafile=str(served_ca / "ca.crt"))
            await writer.start_tls(ctx, server_hostname=registry.hostname)
            peer = writer.get_extra_info("peercert")
            writer.write(f"GET /v2/ HTTP/1.1\r\nHost: {registry.netloc}\r\n\r\n".encode())
            await writer.drain()
            resp = await read_response(reader, "GET")
            return peer, resp.status
        finally:
            writer.close()

    peer, status = asyncio.run(asyncio.wait_for(check(), 30))
    assert ("DNS", registry.hostname) in peer["subjectAltName"], peer
    assert status == 200
    # Go's verifier (skopeo) takes it too: a whole pull through the constrained proxy
    ref = f"{registry.netloc}/sec/constrained:latest"
    img = image_factory(ref, [3000])
    res = skopeo_via(constrained.url, *pull_args(constrained, ref, tmp_path / "out"))
    assert res.returncode == 0, res.stderr
    assert set(img.blob_digests) <= layout_blobs(tmp_path / "out")


@pytest.mark.parametrize(
    "target",
    ["quay.io:443", "evilrc.test:443", "rc.test.evil.example:443", "registry.rc.testing:443"],
)
def test_connect_outside_the_constraints_is_refused(constrained: Proxy, target: str):
    resp = exchange("127.0.0.1", constrained.port, connect_head(target))
    assert resp.status == 403, (resp.status, resp.text())
    assert "ca_name_constraints" in resp.text(), resp.text()


class LeafServer:
    """A TLS server on loopback presenting a leaf the proxy's CA signed for `name`."""

    def __init__(self, ctx: ssl.SSLContext) -> None:
        self.ctx = ctx
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with contextlib.suppress(OSError), conn:
                conn.settimeout(5)
                with self.ctx.wrap_socket(conn, server_side=True) as tls:
                    tls.recv(4096)
                    tls.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accept()
        self.sock.close()
        self.thread.join(5)


@pytest.fixture
def ca_of_proxy(constrained: Proxy) -> CertificateAuthority:
    """The running proxy's CA, key included, loaded from its ca_dir."""
    return CertificateAuthority.load(constrained.ca_path.parent)


@contextlib.contextmanager
def leaf_server(ca: CertificateAuthority, name: str) -> Iterator[LeafServer]:
    server = LeafServer(ca.server_context(name))  # signs without the proxy's permits check
    try:
        yield server
    finally:
        server.close()


def python_verify(cafile: Path, port: int, name: str) -> None:
    ctx = ssl.create_default_context(cafile=str(cafile))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname=name) as tls,
    ):
        tls.sendall(b"GET / HTTP/1.1\r\n\r\n")
        tls.recv(100)


@pytest.mark.parametrize("name", ["quay.io", "evilrc.test", LOOPBACK_ALIAS])
def test_leaf_for_a_name_outside_the_constraints_fails_tls_checks(
    ca_of_proxy: CertificateAuthority, served_ca: Path, name: str
):
    with leaf_server(ca_of_proxy, name) as server:
        with pytest.raises(ssl.SSLCertVerificationError) as info:
            python_verify(served_ca / "ca.crt", server.port, name)
        assert "permitted subtree violation" in str(info.value), info.value


def test_leaf_inside_and_outside_the_constraints_with_go(
    ca_of_proxy: CertificateAuthority, served_ca: Path
):
    """skopeo (Go's crypto/x509) against a leaf for a permitted name and one outside."""
    with leaf_server(ca_of_proxy, "registry.rc.test") as server:
        python_verify(served_ca / "ca.crt", server.port, "registry.rc.test")
    with leaf_server(ca_of_proxy, LOOPBACK_ALIAS) as server:
        res = skopeo(
            "inspect",
            "--cert-dir",
            str(served_ca),
            "--retry-times",
            "0",
            f"docker://{LOOPBACK_ALIAS}:{server.port}/any/image:latest",
        )
        assert res.returncode != 0
        assert "not authorized to sign for this name" in res.stderr, res.stderr

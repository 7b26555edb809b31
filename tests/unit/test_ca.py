import os
import socket
import ssl
import threading
from pathlib import Path

import pytest

from proxy_app.ca import CAError, CertificateAuthority


def test_ca_is_made_once_and_kept(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path / "ca")
    assert os.stat(tmp_path / "ca" / "ca.key").st_mode & 0o777 == 0o600
    again = CertificateAuthority.load_or_create(tmp_path / "ca")
    assert again.fingerprint() == ca.fingerprint()


def test_world_readable_key_is_refused(tmp_path: Path) -> None:
    CertificateAuthority.load_or_create(tmp_path / "ca")
    os.chmod(tmp_path / "ca" / "ca.key", 0o644)
    with pytest.raises(CAError, match="chmod 600"):
        CertificateAuthority.load_or_create(tmp_path / "ca")


def handshake(
    ca: CertificateAuthority,
    cafile: Path,
    server_name: str,
    leaf_for: str,
    client_ciphers: str | None = None,
) -> str:
    """Runs a TLS handshake against the leaf for `leaf_for`; returns the cipher agreed.
    `client_ciphers` (TLS 1.2, where Python can order them) is the client's preference."""
    server_ctx = ca.server_context(leaf_for)
    a, b = socket.socketpair()
    errors: list[BaseException] = []

    def serve() -> None:
        try:
            with server_ctx.wrap_socket(a, server_side=True) as s:
                s.recv(1)
        except (ssl.SSLError, OSError) as e:
            errors.append(e)

    t = threading.Thread(target=serve)
    t.start()
    client_ctx = ssl.create_default_context(cafile=str(cafile))
    if client_ciphers:
        client_ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        client_ctx.set_ciphers(client_ciphers)
    try:
        with client_ctx.wrap_socket(b, server_hostname=server_name) as c:
            c.send(b"x")
            cipher = c.cipher()
            return cipher[0] if cipher else ""
    finally:
        t.join(5)


def test_the_client_picks_the_cipher(tmp_path: Path) -> None:
    # Go clients (docker, skopeo) put AES-128-GCM first where the CPU has AES-NI; OpenSSL
    # left to itself would impose AES-256-GCM, costing every client more to decrypt.
    ca = CertificateAuthority.load_or_create(tmp_path / "ca")
    cafile = tmp_path / "ca" / "ca.crt"
    aes128, aes256 = "ECDHE-ECDSA-AES128-GCM-SHA256", "ECDHE-ECDSA-AES256-GCM-SHA384"
    assert handshake(ca, cafile, "ghcr.io", "ghcr.io", f"{aes128}:{aes256}") == aes128
    assert handshake(ca, cafile, "ghcr.io", "ghcr.io", f"{aes256}:{aes128}") == aes256


def test_leaf_verifies_for_its_host_only(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path / "ca")
    cafile = tmp_path / "ca" / "ca.crt"
    handshake(ca, cafile, "ghcr.io", "ghcr.io")
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(ca, cafile, "quay.io", "ghcr.io")
    assert ca.server_context("ghcr.io") is ca.server_context("GHCR.io")  # cached per host


def test_name_constraints_bind_what_the_ca_can_sign(tmp_path: Path) -> None:
    ca = CertificateAuthority.load_or_create(tmp_path / "ca", ("docker.io", "ghcr.io"))
    cafile = tmp_path / "ca" / "ca.crt"
    assert ca.permits("registry-1.docker.io") and ca.permits("ghcr.io")
    assert not ca.permits("quay.io") and not ca.permits("10.0.0.1")
    handshake(ca, cafile, "registry-1.docker.io", "registry-1.docker.io")
    # Even a leaf the key did sign for another name is rejected by the client's TLS check.
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake(ca, cafile, "quay.io", "quay.io")
    with pytest.raises(CAError, match="ca rotate"):
        CertificateAuthority.load_or_create(tmp_path / "ca", ("quay.io",))


def test_rotation_keeps_old_and_new_trusted_until_finished(tmp_path: Path) -> None:
    from proxy_app.ca import rotate_activate, rotate_finish, rotate_stage, trust_bundle

    ca_dir = tmp_path / "ca"
    old = CertificateAuthority.load_or_create(ca_dir)
    new = rotate_stage(ca_dir)
    assert trust_bundle(ca_dir).count(b"BEGIN CERTIFICATE") == 2
    rotate_activate(ca_dir)
    assert CertificateAuthority.load(ca_dir).fingerprint() == new.fingerprint()
    assert CertificateAuthority.load(ca_dir, "previous").fingerprint() == old.fingerprint()
    assert rotate_finish(ca_dir)
    assert trust_bundle(ca_dir).count(b"BEGIN CERTIFICATE") == 1

"""The proxy's certificate authority and the leaf certificates it mints per host.

The CA is made on first start and kept in `ca_dir` (`ca.key` mode 0600). Leaves share
one key per process (minting is then a signature, not a key generation) and their
SSL contexts are cached per host. The leaf key and certificate reach the ssl module
through a memfd, so no leaf key is ever written to disk.
"""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import socket
import ssl
from collections import OrderedDict
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

log = logging.getLogger(__name__)

CA_VALIDITY = datetime.timedelta(days=3650)
LEAF_VALIDITY = datetime.timedelta(days=365)
# Clients compare leaf times with their own clocks; a little slack absorbs clock skew.
CLOCK_SKEW = datetime.timedelta(hours=1)
LEAF_CACHE_SIZE = 4096


class CAError(RuntimeError):
    pass


def _write_private(path: Path, data: bytes, mode: int) -> None:
    """Writes a file atomically, created with `mode` (never briefly world-readable)."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.chmod(tmp, mode)
    os.replace(tmp, path)


def _public_der(key: Any) -> bytes:
    return bytes(
        key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def name_constraints_of(cert: x509.Certificate) -> tuple[str, ...]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.NameConstraints).value
    except x509.ExtensionNotFound:
        return ()
    return tuple(
        sorted(str(n.value) for n in ext.permitted_subtrees or () if isinstance(n, x509.DNSName))
    )


def name_permitted(host: str, constraints: tuple[str, ...]) -> bool:
    """RFC 5280 DNS name constraints: the name itself or any name below it."""
    if not constraints:
        return True
    try:
        ipaddress.ip_address(host)
        return False  # a constrained CA excludes every IP address
    except ValueError:
        pass
    host = host.lower().rstrip(".")
    return any(host == c or host.endswith("." + c.lstrip(".")) for c in constraints)


class CertificateAuthority:
    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> None:
        self.cert = cert
        self.key = key
        self.name_constraints = name_constraints_of(cert)
        self.cert_pem = cert.public_bytes(serialization.Encoding.PEM)
        self._leaf_key = ec.generate_private_key(ec.SECP256R1())
        self._leaf_key_pem = self._leaf_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        self._contexts: OrderedDict[str, ssl.SSLContext] = OrderedDict()
        # The mirror's own leaf: (names, when to renew it, its context).
        self._own: tuple[tuple[str, ...], datetime.datetime, ssl.SSLContext] | None = None

    # --- loading ------------------------------------------------------------------------

    @classmethod
    def load_or_create(
        cls, ca_dir: Path, name_constraints: tuple[str, ...] = ()
    ) -> CertificateAuthority:
        cert_path, key_path = ca_dir / "ca.crt", ca_dir / "ca.key"
        if cert_path.exists() and key_path.exists():
            ca = cls.load(ca_dir)
            if ca.name_constraints != tuple(sorted(name_constraints)):
                raise CAError(
                    f"the CA in {ca_dir} permits {list(ca.name_constraints) or 'every name'} but "
                    f"ca_name_constraints says {list(name_constraints) or 'none'}: run "
                    "`registry-cache ca rotate` to make a CA with the configured constraints"
                )
            return ca
        if cert_path.exists() or key_path.exists():
            raise CAError(
                f"{ca_dir} holds only one of ca.crt and ca.key; restore the other "
                "or remove both to make a new CA (clients must then trust the new one)"
            )
        ca_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
        ca = cls.create(name_constraints=name_constraints)
        ca.save(ca_dir, "ca")
        log.info("created a new CA in %s (fingerprint %s)", ca_dir, ca.fingerprint())
        return ca

    def save(self, ca_dir: Path, stem: str) -> None:
        _write_private(ca_dir / f"{stem}.key", self.key_pem(), 0o600)
        _write_private(ca_dir / f"{stem}.crt", self.cert_pem, 0o644)

    @classmethod
    def load(cls, ca_dir: Path, stem: str = "ca") -> CertificateAuthority:
        cert_path, key_path = ca_dir / f"{stem}.crt", ca_dir / f"{stem}.key"
        mode = key_path.stat().st_mode & 0o777
        if mode & 0o077:
            raise CAError(f"{key_path} is readable by others (mode {mode:o}); chmod 600 it")
        try:
            cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except (ValueError, OSError) as e:
            raise CAError(f"cannot load the CA from {ca_dir}: {e}") from e
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CAError(f"{key_path} is not an EC private key")
        if _public_der(cert.public_key()) != _public_der(key.public_key()):
            raise CAError(f"{cert_path} and {key_path} do not belong together")
        return cls(cert, key)

    @classmethod
    def create(
        cls, common_name: str | None = None, name_constraints: tuple[str, ...] = ()
    ) -> CertificateAuthority:
        key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Registry Cache"),
                x509.NameAttribute(
                    NameOID.COMMON_NAME,
                    common_name or f"Registry Cache CA ({socket.gethostname()})",
                ),
            ]
        )
        now = datetime.datetime.now(datetime.UTC)
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        builder = x509.CertificateBuilder()
        if name_constraints:
            # A stolen key can then sign only for these registries, and for no IP address.
            builder = builder.add_extension(
                x509.NameConstraints(
                    permitted_subtrees=[x509.DNSName(n) for n in sorted(name_constraints)],
                    excluded_subtrees=[
                        x509.IPAddress(ipaddress.ip_network("0.0.0.0/0")),
                        x509.IPAddress(ipaddress.ip_network("::/0")),
                    ],
                ),
                critical=True,
            )
        cert = (
            builder.subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(now + CA_VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )

    def fingerprint(self) -> str:
        return self.cert.fingerprint(hashes.SHA256()).hex(":")

    # --- leaves -------------------------------------------------------------------------

    def issue_leaf(self, host: str, *more: str) -> x509.Certificate:
        """A leaf for `host` (and `more` names: the mirror's own certificate)."""
        sans: list[x509.GeneralName] = []
        for name in (host, *more):
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                sans.append(x509.DNSName(name))
        now = datetime.datetime.now(datetime.UTC)
        # A certificate's CN is limited to 64 characters; the SAN carries the real name.
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host[:64])])
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self.cert.subject)
            .public_key(self._leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - CLOCK_SKEW)
            .not_valid_after(min(now + LEAF_VALIDITY, self.cert.not_valid_after_utc))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()),
                critical=False,
            )
            .sign(self.key, hashes.SHA256())
        )

    def permits(self, host: str) -> bool:
        return name_permitted(host, self.name_constraints)

    def server_context(self, host: str) -> ssl.SSLContext:
        """An SSL context presenting a leaf for `host`, cached (LRU) per host."""
        host = host.lower()
        ctx = self._contexts.get(host)
        if ctx is not None:
            self._contexts.move_to_end(host)
            return ctx
        ctx = self._context_for(self.issue_leaf(host))
        self._contexts[host] = ctx
        if len(self._contexts) > LEAF_CACHE_SIZE:
            self._contexts.popitem(last=False)
        return ctx

    def own_context(self, names: tuple[str, ...]) -> ssl.SSLContext:
        """An SSL context presenting one leaf for the cache's own names (the mirror's),
        whatever name a client asks for in SNI: a client that trusts the cache for its own
        name is never answered as another host. Those the CA may not sign for (its name
        constraints) are left out; made anew once the leaf is half way to expiry."""
        allowed = tuple(n for n in names if self.permits(n))
        now = datetime.datetime.now(datetime.UTC)
        held = self._own
        if held is not None and held[0] == allowed and held[1] > now:
            return held[2]
        if not allowed:
            raise ValueError(
                "none of mirror_names may be signed by this CA (ca_name_constraints); name "
                "the cache's host in both, or rotate the CA"
            )
        leaf = self.issue_leaf(*allowed)
        renew = now + (leaf.not_valid_after_utc - now) / 2
        ctx = self._context_for(leaf)
        self._own = (allowed, renew, ctx)
        return ctx

    def _context_for(self, leaf: x509.Certificate) -> ssl.SSLContext:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        # Every suite OpenSSL enables is strong, so let the client pick (Mozilla's advice):
        # Go clients (docker, skopeo) then take AES-128-GCM, which they decrypt faster than
        # the AES-256-GCM OpenSSL would choose for them.
        ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
        # HTTP/2 is not spoken inside the tunnel: say so, so clients settle on HTTP/1.1.
        ctx.set_alpn_protocols(["http/1.1"])
        pem = leaf.public_bytes(serialization.Encoding.PEM) + self.cert_pem + self._leaf_key_pem
        fd = os.memfd_create("registry-cache-leaf", os.MFD_CLOEXEC)
        try:
            os.write(fd, pem)
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
        finally:
            os.close(fd)
        return ctx


# --- rotation -----------------------------------------------------------------------------
# stage: a new CA is made as next.*; clients are given it to trust beside the current one.
# activate: current -> previous.*, next -> ca.*; the proxy (restarted) signs with the new CA.
# finish: previous.* removed, once no client needs it.


def rotation_state(ca_dir: Path) -> dict[str, str | None]:
    state: dict[str, str | None] = {}
    for stem in ("previous", "ca", "next"):
        path = ca_dir / f"{stem}.crt"
        state[stem] = (
            x509.load_pem_x509_certificate(path.read_bytes()).fingerprint(hashes.SHA256()).hex(":")
            if path.exists()
            else None
        )
    return state


def trust_bundle(ca_dir: Path) -> bytes:
    """Every CA certificate a client should trust now: current, next and previous."""
    return b"".join(
        (ca_dir / f"{stem}.crt").read_bytes()
        for stem in ("ca", "next", "previous")
        if (ca_dir / f"{stem}.crt").exists()
    )


def rotate_stage(ca_dir: Path, name_constraints: tuple[str, ...] = ()) -> CertificateAuthority:
    if (ca_dir / "next.crt").exists():
        return CertificateAuthority.load(ca_dir, "next")
    ca = CertificateAuthority.create(name_constraints=name_constraints)
    ca.save(ca_dir, "next")
    return ca


def rotate_activate(ca_dir: Path) -> None:
    if not (ca_dir / "next.crt").exists():
        raise CAError("no staged CA (next.crt): run `registry-cache ca rotate --stage` first")
    for suffix in ("crt", "key"):
        os.replace(ca_dir / f"ca.{suffix}", ca_dir / f"previous.{suffix}")
    for suffix in ("crt", "key"):
        os.replace(ca_dir / f"next.{suffix}", ca_dir / f"ca.{suffix}")


def rotate_finish(ca_dir: Path) -> bool:
    removed = False
    for suffix in ("crt", "key"):
        path = ca_dir / f"previous.{suffix}"
        if path.exists():
            path.unlink()
            removed = True
    return removed

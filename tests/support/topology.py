"""Shared names of the integration topology (used by conftest and the tests)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .pki import Issued, TestCA
from .registry import Registry
from .servers import Front, TokenIssuer

PRIVATE_CREDS = ("rcuser", "rc-pass-8e1f")
TOKEN_CREDS = ("tokuser", "tok-pass-41c2")


@dataclass
class Pki:
    ca: TestCA
    server: Issued  # one certificate for every test name
    signer: Issued  # signs the bearer tokens
    cert_dir: Path  # only ca.crt: for skopeo --dest-cert-dir

    @property
    def ca_path(self) -> Path:
        return self.ca.cert_path


@dataclass
class TokenSetup:
    issuer: TokenIssuer
    registry: Registry  # distribution with `auth: token`
    front: Front  # what clients talk to: records the Authorization headers

    @property
    def netloc(self) -> str:
        return self.front.netloc

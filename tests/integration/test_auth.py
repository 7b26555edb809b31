"""Must show 2 and 3: credentials held by the proxy, Basic (htpasswd) and bearer tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
from support.client import basic, fetch
from support.images import layout_blobs, pull
from support.registry import Registry
from support.topology import PRIVATE_CREDS, TOKEN_CREDS, TokenSetup

pytestmark = pytest.mark.integration


@pytest.fixture
def private_image(private_registry: Registry, image_factory):
    ref = f"{private_registry.netloc}/secret/app:latest"
    return ref, image_factory(ref, [20_000, 10_000], creds=PRIVATE_CREDS)


@pytest.mark.parametrize("form", ["string", "list"])
def test_private_repo_with_proxy_credentials(
    form: str, private_registry: Registry, private_image, proxy_factory, tmp_path: Path
):
    ref, img = private_image
    user, password = PRIVATE_CREDS
    if form == "string":  # the seed's form, host only, plus an unrelated entry
        auth = f"other.example:x:y {private_registry.hostname}:{user}:{password}"
    else:  # the list form, host:port
        auth = [{"host": private_registry.netloc, "username": user, "password": password}]
    proxy = proxy_factory(auth_registries=auth)
    res = pull(proxy, ref, tmp_path / "out", "--src-no-creds")
    assert res.returncode == 0, f"pull of the private repo without client creds:\n{res.stderr}"
    assert set(img.blob_digests) <= layout_blobs(tmp_path / "out")
    # secrets stay out of the proxy's output
    assert password not in proxy.output()


def test_private_repo_without_proxy_credentials_is_401(
    private_registry: Registry, private_image, proxy_factory, tmp_path: Path
):
    ref, img = private_image
    proxy = proxy_factory()
    res = pull(proxy, ref, tmp_path / "out", "--src-no-creds")
    assert res.returncode != 0
    assert "unauthorized" in res.stderr.lower() or "401" in res.stderr, res.stderr
    resp = fetch(
        proxy.port,
        str(proxy.ca_path),
        private_registry.hostname,
        private_registry.port,
        "GET",
        f"/v2/secret/app/blobs/{img.layer_digests[0]}",
    )
    assert resp.status == 401, (resp.status, resp.text())
    assert resp.headers.get("www-authenticate", "").lower().startswith("basic")
    assert not proxy.files_in_cache_blobs()


def test_private_repo_client_credentials_pass_through(
    private_registry: Registry, private_image, proxy_factory, tmp_path: Path
):
    """The proxy has no credentials; the client's own go upstream unchanged."""
    ref, img = private_image
    proxy = proxy_factory()
    res = pull(proxy, ref, tmp_path / "out", "--src-creds", ":".join(PRIVATE_CREDS))
    assert res.returncode == 0, res.stderr
    assert set(img.blob_digests) <= layout_blobs(tmp_path / "out")


@pytest.fixture
def token_image(token_setup: TokenSetup, image_factory):
    image = image_factory(
        f"{token_setup.registry.netloc}/tok/app:latest", [30_000, 8_000], creds=TOKEN_CREDS
    )
    token_setup.front.seen.clear()
    token_setup.issuer.seen.clear()
    return f"{token_setup.netloc}/tok/app:latest", image


def test_token_auth_credentials_at_realm_only(
    token_setup: TokenSetup, token_image, proxy_factory, tmp_path: Path
):
    ref, img = token_image
    issuer, front = token_setup.issuer, token_setup.front
    proxy = proxy_factory(
        auth_registries=f"{issuer.hostname}:{TOKEN_CREDS[0]}:{TOKEN_CREDS[1]}",
    )
    res = pull(proxy, ref, tmp_path / "out", "--src-no-creds")
    assert res.returncode == 0, f"token-auth pull through the proxy:\n{res.stderr}"
    assert set(img.blob_digests) <= layout_blobs(tmp_path / "out")

    expected = basic(*TOKEN_CREDS)
    assert issuer.seen, "the token endpoint was never asked"
    assert any(s.authorization == expected for s in issuer.seen), [
        s.authorization for s in issuer.seen
    ]
    # the registry saw bearer tokens (and anonymous first tries), never the Basic credentials
    registry_auth = [s.authorization for s in front.seen]
    assert any(a and a.startswith("Bearer ") for a in registry_auth), registry_auth
    assert all(a is None or a.startswith("Bearer ") for a in registry_auth), registry_auth
    assert TOKEN_CREDS[1] not in proxy.output()


def test_token_auth_without_proxy_credentials_fails(
    token_setup: TokenSetup, token_image, proxy_factory, tmp_path: Path
):
    ref, _ = token_image
    proxy = proxy_factory()
    res = pull(proxy, ref, tmp_path / "out", "--src-no-creds")
    assert res.returncode != 0
    assert "unauthorized" in res.stderr.lower() or "401" in res.stderr, res.stderr
    assert all(s.authorization is None for s in token_setup.issuer.seen)

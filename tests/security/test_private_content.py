"""verify_client_access: content pulled with one client's credentials is served from the
cache only to clients the upstream registry lets read it (a HEAD upstream per repository
and credential), against a real htpasswd registry and a real token-auth registry."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.client import Response, basic, fetch
from support.durability import wait_stored
from support.images import OCI_MANIFEST, layout_blobs, pull, skopeo
from support.proxy import Proxy
from support.registry import Registry
from support.topology import PRIVATE_CREDS, TOKEN_CREDS, TokenSetup

pytestmark = pytest.mark.integration


def get(proxy: Proxy, registry_host: str, port: int, path: str, auth: str | None) -> Response:
    headers = {"Accept": OCI_MANIFEST}
    if auth:
        headers["Authorization"] = auth
    return fetch(proxy.port, str(proxy.ca_path), registry_host, port, "GET", path, headers)


def test_private_content_is_served_only_to_clients_upstream_lets_read(
    private_registry: Registry,
    image_factory,
    proxy_factory,
    tmp_path: Path,
):
    reg = private_registry
    repo = "secret/guarded"
    ref = f"{reg.netloc}/{repo}:latest"
    img = image_factory(ref, [30_000, 9_000], creds=PRIVATE_CREDS)
    layer = f"/v2/{repo}/blobs/{img.layer_digests[0]}"
    tag = f"/v2/{repo}/manifests/latest"

    # The hole this closes: by default, a client with no credentials at all reads what
    # another client pulled with its own.
    open_cache = proxy_factory()
    assert (
        pull(open_cache, ref, tmp_path / "o", "--src-creds", ":".join(PRIVATE_CREDS)).returncode
        == 0
    )
    assert wait_stored(open_cache, *img.blob_digests)
    leaked = get(open_cache, reg.hostname, reg.port, layer, None)
    assert (leaked.status, leaked.cache) == (200, "HIT"), "the default no longer serves it?"

    proxy = proxy_factory(verify_client_access=True)
    res = pull(proxy, ref, tmp_path / "first", "--src-creds", ":".join(PRIVATE_CREDS))
    assert res.returncode == 0, res.stderr
    assert set(img.blob_digests) <= layout_blobs(tmp_path / "first")
    assert wait_stored(proxy, *img.blob_digests)
    # one question upstream for the repository and these credentials, for all its parts
    assert proxy.metric("registry_cache_access_checks_total", result="granted") == 1

    # no credentials, wrong credentials: the registry's 401 (and its challenge), no bytes
    for auth in (None, basic(PRIVATE_CREDS[0], "wrong")):
        for path in (layer, tag, f"/v2/{repo}/manifests/{img.manifest_digest}"):
            r = get(proxy, reg.hostname, reg.port, path, auth)
            assert (r.status, r.cache) == (401, "DENIED"), (auth is not None, path, r.status)
            assert r.headers.get("www-authenticate", "").lower().startswith("basic"), r.headers
            assert json.loads(r.body)["errors"][0]["code"] == "UNAUTHORIZED", r.body
    res = pull(proxy, ref, tmp_path / "anonymous", "--src-no-creds")
    assert res.returncode != 0, "a client without credentials pulled a private image"
    assert "unauthorized" in res.stderr.lower() or "401" in res.stderr, res.stderr

    # the owner pulls again: from the cache, on the answer remembered from the first pull
    before = len(reg.requests())
    res = pull(proxy, ref, tmp_path / "again", "--src-creds", ":".join(PRIVATE_CREDS))
    assert res.returncode == 0, res.stderr
    for digest in img.blob_digests:
        assert proxy.results_for(digest)[-1:] == ["HIT"], (digest, proxy.results_for(digest))
    upstream_gets = [r for r in reg.requests()[before:] if r.method == "GET" and "/blobs/" in r.uri]
    assert upstream_gets == [], f"a cached blob went upstream: {upstream_gets}"
    assert proxy.metric("registry_cache_access_checks_total", result="granted") == 1
    # a refusal is never remembered: each of the six requests above asked upstream
    assert proxy.metric("registry_cache_access_checks_total", result="refused") >= 6
    assert PRIVATE_CREDS[1] not in proxy.output()


def test_a_token_for_another_repository_is_refused(
    token_setup: TokenSetup, image_factory, proxy_factory, tmp_path: Path
):
    """Bearer tokens: each is checked for the repository asked for, so a token for one
    repository does not open another one's cached content."""
    reg, issuer = token_setup.registry, token_setup.issuer
    host, port = token_setup.front.hostname, token_setup.front.port
    ref = f"{token_setup.netloc}/tok/guarded:latest"
    img = image_factory(f"{reg.netloc}/tok/guarded:latest", [20_000], creds=TOKEN_CREDS)
    proxy = proxy_factory(verify_client_access=True)
    res = pull(proxy, ref, tmp_path / "first", "--src-creds", ":".join(TOKEN_CREDS))
    assert res.returncode == 0, res.stderr
    assert wait_stored(proxy, *img.blob_digests)

    def token(scope: str) -> str:
        r = fetch(
            proxy.port,
            str(proxy.ca_path),
            issuer.hostname,
            issuer.port,
            "GET",
            f"/token?service={issuer.service}&scope={scope}",
            {"Authorization": basic(*TOKEN_CREDS)},
        )
        assert r.status == 200, r.text()
        return "Bearer " + json.loads(r.body)["token"]

    layer = f"/v2/tok/guarded/blobs/{img.layer_digests[0]}"
    other = get(proxy, host, port, layer, token("repository:tok/other:pull"))
    assert (other.status, other.cache) == (401, "DENIED"), (other.status, other.text()[:200])
    assert "bearer" in other.headers.get("www-authenticate", "").lower()
    assert get(proxy, host, port, layer, "Bearer not-a-token").status == 401
    assert get(proxy, host, port, layer, None).status == 401

    mine = get(proxy, host, port, layer, token("repository:tok/guarded:pull"))
    assert (mine.status, mine.cache) == (200, "HIT"), (mine.status, mine.text()[:200])
    assert mine.sha256 == img.layer_digests[0]


def test_an_unknown_tag_reads_as_unknown(private_registry: Registry, image_factory, proxy_factory):
    """The registry's 404 to the question is relayed as the registry's own error code, so
    clients that test whether a tag exists read the answer right."""
    reg = private_registry
    image_factory(f"{reg.netloc}/secret/known:latest", [1_000], creds=PRIVATE_CREDS)
    proxy = proxy_factory(verify_client_access=True)
    res = skopeo(
        "inspect",
        "--cert-dir",
        str(proxy.cert_dir),
        "--creds",
        ":".join(PRIVATE_CREDS),
        f"docker://{reg.netloc}/secret/known:nope",
        proxy_port=proxy.port,
    )
    assert res.returncode != 0
    assert "manifest unknown" in res.stderr, res.stderr
    r = get(proxy, reg.hostname, reg.port, "/v2/secret/known/manifests/nope", basic(*PRIVATE_CREDS))
    assert r.status == 404 and json.loads(r.body)["errors"][0]["code"] == "MANIFEST_UNKNOWN"

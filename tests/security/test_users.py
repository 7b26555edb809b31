"""Issue 6, Must show 2: proxy users.

Without or with wrong Proxy-Authorization: 407 with Proxy-Authenticate. With the right
credentials (skopeo, credentials in its proxy URL): the pull works. A user whose `allow`
excludes a repository gets a 403 DENIED for it, even after another user has put every
one of its blobs into the cache, and the proxy does not go upstream for it.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import quote

import pytest
from security.secsupport import (
    connect_head,
    exchange,
    hash_password,
    pull_args,
    skopeo_via,
)
from support.client import basic, fetch
from support.durability import wait_stored
from support.images import layout_blobs
from support.proxy import Proxy
from support.registry import Registry
from support.servers import TokenIssuer
from support.topology import TOKEN_CREDS, TokenSetup

pytestmark = pytest.mark.integration

ADMIN = ("admin", "adm1n:pass-with-colon")
BOB = ("bob", "b0b-p@ss/word")  # '@' and '/' must survive the proxy URL (percent-encoded)
CAROL = ("carol", "c4rol-pass")
MANIFEST_ACCEPT = (
    "application/vnd.oci.image.manifest.v1+json, "
    "application/vnd.docker.distribution.manifest.v2+json"
)


@pytest.fixture
def users_proxy(proxy_factory, registry: Registry) -> Proxy:
    return proxy_factory(
        users=[
            {"name": ADMIN[0], "password_hash": hash_password(ADMIN[1])},
            {
                "name": BOB[0],
                "password_hash": hash_password(BOB[1]),
                "allow": [f"{registry.hostname}:*/pub/*"],
            },
        ]
    )


def proxy_url(proxy: Proxy, user: str, password: str) -> str:
    return f"http://{quote(user, safe='')}:{quote(password, safe='')}@127.0.0.1:{proxy.port}"


def tunnel_get(proxy: Proxy, upstream: Registry | TokenIssuer, path: str, creds: tuple[str, str]):
    """One GET in a CONNECT tunnel that carries Proxy-Authorization (raw client)."""
    import asyncio
    import ssl

    from support.client import read_response

    async def run():
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        try:
            writer.write(connect_head(upstream.netloc, {"Proxy-Authorization": basic(*creds)}))
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 200"), head
            await writer.start_tls(
                ssl.create_default_context(cafile=str(proxy.ca_path)),
                server_hostname=upstream.hostname,
            )
            writer.write(
                f"GET {path} HTTP/1.1\r\nHost: {upstream.netloc}\r\n"
                f"Accept: {MANIFEST_ACCEPT}\r\n\r\n".encode()
            )
            await writer.drain()
            return await read_response(reader, "GET")
        finally:
            writer.close()

    return asyncio.run(asyncio.wait_for(run(), 30))


def test_proxy_authentication_is_required(users_proxy: Proxy, registry: Registry):
    proxy = users_proxy
    target = registry.netloc
    wrong = [
        None,
        basic(ADMIN[0], "not-the-password"),
        basic("mallory", ADMIN[1]),
        basic(ADMIN[0], ""),
        "Basic !!!not-base64!!!",
        "Bearer " + basic(*ADMIN).split(" ", 1)[1],
        "Basic " + basic(*ADMIN).split(" ", 1)[1][:-4],
    ]
    for header in wrong:
        headers = {"Proxy-Authorization": header} if header else {}
        for data in (
            connect_head(target, headers),
            (
                f"GET http://{target}/v2/ HTTP/1.1\r\nHost: {target}\r\n"
                + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
                + "\r\n"
            ).encode(),
        ):
            resp = exchange("127.0.0.1", proxy.port, data)
            assert resp.status == 407, f"{header!r} {data[:30]!r}: {resp.status} {resp.text()}"
            assert resp.headers.get("proxy-authenticate", "").startswith("Basic"), resp.headers
    # the right ones open the tunnel
    resp = exchange(
        "127.0.0.1", proxy.port, connect_head(target, {"Proxy-Authorization": basic(*ADMIN)})
    )
    assert resp.status == 200, (resp.status, resp.text())
    out = proxy.output()
    for secret in (ADMIN[1], BOB[1], basic(*ADMIN).split(" ", 1)[1]):
        assert secret not in out, "a proxy password or its Basic header is in the log"


def test_user_allow_list_is_enforced_on_cached_content(
    users_proxy: Proxy, registry: Registry, image_factory, tmp_path: Path
):
    proxy = users_proxy
    secret_ref = f"{registry.netloc}/team/secret:latest"
    public_ref = f"{registry.netloc}/pub/tool:latest"
    secret = image_factory(secret_ref, [12_000, 7_000])
    public = image_factory(public_ref, [5_000])

    # skopeo with its credentials in the proxy URL; admin (no allow list) reads everything
    res = skopeo_via(
        proxy_url(proxy, *ADMIN), *pull_args(proxy, secret_ref, tmp_path / "admin-secret")
    )
    assert res.returncode == 0, f"admin pull through an authenticating proxy:\n{res.stderr}"
    assert set(secret.blob_digests) <= layout_blobs(tmp_path / "admin-secret")
    assert wait_stored(proxy, *secret.blob_digests), "secret not cached"

    # bob may read pub/*
    res = skopeo_via(proxy_url(proxy, *BOB), *pull_args(proxy, public_ref, tmp_path / "bob-pub"))
    assert res.returncode == 0, f"bob's pull of an allowed repository:\n{res.stderr}"
    assert set(public.blob_digests) <= layout_blobs(tmp_path / "bob-pub")

    # ... but not team/secret, though all of it is in the cache
    upstream_before = len(registry.requests())
    res = skopeo_via(proxy_url(proxy, *BOB), *pull_args(proxy, secret_ref, tmp_path / "bob-secret"))
    assert res.returncode != 0, "bob pulled a repository his allow list excludes"
    assert "denied" in res.stderr.lower() or "403" in res.stderr, res.stderr
    paths = [
        "/v2/team/secret/manifests/latest",
        f"/v2/team/secret/manifests/{secret.manifest_digest}",
        *(f"/v2/team/secret/blobs/{d}" for d in secret.blob_digests),
        "/v2/team/secret/tags/list",
    ]
    for path in paths:
        resp = tunnel_get(proxy, registry, path, BOB)
        assert resp.status == 403, f"{path}: {resp.status} {resp.text()[:300]}"
        assert resp.cache != "HIT", resp.headers
        doc = json.loads(resp.body)
        err = doc["errors"][0]
        assert err["code"] == "DENIED", doc
        assert "bob" in err["message"] and "team/secret" in err["message"], err
    asked = [r.uri for r in registry.requests()[upstream_before:] if "team/secret" in r.uri]
    assert not asked, f"bob's denied requests went upstream: {asked}"
    # spellings of the same reads that a route parser might not name: never served to bob
    layer = secret.layer_digests[0]
    odd = [
        "/v2/team/secret/manifests/latest/",
        f"/v2/team/secret/blobs/{layer}/",
        f"/v2/team/secret/blobs/{layer}?x=1",
        f"/v2/team/secret/blobs/{layer}#frag",
        f"/v2/team/secret/blobs/{layer};x",
        f"/v2/team/secret//blobs/{layer}",
        f"/v2//team/secret/blobs/{layer}",
        f"/v2/team%2fsecret/blobs/{layer}",
        f"/v2/team/secret%2fblobs%2f{layer}",
        f"/v2/Team/Secret/blobs/{layer}",
        f"/v2/pub/../team/secret/blobs/{layer}",
        f"/v2/pub/%2e%2e/team/secret/blobs/{layer}",
        f"/v2/team/secret/blobs/uploads/../../blobs/{layer}",
    ]
    for path in odd:
        resp = tunnel_get(proxy, registry, path, BOB)
        assert 400 <= resp.status < 500, f"bob {path}: {resp.status} {resp.headers}"
    asked = [r.uri for r in registry.requests()[upstream_before:] if "team/secret" in r.uri]
    assert not asked, f"bob's odd spellings went upstream: {asked}"
    # nor does the catalog tell him which repositories there are
    resp = tunnel_get(proxy, registry, "/v2/_catalog", BOB)
    assert "team/secret" not in resp.text(), (resp.status, resp.text()[:300])
    for path in paths:  # the same paths are fine for admin
        ok = tunnel_get(proxy, registry, path, ADMIN)
        assert ok.status == 200, f"admin {path}: {ok.status} {ok.text()[:200]}"
    assert proxy.log_lines("DENIED"), "no access-log line records the denial"

    # a user with the wrong password in the proxy URL is refused (407), not served
    res = skopeo_via(
        proxy_url(proxy, BOB[0], "wrong"), *pull_args(proxy, public_ref, tmp_path / "wrong")
    )
    assert res.returncode != 0
    assert "407" in res.stderr or "proxy authentication" in res.stderr.lower(), res.stderr


def test_unauthenticated_fetch_is_refused_at_connect(users_proxy: Proxy, registry: Registry):
    """The test client's own tunnel (no Proxy-Authorization) never gets inside."""
    from support.client import ProtocolError

    with pytest.raises(ProtocolError, match="407"):
        fetch(
            users_proxy.port,
            str(users_proxy.ca_path),
            registry.hostname,
            registry.port,
            "GET",
            "/v2/",
        )


def test_restricted_user_gets_no_token_made_with_the_caches_credentials(
    proxy_factory, token_setup: TokenSetup, registry: Registry
):
    """The cache holds credentials for a token endpoint (auth_registries). A user whose
    allow list excludes a repository must not get a pull token for it minted with them:
    such a token works straight against the registry, around the cache."""
    issuer = token_setup.issuer
    proxy = proxy_factory(
        auth_registries=f"{issuer.hostname}:{TOKEN_CREDS[0]}:{TOKEN_CREDS[1]}",
        users=[
            {
                "name": BOB[0],
                "password_hash": hash_password(BOB[1]),
                "allow": [f"{registry.hostname}:*/pub/*"],
            },
            {
                "name": CAROL[0],
                "password_hash": hash_password(CAROL[1]),
                "allow": [f"{token_setup.registry.hostname}:*/tok/*"],
            },
        ],
    )
    seen_before = len(issuer.seen)
    path = f"/token?service={issuer.service}&scope=repository:tok/app:pull"
    resp = tunnel_get(proxy, issuer, path, BOB)
    assert resp.status != 200 and "token" not in resp.text(), (resp.status, resp.text()[:300])
    minted = [s for s in issuer.seen[seen_before:] if s.authorization == basic(*TOKEN_CREDS)]
    assert not minted, "the cache's credentials went to the token endpoint for bob"
    # Nor does carol, whose allow list has tok/*: the cache's credentials never go with a
    # client's token request (issue 15); the cache answers the registry's challenge on its
    # own upstream leg instead (tests/security/test_token_theft.py).
    resp = tunnel_get(proxy, issuer, path, CAROL)
    assert resp.status == 401, resp.status
    minted = [s for s in issuer.seen[seen_before:] if s.authorization == basic(*TOKEN_CREDS)]
    assert not minted, "the cache's credentials went to the token endpoint for carol"

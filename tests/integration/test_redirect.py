"""Must show 7: a blob answered upstream by a redirect to another host is fetched and cached."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.client import fetch
from support.images import layout_blobs, skopeo
from support.registry import Registry
from support.servers import AioThread, Cdn, Front
from support.topology import Pki

pytestmark = pytest.mark.integration

FRONT_CREDS = ("frontuser", "front-pass-77aa")


@pytest.fixture
def redirecting(
    registry: Registry, aio: AioThread, pki: Pki, upstream_ports: set[int]
) -> Iterator[tuple[Front, Cdn]]:
    """redir.rc.test: a registry that wants Basic auth and sends blob GETs to cdn.rc.test."""
    cdn = Cdn(aio, "cdn.rc.test", pki.server, registry.blob_data_path).start()
    front = Front(
        aio,
        "redir.rc.test",
        pki.server,
        registry.netloc,
        pki.ca_path,
        require_basic=FRONT_CREDS,
        forward_auth=False,
        redirect_blobs_to=f"https://{cdn.netloc}",
    ).start()
    upstream_ports.update({cdn.port, front.port})
    yield front, cdn
    front.stop()
    cdn.stop()


def test_redirected_blob_is_fetched_and_cached(
    registry: Registry, redirecting: tuple[Front, Cdn], proxy_factory
):
    front, cdn = redirecting
    data = os.urandom(1_500_000)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    registry.upload_blob("pub/redirected", data, digest)
    proxy = proxy_factory(
        auth_registries=[
            {"host": front.hostname, "username": FRONT_CREDS[0], "password": FRONT_CREDS[1]}
        ]
    )
    args = (proxy.port, str(proxy.ca_path), front.hostname, front.port)
    path = f"/v2/pub/redirected/blobs/{digest}"

    first = fetch(*args, "GET", path)
    assert first.status == 200, (first.status, first.text()[:300])
    assert first.cache == "MISS"
    assert first.body == data
    assert "location" not in first.headers

    second = fetch(*args, "GET", path)
    assert second.status == 200
    assert second.cache == "HIT"
    assert second.sha256 == digest

    cdn_gets = [s for s in cdn.seen if s.method == "GET"]
    assert len(cdn_gets) == 1, f"CDN requests: {cdn.seen}"
    assert all(s.authorization is None for s in cdn.seen), (
        "the registry's Authorization reached the CDN"
    )
    expected = "Basic " + base64.b64encode(":".join(FRONT_CREDS).encode()).decode()
    blob_at_front = [s for s in front.seen if "/blobs/" in s.path]
    assert blob_at_front and all(s.authorization == expected for s in blob_at_front)


def test_image_with_redirected_layers_pulls_with_skopeo(
    registry: Registry, redirecting: tuple[Front, Cdn], image_factory, proxy_factory, tmp_path: Path
):
    front, cdn = redirecting
    img = image_factory(f"{registry.netloc}/pub/redirimg:latest", [40_000, 9_000])
    # the string form is host:user:pass, without a port
    proxy = proxy_factory(auth_registries=f"{front.hostname}:{FRONT_CREDS[0]}:{FRONT_CREDS[1]}")
    res = skopeo(
        "copy",
        "--src-cert-dir",
        str(proxy.cert_dir),
        "--src-no-creds",
        f"docker://{front.netloc}/pub/redirimg:latest",
        f"oci:{tmp_path / 'out'}:latest",
        proxy_port=proxy.port,
    )
    assert res.returncode == 0, res.stderr
    assert set(img.blob_digests) <= layout_blobs(tmp_path / "out")
    served = {s.path.split("/data/")[1].split("?")[0] for s in cdn.seen}
    assert set(img.blob_digests) <= served
    assert all(s.authorization is None for s in cdn.seen)


def test_redirect_to_a_refused_address_is_not_followed(
    registry: Registry, aio: AioThread, pki: Pki, upstream_ports: set[int], proxy_factory
):
    """A registry (or whoever answers for it) redirecting a blob to an address the cache
    refuses, written as an IP address (aiohttp connects to those without asking the
    guarded resolver): loopback here, the cloud metadata address in the wild. The proxy
    answers 502 with the reason and never connects there."""
    hits: list[bytes] = []

    async def metadata(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hits.append(await reader.read(200))
        writer.write(b'HTTP/1.1 200 OK\r\nContent-Length: 17\r\n\r\n{"secret": "key"}')
        writer.close()

    server = aio.run(asyncio.start_server(metadata, "127.0.0.1", 0))
    port = server.sockets[0].getsockname()[1]
    front = Front(
        aio,
        "redir.rc.test",
        pki.server,
        registry.netloc,
        pki.ca_path,
        redirect_blobs_to=f"http://127.0.0.1:{port}",
    ).start()
    # both ports allowed: what is refused is the address
    upstream_ports.update({port, front.port})
    try:
        data = os.urandom(50_000)
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        registry.upload_blob("pub/ssrf", data, digest)
        proxy = proxy_factory()
        resp = fetch(
            proxy.port, str(proxy.ca_path), front.hostname, front.port, "GET",
            f"/v2/pub/ssrf/blobs/{digest}",
        )  # fmt: skip
        assert resp.status == 502, (resp.status, resp.text()[:300])
        assert "redirect refused" in resp.text() and "loopback" in resp.text(), resp.text()
        assert b"secret" not in resp.body
        assert hits == [], "the proxy connected to the refused address"
    finally:
        front.stop()
        server.close()

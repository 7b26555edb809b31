"""The harness itself, without the proxy: the upstreams behave as the real tests assume.

If these fail, the failures elsewhere say nothing about proxy_app.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import ssl
import time
from pathlib import Path

import aiohttp
import pytest
from support.images import layout_blobs, skopeo
from support.registry import Registry
from support.servers import AioThread, Cdn, Front, ThrottledRelay
from support.topology import PRIVATE_CREDS, TOKEN_CREDS, Pki, TokenSetup

pytestmark = pytest.mark.integration


def test_public_registry_push_and_pull(registry: Registry, image_factory, pki: Pki, tmp_path):
    img = image_factory(f"{registry.netloc}/harness/pub:latest", [2000, 3000])
    dest = tmp_path / "pulled"
    res = skopeo(
        "copy",
        "--src-cert-dir",
        str(pki.cert_dir),
        f"docker://{registry.netloc}/harness/pub:latest",
        f"oci:{dest}:latest",
    )
    assert res.returncode == 0, res.stderr
    assert set(img.blob_digests) <= layout_blobs(dest)
    assert len(registry.blob_requests("harness/pub")) >= len(img.blob_digests)
    assert registry.manifest_digest("harness/pub", "latest") == img.manifest_digest


def test_private_registry_needs_credentials(
    private_registry: Registry, image_factory, pki: Pki, tmp_path
):
    image_factory(f"{private_registry.netloc}/harness/priv:latest", creds=PRIVATE_CREDS)
    src = f"docker://{private_registry.netloc}/harness/priv:latest"
    anon = skopeo("inspect", "--cert-dir", str(pki.cert_dir), "--no-creds", src)
    assert anon.returncode != 0
    assert "unauthorized" in anon.stderr.lower() or "401" in anon.stderr
    ok = skopeo("inspect", "--cert-dir", str(pki.cert_dir), "--creds", ":".join(PRIVATE_CREDS), src)
    assert ok.returncode == 0, ok.stderr


def test_token_registry_flow_direct(token_setup: TokenSetup, image_factory, pki: Pki, tmp_path):
    reg = token_setup.registry
    image_factory(f"{reg.netloc}/harness/tok:latest", creds=TOKEN_CREDS)
    assert token_setup.issuer.issued >= 1
    token_setup.front.seen.clear()
    src = f"docker://{token_setup.netloc}/harness/tok:latest"
    anon = skopeo("inspect", "--cert-dir", str(pki.cert_dir), "--no-creds", src)
    assert anon.returncode != 0
    ok = skopeo("inspect", "--cert-dir", str(pki.cert_dir), "--creds", ":".join(TOKEN_CREDS), src)
    assert ok.returncode == 0, ok.stderr
    auths = {(s.authorization or "").split(" ")[0] for s in token_setup.front.seen}
    assert "Bearer" in auths


def test_redirect_front_and_cdn(registry: Registry, aio: AioThread, pki: Pki):
    data = os.urandom(100_000)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    registry.upload_blob("harness/redir", data, digest)
    cdn = Cdn(aio, "cdn.rc.test", pki.server, registry.blob_data_path).start()
    front = Front(
        aio,
        "redir.rc.test",
        pki.server,
        registry.netloc,
        pki.ca_path,
        require_basic=("u", "p"),
        redirect_blobs_to=f"https://{cdn.netloc}",
    ).start()
    try:

        async def get() -> tuple[int, bytes]:
            ctx = ssl.create_default_context(cafile=str(pki.ca_path))
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ctx)) as s:
                url = f"https://{front.netloc}/v2/harness/redir/blobs/{digest}"
                auth = {"Authorization": aiohttp.encode_basic_auth("u", "p")}
                async with s.get(url, headers=auth) as r:
                    return r.status, await r.read()

        status, body = aio.run(get())
        assert status == 200
        assert body == data
        assert [s.authorization for s in cdn.seen] == [None]  # aiohttp drops it cross-host
    finally:
        front.stop()
        cdn.stop()


def test_throttled_relay(registry: Registry, aio: AioThread, pki: Pki):
    data = os.urandom(8_000_000)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    registry.upload_blob("harness/relay", data, digest)
    relay = ThrottledRelay(aio, registry.port, rate=8e6).start()
    try:
        t0 = time.monotonic()
        status, _, body = registry.api("GET", f"/v2/harness/relay/blobs/{digest}", port=relay.port)
        elapsed = time.monotonic() - t0
        assert status == 200 and body == data
        assert elapsed > 0.8, elapsed
        assert max(c.down for c in relay.conns) >= len(data)
    finally:
        relay.stop()


def test_aio_loop_alive(aio: AioThread):
    async def f() -> int:
        await asyncio.sleep(0)
        return 1

    assert aio.run(f()) == 1
    assert Path("/etc/hosts").read_text().count("registry.rc.test") == 1

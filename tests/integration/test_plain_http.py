"""Plain-HTTP registries: absolute-form requests (`GET http://host/...`) are cached too,
and the proxy's own pages answer on the same port, over IPv4 and IPv6."""

from __future__ import annotations

import asyncio
import json
import socket
import urllib.request

import pytest
import yaml
from support.client import raw_exchange, read_response
from support.images import make_image, skopeo

pytestmark = pytest.mark.integration


def absolute_get(port: int, netloc: str, path: str) -> tuple[int, str | None, bytes]:
    request = f"GET http://{netloc}{path} HTTP/1.1\r\nHost: {netloc}\r\nConnection: close\r\n\r\n"
    resp = raw_exchange(port, request.encode())
    return resp.status, resp.cache, resp.body


def test_absolute_form_blobs_are_cached(make_registry, proxy_factory, tmp_path):
    reg = make_registry("scratch.rc.test", tls=False)
    img = make_image(tmp_path / "img", [300_000, 5000])
    pushed = skopeo(
        "copy",
        "--dest-tls-verify=false",
        f"oci:{img.layout}:latest",
        f"docker://{reg.netloc}/plain/app:v1",
    )
    assert pushed.returncode == 0, pushed.stderr
    proxy = proxy_factory()
    layer = img.layer_digests[0]
    status, cache, body = absolute_get(proxy.port, reg.netloc, f"/v2/plain/app/blobs/{layer}")
    assert (status, cache) == (200, "MISS")
    assert len(body) == img.sizes[layer]
    status, cache, body2 = absolute_get(proxy.port, reg.netloc, f"/v2/plain/app/blobs/{layer}")
    assert (status, cache) == (200, "HIT") and body2 == body
    assert len(reg.blob_requests(layer)) == 1

    # a real client: skopeo over plain HTTP through the proxy
    pulled = skopeo(
        "copy",
        "--src-tls-verify=false",
        f"docker://{reg.netloc}/plain/app:v1",
        f"dir:{tmp_path / 'out'}",
        proxy_port=proxy.port,
    )
    assert pulled.returncode == 0, pulled.stderr
    pulled_files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {d.split(":", 1)[1] for d in img.blob_digests} <= pulled_files
    assert proxy.results_for(layer)[-1] == "HIT"


def test_own_pages_over_ipv4_and_ipv6(proxy_factory):
    if not socket.has_ipv6:
        pytest.fail("this machine has no IPv6 stack; the proxy's IPv6 listener cannot be checked")
    proxy = proxy_factory(start=False)
    proxy.config["listen"] = [f"127.0.0.1:{proxy.port}", f"[::1]:{proxy.port}"]
    proxy.config_path.write_text(yaml.safe_dump(proxy.config))
    proxy.start()
    for host in ("127.0.0.1", "[::1]"):
        with urllib.request.urlopen(f"http://{host}:{proxy.port}/healthz", timeout=10) as resp:
            assert json.load(resp)["status"] == "ok"
        with urllib.request.urlopen(f"http://{host}:{proxy.port}/ca.crt", timeout=10) as resp:
            assert resp.read().startswith(b"-----BEGIN CERTIFICATE-----")


def test_loopback_outside_allowed_clients_reads_own_pages_only(make_registry, proxy_factory):
    """allowed_clients without loopback: the cache host still reads /healthz and /ca.crt
    (its health check and `make install` run there), but cannot use the proxy, neither by
    CONNECT nor by an absolute-form request, not even later on a kept-alive connection."""
    reg = make_registry("scratch.rc.test", tls=False)
    proxy = proxy_factory(allowed_clients=["10.0.0.0/8"])
    with urllib.request.urlopen(f"http://127.0.0.1:{proxy.port}/healthz", timeout=10) as resp:
        assert json.load(resp)["status"] == "ok"
    with urllib.request.urlopen(f"http://127.0.0.1:{proxy.port}/ca.crt", timeout=10) as resp:
        assert resp.read().startswith(b"-----BEGIN CERTIFICATE-----")

    connect = f"CONNECT {reg.netloc} HTTP/1.1\r\nHost: {reg.netloc}\r\n\r\n".encode()
    refused = raw_exchange(proxy.port, connect)
    assert refused.status == 403 and b"allowed_clients" in refused.body, refused
    status, _, body = absolute_get(proxy.port, reg.netloc, "/v2/")
    assert status == 403 and b"allowed_clients" in body, body

    async def own_page_then_proxying() -> list[int]:
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
        try:
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: cache\r\n\r\n")
            first = await read_response(reader, "GET")
            writer.write(
                f"GET http://{reg.netloc}/v2/ HTTP/1.1\r\nHost: {reg.netloc}\r\n\r\n".encode()
            )
            second = await read_response(reader, "GET")
            return [first.status, second.status]
        finally:
            writer.close()

    assert asyncio.run(own_page_then_proxying()) == [200, 403]
    assert not [r for r in reg.requests() if r.path.startswith("/v2")], (
        "a refused request went upstream"
    )

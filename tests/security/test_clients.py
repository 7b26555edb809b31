"""Issue 6, Must show 1: a client outside allowed_clients is refused, one inside pulls.

Two network namespaces reach the proxy over veth pairs. The config allows loopback and
the `inside` namespace's address only, so the `outside` one is refused, over IPv4 and
over an IPv6 unique-local address (which the default allowed_clients would admit).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from security.secsupport import NetLab, connect_head, pull_args, skopeo_via
from support.images import layout_blobs
from support.registry import Registry

pytestmark = pytest.mark.integration


def test_client_outside_allowed_clients_is_refused_inside_pulls(
    netlab: NetLab, registry: Registry, image_factory, proxy_factory, tmp_path: Path
):
    inside, outside = netlab.inside, netlab.outside
    ref = f"{registry.netloc}/sec/clients:latest"
    img = image_factory(ref, [6000, 3000])
    proxy = proxy_factory(start=False, allowed_clients=["127.0.0.0/8", f"{inside.client_v4}/32"])
    port = proxy.port
    proxy.config["listen"] = [
        f"127.0.0.1:{port}",
        f"{inside.host_v4}:{port}",
        f"{outside.host_v4}:{port}",
        f"[{outside.host_v6}]:{port}",
    ]
    proxy.config_path.write_text(yaml.safe_dump(proxy.config))
    proxy.start()
    target = registry.netloc

    # outside: every request refused, CONNECT included, over IPv4 and IPv6
    for host in (outside.host_v4, outside.host_v6):
        for data in (
            connect_head(target),
            b"GET /healthz HTTP/1.1\r\nHost: cache\r\n\r\n",
            b"GET /ca.crt HTTP/1.1\r\nHost: cache\r\n\r\n",
            f"GET http://{target}/v2/ HTTP/1.1\r\nHost: {target}\r\n\r\n".encode(),
        ):
            status, text = outside.http(host, port, data)
            assert status == 403, f"{host} {data[:40]!r} -> {text[:300]!r}"
            assert "allowed_clients" in text, text
            assert "BEGIN CERTIFICATE" not in text
    before = len(registry.requests())
    res = skopeo_via(
        f"http://{outside.host_v4}:{port}",
        *pull_args(proxy, ref, tmp_path / "outside"),
        netns=outside.name,
    )
    assert res.returncode != 0, "a client outside allowed_clients pulled"
    assert "403" in res.stderr or "forbidden" in res.stderr.lower(), res.stderr
    assert len(registry.requests()) == before, "the refused client's pull reached upstream"
    assert proxy.log_lines(f"refused client {outside.client_v4}"), proxy.output()[-2000:]
    assert proxy.log_lines(f"refused client {outside.client_v6}"), proxy.output()[-2000:]

    # inside: the same pull through the same proxy works
    res = skopeo_via(
        f"http://{inside.host_v4}:{port}",
        *pull_args(proxy, ref, tmp_path / "inside"),
        netns=inside.name,
    )
    assert res.returncode == 0, f"pull from an allowed client failed:\n{res.stderr}"
    assert set(img.blob_digests) <= layout_blobs(tmp_path / "inside")
    assert not proxy.log_lines(f"refused client {inside.client_v4}")
    status, text = inside.http(inside.host_v4, port, b"GET /healthz HTTP/1.1\r\nHost: c\r\n\r\n")
    assert status == 200, text

"""Must show 8: pushes are refused with 405 and a registry-style error unless allow_push."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from support.client import fetch
from support.images import make_image, sha256, skopeo
from support.registry import Registry

pytestmark = pytest.mark.integration
WRITES = {"POST", "PUT", "PATCH", "DELETE"}


def push_through(proxy, img, ref: str):
    return skopeo(
        "copy",
        "--dest-cert-dir",
        str(proxy.cert_dir),
        f"oci:{img.layout}:latest",
        f"docker://{ref}",
        proxy_port=proxy.port,
    )


def test_push_refused_by_default(registry: Registry, proxy_factory, tmp_path: Path):
    proxy = proxy_factory()
    img = make_image(tmp_path / "img", [3000])
    res = push_through(proxy, img, f"{registry.netloc}/pub/pushed:1")
    assert res.returncode != 0, "push through the proxy succeeded without allow_push"
    assert "push" in res.stderr.lower() and "disabled" in res.stderr.lower(), res.stderr
    assert not [r for r in registry.requests() if r.method in WRITES and "/pub/pushed/" in r.uri]

    args = (proxy.port, str(proxy.ca_path), registry.hostname, registry.port)
    digest = img.layer_digests[0]
    cases = [
        ("POST", "/v2/pub/pushed/blobs/uploads/"),
        ("PUT", f"/v2/pub/pushed/blobs/uploads/x?digest={digest}"),
        ("PATCH", "/v2/pub/pushed/blobs/uploads/x"),
        ("PUT", "/v2/pub/pushed/manifests/1"),
        ("DELETE", f"/v2/pub/pushed/manifests/{img.manifest_digest}"),
        ("DELETE", f"/v2/pub/pushed/blobs/{digest}"),
    ]
    for method, path in cases:
        resp = fetch(*args, method, path, {"Content-Type": "application/json"}, b"{}")
        assert resp.status == 405, (method, path, resp.status, resp.text())
        assert resp.cache is not None, (method, path, "no X-Registry-Cache header")
        doc = json.loads(resp.body)
        errors = doc["errors"]
        assert errors and errors[0]["code"], doc
        assert "push" in errors[0]["message"].lower(), doc
    # The same API spelled so that a registry decodes it to /v2/ (percent-encoded, doubled
    # slashes): refused too, never passed through as "not a registry path".
    for method, path in [
        ("PUT", "/%762/pub/pushed/manifests/1"),
        ("PUT", "//v2/pub/pushed/manifests/1"),
        ("POST", "/v2%2Fpub/pushed/blobs/uploads/"),
        ("POST", "/%2Fv2/pub/pushed/blobs/uploads/"),
    ]:
        resp = fetch(*args, method, path, {"Content-Type": "application/json"}, b"{}")
        assert resp.status == 400, (method, path, resp.status, resp.text())
        assert json.loads(resp.body)["errors"][0]["code"] == "NAME_INVALID", resp.text()
    assert not [r for r in registry.requests() if r.method in WRITES and "pushed" in r.uri]


def test_push_allowed(registry: Registry, proxy_factory, tmp_path: Path):
    proxy = proxy_factory(allow_push=True)
    img = make_image(tmp_path / "img", [3000, 5000])
    res = push_through(proxy, img, f"{registry.netloc}/pub/pushed-ok:1")
    assert res.returncode == 0, res.stderr
    assert registry.manifest_digest("pub/pushed-ok", "1") == img.manifest_digest
    status, _, body = registry.api("GET", f"/v2/pub/pushed-ok/blobs/{img.layer_digests[1]}")
    assert status == 200
    assert sha256(body) == img.layer_digests[1]

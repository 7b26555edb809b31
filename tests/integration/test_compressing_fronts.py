"""Registries whose front ends compress their answers (issue 12).

The test registry sits behind nginx with `gzip on; gzip_proxied any; gzip_types *`
(`polite`: gzip when asked for it), and behind a second nginx hop that gzips every answer
whatever the client asked for (`forced`). skopeo asks for gzip on every GET. Through the
cache, pulls must work, the store must hold the registry's exact bytes, and answers the
cache only relays must reach the client coded as they came.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support.durability import (
    OCI_INDEX,
    MultiPlatformImage,
    blob_path,
    make_multiplatform_image,
    push_all,
    stored_blobs,
    wait_stored,
)
from support.images import layout_blobs, skopeo
from support.nginx import GzipFronts
from support.proxy import Proxy
from support.registry import Registry
from support.servers import AioThread, Front
from support.topology import Pki

pytestmark = pytest.mark.integration

REPO = "gz/multi"
PLATFORMS = {"linux/amd64": [3000, 70_000], "linux/arm64": [5000]}


@pytest.fixture(scope="module")
def fronts(
    workroot: Path, pki: Pki, registry: Registry, upstream_ports: set[int]
) -> Iterator[GzipFronts]:
    fronts = GzipFronts(workroot / "nginx-gzip", registry.netloc, pki.server).start()
    upstream_ports.update({fronts.polite_port, fronts.forced_port})
    yield fronts
    fronts.stop()


@pytest.fixture(scope="module")
def multi(workroot: Path, pki: Pki, registry: Registry) -> MultiPlatformImage:
    image = make_multiplatform_image(workroot / "gz-multi-layout", PLATFORMS)
    push_all(image.layout, f"{registry.netloc}/{REPO}:1", pki.cert_dir, tag="latest")
    return image


def layout_file(image: MultiPlatformImage, digest: str) -> bytes:
    return (image.layout / "blobs" / "sha256" / digest.split(":", 1)[1]).read_bytes()


def pull_all(proxy: Proxy, ref: str, dest: Path) -> None:
    res = skopeo(
        "copy",
        "--all",
        "--src-cert-dir",
        str(proxy.cert_dir),
        f"docker://{ref}",
        f"oci:{dest}:latest",
        proxy_port=proxy.port,
    )
    assert res.returncode == 0, f"pull of {ref} through the cache failed:\n{res.stderr}"


def assert_store_holds_the_registry_bytes(proxy: Proxy, image: MultiPlatformImage) -> None:
    wanted = {image.index_digest, *image.digests()}
    assert wait_stored(proxy, *wanted)
    for digest in wanted:
        assert blob_path(proxy.cache_dir, digest).read_bytes() == layout_file(image, digest), digest


@pytest.mark.parametrize("front", ["polite", "forced"])
def test_multiarch_pull_through_a_gzipping_front(
    front: str,
    fronts: GzipFronts,
    multi: MultiPlatformImage,
    proxy_factory: Callable[..., Proxy],
    tmp_path: Path,
) -> None:
    proxy = proxy_factory()
    netloc = fronts.polite if front == "polite" else fronts.forced
    ref = f"{netloc}/{REPO}:1"
    pull_all(proxy, ref, tmp_path / "first")
    assert layout_blobs(tmp_path / "first") >= {multi.index_digest, *multi.digests()}
    assert_store_holds_the_registry_bytes(proxy, multi)

    port = str(fronts.polite_port if front == "polite" else fronts.forced_port)
    sent_gzip = [ln for ln in fronts.log() if ln.startswith(port) and ln.endswith('"gzip"')]
    if front == "forced":
        # The front really did compress manifests and blobs: the cache decoded them.
        assert any("/manifests/" in ln for ln in sent_gzip), fronts.log()
        assert any("/blobs/" in ln for ln in sent_gzip), fronts.log()
    else:
        # Asked for identity, the polite front sent every manifest and blob as it is.
        cached = [ln for ln in sent_gzip if "/manifests/" in ln or "/blobs/" in ln]
        assert cached == []

    before = len(proxy.log_lines())
    pull_all(proxy, ref, tmp_path / "second")
    second = [ln for ln in proxy.log_lines()[before:] if "/manifests/" in ln or "/blobs/" in ln]
    assert second and all(" HIT " in f" {ln} " for ln in second), second
    assert proxy.metric("registry_cache_upstream_errors_total") == 0


def test_a_client_asking_for_gzip_gets_the_manifest_uncoded_with_its_length(
    fronts: GzipFronts, multi: MultiPlatformImage, proxy_factory: Callable[..., Proxy]
) -> None:
    proxy = proxy_factory()
    accept = {"Accept": OCI_INDEX, "Accept-Encoding": "gzip"}
    for result in ("MISS", "HIT"):
        res = proxy.get(fronts.forced, f"/v2/{REPO}/manifests/1", accept)
        assert res.status == 200, res.body[:300]
        assert res.cache == result
        assert "content-encoding" not in res.headers
        assert res.body == layout_file(multi, multi.index_digest)
        assert res.headers["content-length"] == str(len(res.body))
        assert res.headers["docker-content-digest"] == multi.index_digest
        assert res.headers["content-type"] == OCI_INDEX


def test_relayed_answers_keep_their_coding(
    fronts: GzipFronts, multi: MultiPlatformImage, proxy_factory: Callable[..., Proxy]
) -> None:
    proxy = proxy_factory()
    res = proxy.get(fronts.polite, f"/v2/{REPO}/tags/list", {"Accept-Encoding": "gzip"})
    assert res.status == 200
    assert res.cache == "PASS"
    assert res.headers.get("content-encoding") == "gzip"
    assert json.loads(gzip.decompress(res.body))["tags"] == ["1"]
    # An error answer to a manifest request (asked for as identity, coded anyway by the
    # forced front) is relayed as the registry gave it, coding and all.
    missing = proxy.get(fronts.forced, f"/v2/{REPO}/manifests/nope", {"Accept-Encoding": "gzip"})
    assert missing.status == 404
    assert missing.headers.get("content-encoding") == "gzip"
    assert "MANIFEST_UNKNOWN" in gzip.decompress(missing.body).decode()
    assert proxy.files_in_cache_blobs() == []


def corrupt_gzip(data: bytes) -> tuple[bytes, str]:
    coded = bytearray(gzip.compress(data))
    coded[len(coded) // 2] ^= 0xFF
    return bytes(coded), "gzip"


def brotli_label(data: bytes) -> tuple[bytes, str]:
    return data, "br"


def deflated(data: bytes) -> tuple[bytes, str]:
    return zlib.compress(data), "deflate"


@pytest.mark.parametrize(
    ("recode", "refusal"),
    [
        (corrupt_gzip, "Content-Encoding gzip that does not decode"),
        (brotli_label, "Content-Encoding br is not one the registry cache can decode"),
        (deflated, None),
    ],
)
def test_a_cdn_that_codes_the_config_blob(
    recode: Callable[[bytes], tuple[bytes, str]],
    refusal: str | None,
    aio: AioThread,
    pki: Pki,
    registry: Registry,
    multi: MultiPlatformImage,
    upstream_ports: set[int],
    proxy_factory: Callable[..., Proxy],
    tmp_path: Path,
) -> None:
    cdn = Front(
        aio, "scratch.rc.test", pki.server, registry.netloc, pki.ca_path, recode_blobs=recode
    )
    cdn.start()
    upstream_ports.add(cdn.port)
    try:
        proxy = proxy_factory()
        amd64 = multi.platforms["linux/amd64"]
        res = skopeo(
            "copy",
            "--override-arch",
            "amd64",
            "--src-cert-dir",
            str(proxy.cert_dir),
            f"docker://{cdn.netloc}/{REPO}:1",
            f"oci:{tmp_path / 'out'}:latest",
            proxy_port=proxy.port,
        )
        if refusal is None:
            assert res.returncode == 0, res.stderr
            assert wait_stored(proxy, *amd64.blob_digests)
            for digest in amd64.blob_digests:
                assert blob_path(proxy.cache_dir, digest).read_bytes() == layout_file(multi, digest)
            return
        assert res.returncode != 0
        assert amd64.config_digest in res.stderr or amd64.layer_digests[0] in res.stderr
        refused = [ln for ln in proxy.log_lines(refusal) if "registry_cache.access" in ln]
        assert any(d in ln for d in amd64.blob_digests for ln in refused), proxy.output()[-3000:]
        # A client asking again gets the message naming the blob and the coding, or, where
        # the coding broke only after the answer had begun, a cut connection: never a blob.
        again = proxy.get(cdn.netloc, f"/v2/{REPO}/blobs/{amd64.config_digest}")
        if again.status == 502:
            assert amd64.config_digest in again.text() and refusal in again.text(), again.text()
        else:
            assert not again.complete
            assert again.sha256 != amd64.config_digest
        held = stored_blobs(proxy.cache_dir)
        assert not set(amd64.blob_digests) & set(held)
        assert not list((proxy.cache_dir / "tmp").rglob("*.*"))
    finally:
        cdn.stop()

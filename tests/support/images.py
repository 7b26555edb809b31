"""Generated test images (random layers) as OCI layouts, and skopeo around them."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .proxy import Proxy

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class Image:
    layout: Path
    manifest_digest: str
    config_digest: str
    layer_digests: list[str]
    sizes: dict[str, int] = field(default_factory=dict)

    @property
    def blob_digests(self) -> list[str]:
        return [self.config_digest, *self.layer_digests]

    @property
    def manifest(self) -> bytes:
        return (self.layout / "blobs" / "sha256" / self.manifest_digest.split(":")[1]).read_bytes()

    @property
    def total_size(self) -> int:
        """Manifest, config and layers, in bytes."""
        return len(self.manifest) + sum(self.sizes.values())


def _layer(index: int, size: int) -> tuple[bytes, bytes]:
    """A tar.gz with one file of random bytes; returns (tar, gzipped tar)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        data = os.urandom(size)
        info = tarfile.TarInfo(f"layer{index}/random.bin")
        info.size = len(data)
        info.mode = 0o644
        tar.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    return raw, gzip.compress(raw, compresslevel=1, mtime=0)


def make_image(
    layout: Path, layer_sizes: list[int], tag: str = "latest", base: Image | None = None
) -> Image:
    """Write an OCI image layout with one random file per layer (after the layers of
    `base`, shared with it, when given)."""
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)

    def put(data: bytes) -> str:
        d = sha256(data)
        (blobs / d.split(":")[1]).write_bytes(data)
        return d

    layers = []
    diff_ids = []
    sizes: dict[str, int] = {}
    base_blobs = base.layout / "blobs" / "sha256" if base else blobs
    for digest in base.layer_digests if base else []:
        gz = (base_blobs / digest.split(":")[1]).read_bytes()
        put(gz)
        sizes[digest] = len(gz)
        layers.append({"mediaType": OCI_LAYER, "digest": digest, "size": len(gz)})
        diff_ids.append(sha256(gzip.decompress(gz)))
    for i, size in enumerate(layer_sizes, start=len(layers)):
        raw, gz = _layer(i, size)
        d = put(gz)
        sizes[d] = len(gz)
        layers.append({"mediaType": OCI_LAYER, "digest": d, "size": len(gz)})
        diff_ids.append(sha256(raw))
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["/bin/true"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }
    ).encode()
    config_digest = put(config)
    sizes[config_digest] = len(config)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": OCI_CONFIG, "digest": config_digest, "size": len(config)},
            "layers": layers,
        }
    ).encode()
    manifest_digest = put(manifest)
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    (layout / "index.json").write_text(
        json.dumps(
            {
                "schemaVersion": 2,
                "manifests": [
                    {
                        "mediaType": OCI_MANIFEST,
                        "digest": manifest_digest,
                        "size": len(manifest),
                        "annotations": {"org.opencontainers.image.ref.name": tag},
                    }
                ],
            }
        )
    )
    return Image(layout, manifest_digest, config_digest, [la["digest"] for la in layers], sizes)


def skopeo(
    *args: str,
    proxy_port: int | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """Run skopeo; with proxy_port, through the proxy (HTTPS_PROXY, no NO_PROXY)."""
    proxy_vars = {"http_proxy", "https_proxy", "no_proxy", "all_proxy"}
    env = {k: v for k, v in os.environ.items() if k.lower() not in proxy_vars}
    if proxy_port is not None:
        env["HTTPS_PROXY"] = env["HTTP_PROXY"] = f"http://127.0.0.1:{proxy_port}"
    return subprocess.run(
        ["skopeo", "--insecure-policy", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def pull(proxy: Proxy, ref: str, dest: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    """skopeo copy of `ref` through the proxy (trusting its CA) into an OCI layout at dest;
    `extra` are skopeo's own options (`--src-creds u:p`, `--src-no-creds`, ...)."""
    return skopeo(
        "copy",
        "--src-cert-dir",
        str(proxy.cert_dir),
        *extra,
        f"docker://{ref}",
        f"oci:{dest}:latest",
        proxy_port=proxy.port,
    )


def pulled_blobs(proxy: Proxy, ref: str, dest: Path, *extra: str) -> set[str]:
    """pull, which must succeed; the digests of the blobs it brought."""
    res = pull(proxy, ref, dest, *extra)
    assert res.returncode == 0, f"pull of {ref} through the proxy failed:\n{res.stderr}"
    return layout_blobs(dest)


def push(
    image: Image,
    ref: str,
    cert_dir: Path,
    creds: tuple[str, str] | None = None,
    tag: str = "latest",
) -> None:
    """Push an OCI layout straight to a registry (not through the proxy)."""
    args = ["copy", "--dest-cert-dir", str(cert_dir)]
    if creds:
        args += ["--dest-creds", f"{creds[0]}:{creds[1]}"]
    res = skopeo(*args, f"oci:{image.layout}:{tag}", f"docker://{ref}")
    assert res.returncode == 0, f"skopeo push {ref} failed:\n{res.stderr}"


def layout_blobs(layout: Path) -> set[str]:
    d = layout / "blobs" / "sha256"
    return {"sha256:" + p.name for p in d.iterdir()} if d.exists() else set()

#!/usr/bin/env python3
"""Writes a generated test image (random layers) as an OCI image layout.

Usage: make_test_image.py LAYOUT_DIR TAG SIZE[,SIZE...] [ARCH,ARCH...]

With architectures (amd64,arm64), the tag names an OCI image index with one image per
linux architecture, each with its own layers of those sizes.

Each layer is a gzipped tar holding one file of random bytes, so that every
image, and every layer, is new to the registry cache. Standard library only:
it runs inside the test instances with Debian's python3.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import sys
import tarfile
from collections.abc import Callable
from pathlib import Path


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"


def _image(put: Callable[[bytes], str], sizes: list[int], arch: str) -> tuple[str, int]:
    """One image's layers, config and manifest; returns the manifest's digest and size."""
    layers, diff_ids = [], []
    for index, size in enumerate(sizes):
        raw = io.BytesIO()
        with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
            info = tarfile.TarInfo(f"data/layer{index}.bin")
            info.size = size
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(os.urandom(size)))
        gz = gzip.compress(raw.getvalue(), compresslevel=1, mtime=0)
        layers.append(
            {
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": put(gz),
                "size": len(gz),
            }
        )
        diff_ids.append(_digest(raw.getvalue()))
    config = json.dumps(
        {
            "architecture": arch,
            "os": "linux",
            "config": {"Cmd": ["/data"]},
            "rootfs": {"type": "layers", "diff_ids": diff_ids},
        }
    ).encode()
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {
                "mediaType": "application/vnd.oci.image.config.v1+json",
                "digest": put(config),
                "size": len(config),
            },
            "layers": layers,
        }
    ).encode()
    return put(manifest), len(manifest)


def make_image(layout: Path, tag: str, sizes: list[int], arches: list[str] | None = None) -> str:
    """Writes the layout; returns the digest its tag names: the image manifest, or with
    `arches` an image index of one image (own random layers) per linux architecture."""
    blobs = layout / "blobs" / "sha256"
    blobs.mkdir(parents=True, exist_ok=True)

    def put(data: bytes) -> str:
        digest = _digest(data)
        (blobs / digest.removeprefix("sha256:")).write_bytes(data)
        return digest

    if not arches:
        digest, size = _image(put, sizes, "amd64")
        media_type = OCI_MANIFEST
    else:
        entries = []
        for arch in arches:
            child, child_size = _image(put, sizes, arch)
            entries.append(
                {
                    "mediaType": OCI_MANIFEST,
                    "digest": child,
                    "size": child_size,
                    "platform": {"architecture": arch, "os": "linux"},
                }
            )
        index = json.dumps(
            {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
        ).encode()
        digest, size, media_type = put(index), len(index), OCI_INDEX
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    top = {
        "schemaVersion": 2,
        "manifests": [
            {
                "mediaType": media_type,
                "digest": digest,
                "size": size,
                "annotations": {"org.opencontainers.image.ref.name": tag},
            }
        ],
    }
    (layout / "index.json").write_text(json.dumps(top))
    return digest


def main(argv: list[str]) -> int:
    if len(argv) not in (4, 5):
        print(__doc__, file=sys.stderr)
        return 2
    sizes = [int(s) for s in argv[3].split(",")]
    arches = [a for a in argv[4].split(",") if a] if len(argv) == 5 else None
    print(make_image(Path(argv[1]), argv[2], sizes, arches))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

"""Which blobs an image uses, read from the manifests in the store.

An image is a manifest the cache holds in a registry and repository: named by a tag answer
there, or linked there by digest (pulled by digest) without being part of another image
of the repository. What it uses is what its manifest names, as far as the store has the
manifests: an image index names manifests, each manifest names a config and layers. The
admin commands list images with it (`ls`), keep what other images still use (`purge`),
and eviction skips what pinned images use.

Registries are named as the tags table names them (netloc); links name a plain-HTTP
registry `http://netloc` (Origin.key), so both are looked up for a netloc.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field

from .blobs import BlobStore
from .index import Index, Pin
from .routes import SHA256

MANIFEST_SNIFF_LIMIT = 4 << 20
# An index names manifests (1), which name configs and layers (2); nothing names deeper.
MAX_DEPTH = 2


def stored_document(store: BlobStore, digest: str, size: int | None) -> dict | None:
    """A stored blob read as a JSON object (a manifest), or None: too large, not JSON."""
    if size is None or size > MANIFEST_SNIFF_LIMIT:
        return None
    try:
        reader = store.open(digest)
    except OSError:
        return None
    try:
        document = json.loads(reader.pread(size + 1, 0))
    except (ValueError, OSError):
        return None
    finally:
        reader.close()
    return document if isinstance(document, dict) else None


def named_by(store: BlobStore, digest: str) -> list[tuple[str, str | None]]:
    """What a stored manifest names: (digest, media type for a manifest, else None)."""
    document = stored_document(store, digest, store.size(digest))
    if document is None:
        return []
    named: list[tuple[str, str | None]] = []
    for entry in document.get("manifests") or []:
        if isinstance(entry, dict) and isinstance(entry.get("digest"), str):
            media_type = entry.get("mediaType")
            named.append((entry["digest"], media_type if isinstance(media_type, str) else None))
    for entry in [document.get("config"), *(document.get("layers") or [])]:
        if isinstance(entry, dict) and isinstance(entry.get("digest"), str):
            named.append((entry["digest"], None))
    # Only digests the store could hold: a hostile manifest names no path.
    return [(d, media_type) for d, media_type in named if SHA256.fullmatch(d)]


def netloc_of(link_host: str) -> str:
    return link_host.removeprefix("http://")


def link_hosts(netloc: str) -> tuple[str, ...]:
    """The links table's names of a registry: HTTPS, and plain HTTP."""
    return (netloc, f"http://{netloc}")


@dataclass
class CachedImage:
    registry: str  # netloc, as the tags table names it
    repository: str
    digest: str
    media_type: str
    tags: set[str] = field(default_factory=set)
    pulls: int = 0
    last_pulled: float | None = None


class ImageGraph:
    def __init__(self, store: BlobStore, index: Index) -> None:
        self.store = store
        self.index = index

    def is_manifest(self, digest: str) -> bool:
        entry = self.index.blob(digest)
        return entry is not None and entry.media_type is not None

    def children(self, digest: str) -> list[str]:
        """What a stored manifest names; nothing for a layer or config (never read)."""
        if not self.is_manifest(digest):
            return []
        return [d for d, _ in named_by(self.store, digest)]

    def closure(self, roots: Iterable[str]) -> set[str]:
        """The roots and every digest their manifests name, as far as the store has them."""
        seen: set[str] = set()
        stack = [(digest, 0) for digest in roots]
        while stack:
            digest, depth = stack.pop()
            if digest in seen:
                continue
            seen.add(digest)
            if depth < MAX_DEPTH:
                stack.extend((child, depth + 1) for child in self.children(digest))
        return seen

    def images(self) -> list[CachedImage]:
        """Every image the cache holds the manifest of, per registry and repository."""
        repos: dict[tuple[str, str], dict[str, CachedImage]] = {}

        def image(registry: str, name: str, digest: str, media_type: str) -> CachedImage:
            held = repos.setdefault((registry, name), {})
            if digest not in held:
                held[digest] = CachedImage(registry, name, digest, media_type)
            return held[digest]

        manifests: dict[str, bool] = {}

        def held(digest: str) -> bool:
            if digest not in manifests:
                manifests[digest] = self.is_manifest(digest)
            return manifests[digest]

        for row in self.index.tag_rows():
            if held(row.digest):
                image(row.host, row.name, row.digest, row.media_type).tags.add(row.tag)
        for link in self.index.manifest_links():
            if held(link.digest):
                found = image(netloc_of(link.host), link.name, link.digest, link.media_type)
                found.pulls += link.pulls
                if link.last_pulled is not None:
                    found.last_pulled = max(found.last_pulled or 0.0, link.last_pulled)
        images: list[CachedImage] = []
        for held_here in repos.values():
            # A manifest an index of the same repository names is part of that image.
            parts = {c for d, img in held_here.items() for c in self.children(d)}
            images += [img for d, img in held_here.items() if img.tags or d not in parts]
        return sorted(images, key=lambda i: (i.registry, i.repository, sorted(i.tags), i.digest))

    def roots_of(self, pin: Pin) -> set[str]:
        """The manifests a tag or digest of a repository names now."""
        if SHA256.fullmatch(pin.reference):
            return {pin.reference}
        return {row.digest for row in self.index.tags_of(pin.host, pin.name, pin.reference)}

    def pinned(self) -> set[str]:
        """Every digest a pinned image uses (as far as the store knows its manifests)."""
        pins = self.index.pins()
        if not pins:
            return set()
        return self.closure(d for pin in pins for d in self.roots_of(pin))

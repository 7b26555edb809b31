"""The image graph (which blobs an image uses), pins in eviction, and the index migration
that adds pull counts."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from pathlib import Path

from proxy_app.blobs import FilesystemBlobStore
from proxy_app.config import Config
from proxy_app.index import SCHEMA_VERSION, Index, Pin
from proxy_app.media_types import OCI_INDEX, OCI_MANIFEST
from proxy_app.metrics import Metrics
from proxy_app.store_maintenance import StoreMaintenance

REG, REPO = "reg.example:5000", "team/app"


def digest_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def put(
    store: FilesystemBlobStore, index: Index, data: bytes, media_type: str | None = None
) -> str:
    digest = digest_of(data)
    writer = store.begin_write(digest)
    writer.write(data)
    writer.commit(len(data))
    index.add_blob(digest, len(data), media_type)
    return digest


def image(store: FilesystemBlobStore, index: Index, *layers: bytes) -> tuple[str, set[str]]:
    """An image manifest, its config and layers in the store: (manifest, all its digests)."""
    layer_digests = [put(store, index, layer) for layer in layers]
    config = put(store, index, json.dumps({"os": "linux", "layers": layer_digests}).encode())
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"digest": config, "size": 1},
            "layers": [{"digest": d, "size": 1} for d in layer_digests],
        }
    ).encode()
    digest = put(store, index, manifest, OCI_MANIFEST)
    return digest, {digest, config, *layer_digests}


def setup(
    tmp_path: Path, max_size: int = 1 << 30
) -> tuple[FilesystemBlobStore, Index, StoreMaintenance]:
    store = FilesystemBlobStore(tmp_path)
    index = Index(tmp_path / "index.sqlite3")
    maintenance = StoreMaintenance(
        Config(cache_dir=tmp_path, max_size=max_size), store, index, Metrics()
    )
    return store, index, maintenance


def test_images_and_what_they_use(tmp_path: Path) -> None:
    store, index, maintenance = setup(tmp_path)
    graph = maintenance.graph
    base = b"base layer" * 100
    a, a_all = image(store, index, base, b"a only")
    b, b_all = image(store, index, base, b"b only")
    multi = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [{"digest": b, "mediaType": OCI_MANIFEST}],
        }
    ).encode()
    m = put(store, index, multi, OCI_INDEX)
    index.set_tag(REG, REPO, "1", "v", a, OCI_MANIFEST)
    index.set_tag(REG, REPO, "latest", "v", a, OCI_MANIFEST)
    index.add_link(REG, "other", m, OCI_INDEX)  # pulled by digest in another repository
    index.add_link(REG, "other", b, OCI_MANIFEST)  # the part of it a client pulled next
    index.count_pull(REG, "other", m)
    index.flush_access()

    images = {(i.repository, i.digest): i for i in graph.images()}
    assert set(images) == {(REPO, a), ("other", m)}  # b is part of m there, not an image
    assert images[(REPO, a)].tags == {"1", "latest"}
    assert images[("other", m)].tags == set() and images[("other", m)].pulls == 1
    assert graph.closure([a]) == a_all
    assert graph.closure([m]) == {m} | b_all
    assert graph.closure([a]) & graph.closure([m]) == {digest_of(base)}


def test_eviction_skips_pinned_images_however_old(tmp_path: Path) -> None:
    store, index, maintenance = setup(tmp_path, max_size=1 << 30)
    pinned, pinned_all = image(store, index, b"p" * 1000)
    index.set_tag(REG, REPO, "keep", "v", pinned, OCI_MANIFEST)
    index.add_pin(Pin(REG, REPO, "keep", "admin"))
    # the pinned image is the least recently used of all, and more than 256 blobs follow
    index._db.execute("UPDATE blobs SET last_access=1")
    others = [put(store, index, f"blob {i}".encode()) for i in range(300)]
    maintenance.refresh_size()
    maintenance.config = Config(cache_dir=tmp_path, max_size=1)
    assert maintenance.make_room(0) is False  # only the pinned image is left
    assert index.all_digests() == pinned_all
    assert all(store.has(d) for d in pinned_all) and not any(store.has(d) for d in others)

    index.remove_pin(Pin(REG, REPO, "keep", "admin"))
    assert maintenance.make_room(0) is True
    assert index.count() == 0


def test_inactive_expiry_skips_pinned_images(tmp_path: Path) -> None:
    store, index, maintenance = setup(tmp_path)
    digest, everything = image(store, index, b"layer")
    index.set_config_pins([Pin(REG, REPO, digest, "config")])
    index._db.execute("UPDATE blobs SET last_access=?", (time.time() - 365 * 86400,))
    assert maintenance.expire_inactive() == 0
    assert index.set_config_pins([]) == (0, 1)
    assert maintenance.expire_inactive() == len(everything)


def test_an_older_index_gets_pull_counts_in_place(tmp_path: Path) -> None:
    path = tmp_path / "index.sqlite3"
    db = sqlite3.connect(path)
    db.executescript(
        """
        CREATE TABLE blobs (digest TEXT PRIMARY KEY, size INTEGER NOT NULL, media_type TEXT,
                            stored_at REAL NOT NULL, last_access REAL NOT NULL);
        CREATE TABLE links (host TEXT NOT NULL, name TEXT NOT NULL, digest TEXT NOT NULL,
                            media_type TEXT, linked_at REAL NOT NULL,
                            PRIMARY KEY (host, name, digest));
        INSERT INTO blobs VALUES ('sha256:aa', 10, 'x', 0, 0);
        INSERT INTO links VALUES ('reg', 'app', 'sha256:aa', 'x', 0);
        PRAGMA user_version=1;
        """
    )
    db.close()
    index = Index(path)
    assert not index.needs_links  # links were there: nothing to rebuild
    assert index._db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
    index.count_pull("reg", "app", "sha256:aa")
    index.count_pull("reg", "app", "sha256:aa")
    index.flush_access()
    [link] = index.manifest_links()
    assert link.pulls == 2 and link.last_pulled is not None
    index.close()
    assert Index(path).manifest_links()[0].pulls == 2

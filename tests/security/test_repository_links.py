"""A digest is served under a registry and repository only where that registry has it,
and each registry's label for a manifest is its own (issue 13, Must show 2, 3 and 5).

Real registries: `registry` (public, as "hub"), `private_registry` (htpasswd), a test
Front that labels manifests text/html; skopeo and raw clients through the cache.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import pytest
from security.secsupport import hash_password, pull_args, skopeo_via
from support.client import Response
from support.durability import wait_stored
from support.images import Image, pull, push
from support.proxy import Proxy
from support.registry import Registry
from support.servers import AioThread, Front
from support.topology import PRIVATE_CREDS, Pki

from proxy_app.index import SCHEMA_VERSION

pytestmark = pytest.mark.integration

TEAM = ("team", "team-pass-1")
PUB = ("pub", "pub-pass-2")
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
ACCEPT = {"Accept": OCI_MANIFEST}


def get(proxy: Proxy, netloc: str, path: str, user: tuple[str, str] | None = None) -> Response:
    return proxy.get(netloc, path, ACCEPT, user)


def kind(image: Image, digest: str) -> str:
    return "manifests" if digest == image.manifest_digest else "blobs"


def test_no_user_reads_past_its_allow_list_under_another_name(
    registry: Registry,
    private_registry: Registry,
    image_factory: Callable[..., Image],
    proxy_factory: Callable[..., Proxy],
    tmp_path: Path,
) -> None:
    secret = image_factory(f"{private_registry.netloc}/team/secret:1", creds=PRIVATE_CREDS)
    image_factory(f"{registry.netloc}/library/alpha:1")
    proxy = proxy_factory(
        users=[
            {
                "name": TEAM[0],
                "password_hash": hash_password(TEAM[1]),
                "allow": [f"{private_registry.hostname}:*/team/*"],
            },
            {
                "name": PUB[0],
                "password_hash": hash_password(PUB[1]),
                "allow": [f"{registry.hostname}:*/library/*"],
            },
        ]
    )
    team_url = f"http://{TEAM[0]}:{quote(TEAM[1])}@127.0.0.1:{proxy.port}"
    res = skopeo_via(
        team_url,
        *pull_args(
            proxy,
            f"{private_registry.netloc}/team/secret:1",
            tmp_path / "secret",
            "--src-creds",
            ":".join(PRIVATE_CREDS),
        ),
    )
    assert res.returncode == 0, res.stderr
    assert wait_stored(proxy, secret.manifest_digest, *secret.blob_digests)

    for digest in (secret.manifest_digest, *secret.blob_digests):
        # Under a repository pub may read, at a registry that does not hold it: hub's 404.
        path = f"{kind(secret, digest)}/{digest}"
        under_hub = get(proxy, registry.netloc, f"/v2/library/alpha/{path}", PUB)
        assert under_hub.status == 404, (digest, under_hub.status, under_hub.cache)
        assert under_hub.sha256 != digest
        # Under its own name: pub's allow list says no, cached or not.
        own = get(proxy, private_registry.netloc, f"/v2/team/secret/{path}", PUB)
        assert own.status == 403
        # Under another repository of the private registry, with the registry's password:
        # the registry holds it in team/secret only.
        team_other = get(proxy, private_registry.netloc, f"/v2/team/other/{path}", TEAM)
        assert team_other.status in (401, 404) and team_other.sha256 != digest
    # pub's own repository still pulls.
    pub_url = f"http://{PUB[0]}:{quote(PUB[1])}@127.0.0.1:{proxy.port}"
    res = skopeo_via(
        pub_url, *pull_args(proxy, f"{registry.netloc}/library/alpha:1", tmp_path / "alpha")
    )
    assert res.returncode == 0, res.stderr


def test_a_digest_two_repositories_hold_is_downloaded_once(
    registry: Registry,
    pki: Pki,
    image_factory: Callable[..., Image],
    proxy_factory: Callable[..., Proxy],
    tmp_path: Path,
) -> None:
    image = image_factory(f"{registry.netloc}/links/one:1", [5000, 6000])
    push(image, f"{registry.netloc}/links/two:1", pki.cert_dir)
    image_factory(f"{registry.netloc}/links/three:1")
    proxy = proxy_factory()
    assert pull(proxy, f"{registry.netloc}/links/one:1", tmp_path / "one").returncode == 0
    assert wait_stored(proxy, image.manifest_digest, *image.blob_digests)
    gets_before = {d: len(registry.blob_requests(d)) for d in image.blob_digests}

    res = pull(proxy, f"{registry.netloc}/links/two:1", tmp_path / "two")
    assert res.returncode == 0, res.stderr
    for digest in image.blob_digests:
        assert len(registry.blob_requests(digest)) == gets_before[digest], digest
        assert registry.blob_requests(digest, method="HEAD"), "confirmed with the registry"
        assert proxy.results_for(f"links/two/blobs/{digest}")[-1] == "HIT"
    # The registry's no for a repository that does not hold it, as the registry gave it.
    for digest in image.blob_digests:
        res = get(proxy, registry.netloc, f"/v2/links/three/blobs/{digest}")
        assert res.status == 404 and "BLOB_UNKNOWN" in res.text()
    # Confirmed once: the next pull of two asks nothing more.
    heads = len(registry.blob_requests(method="HEAD"))
    assert pull(proxy, f"{registry.netloc}/links/two:1", tmp_path / "two-again").returncode == 0
    assert len(registry.blob_requests(method="HEAD")) == heads


def test_another_registrys_label_changes_nothing_for_this_ones_clients(
    aio: AioThread,
    pki: Pki,
    registry: Registry,
    upstream_ports: set[int],
    image_factory: Callable[..., Image],
    proxy_factory: Callable[..., Proxy],
    tmp_path: Path,
) -> None:
    image = image_factory(f"{registry.netloc}/html/alpha:1")
    html = Front(
        aio, "scratch.rc.test", pki.server, registry.netloc, pki.ca_path, manifest_type="text/html"
    ).start()
    upstream_ports.add(html.port)
    try:
        proxy = proxy_factory()
        by_digest = f"/v2/html/alpha/manifests/{image.manifest_digest}"
        # The html registry first: its own client gets its answer, nothing is stored.
        for path in ("/v2/html/alpha/manifests/1", by_digest):
            res = get(proxy, html.netloc, path)
            assert res.status == 200 and res.headers["content-type"] == "text/html"
        assert proxy.files_in_cache_blobs() == []
        # The real registry's clients: the right type, and a pull that works.
        assert pull(proxy, f"{registry.netloc}/html/alpha:1", tmp_path / "a").returncode == 0
        assert wait_stored(proxy, image.manifest_digest)
        # The html registry again, now that the bytes are stored: still text/html to its
        # client (nothing confirmed as a manifest), and the real registry's label holds.
        res = get(proxy, html.netloc, by_digest)
        assert res.headers["content-type"] == "text/html" and res.cache != "HIT"
        for path in ("/v2/html/alpha/manifests/1", by_digest):
            res = get(proxy, registry.netloc, path)
            assert res.status == 200 and res.cache == "HIT"
            assert res.headers["content-type"] == OCI_MANIFEST
        res = pull(proxy, f"{registry.netloc}/html/alpha:1", tmp_path / "b")
        assert res.returncode == 0, res.stderr
    finally:
        html.stop()


def test_a_cache_from_before_links_migrates_and_keeps_the_new_checks(
    registry: Registry,
    image_factory: Callable[..., Image],
    proxy_factory: Callable[..., Proxy],
    tmp_path: Path,
) -> None:
    image = image_factory(f"{registry.netloc}/old/cache:1", [3000, 4000])
    image_factory(f"{registry.netloc}/old/other:1")
    proxy = proxy_factory()
    assert pull(proxy, f"{registry.netloc}/old/cache:1", tmp_path / "first").returncode == 0
    assert wait_stored(proxy, image.manifest_digest, *image.blob_digests)
    proxy.stop()
    # The index as the cache before links wrote it: the same tables without `links`, at
    # user_version 0.
    db = sqlite3.connect(proxy.cache_dir / "index.sqlite3")
    db.execute("DROP TABLE links")
    db.execute("PRAGMA user_version=0")
    db.commit()
    db.close()

    proxy.start()
    assert proxy.log_lines("links rebuilt from the tag answers of an older cache: 4")
    heads = len(registry.blob_requests(method="HEAD"))
    gets = len(registry.blob_requests())
    before = len(proxy.log_lines())
    res = pull(proxy, f"{registry.netloc}/old/cache:1", tmp_path / "second")
    assert res.returncode == 0, res.stderr
    served = [ln for ln in proxy.log_lines()[before:] if "/old/cache/" in ln]
    assert served and all(" HIT " in ln for ln in served), served
    # Linked from the tag answer and the manifest: nothing asked, nothing fetched again.
    assert len(registry.blob_requests(method="HEAD")) == heads
    assert len(registry.blob_requests()) == gets
    # The new checks hold for the migrated content.
    res = get(proxy, registry.netloc, f"/v2/old/other/blobs/{image.layer_digests[0]}")
    assert res.status == 404
    db = sqlite3.connect(proxy.cache_dir / "index.sqlite3")
    # migrated to the current schema (2: links count pulls, for `registry-cache ls`)
    assert db.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 2
    db.close()

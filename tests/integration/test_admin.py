"""Issue 19: the admin commands (ls, purge, pin, unpin, refresh) on a running proxy, over
its admin socket (and the /admin/ API for admin users), against a real registry."""

from __future__ import annotations

import json
import shutil
import sqlite3
import stat
import tempfile
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.admin import admin, admin_json
from support.client import IMAGE_MANIFEST_ACCEPT, basic, get_tag
from support.durability import blob_path, stored_blobs
from support.images import Image, pulled_blobs
from support.proxy import Proxy
from support.registry import Registry, wait_until

from proxy_app.admin_client import AdminRefused, call
from proxy_app.proxy_auth import hash_password

pytestmark = pytest.mark.integration

PERMISSION = "permission denied: run as root or the registry-cache user"
NOBODY = ("setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups")


def indexed(proxy: Proxy) -> set[str]:
    db = sqlite3.connect(f"file:{proxy.cache_dir / 'index.sqlite3'}?mode=ro", uri=True)
    try:
        return {row[0] for row in db.execute("SELECT digest FROM blobs")}
    finally:
        db.close()


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def two_images_sharing_a_base(registry: Registry, image_factory) -> tuple[str, Image, str, Image]:
    """Two images in two repositories of `registry` whose first layer is the same blob."""
    team = unique("team")
    base = image_factory(f"{registry.netloc}/{team}/base:1", [60_000])
    ref_a = f"{registry.netloc}/{team}/one:1.0"
    ref_b = f"{registry.netloc}/{team}/two:2.0"
    a = image_factory(ref_a, [30_000], base=base)
    b = image_factory(ref_b, [40_000], base=base)
    assert a.layer_digests[0] == b.layer_digests[0] == base.layer_digests[0]
    return ref_a, a, ref_b, b


def test_ls_lists_cached_images_with_sizes_tags_pulls_and_rule(
    registry: Registry, image_factory, proxy_factory, tmp_path: Path
):
    ref_a, a, ref_b, b = two_images_sharing_a_base(registry, image_factory)
    repo_b = ref_b.split("/", 1)[1].split(":")[0]
    rule_b = f"{registry.netloc}/{repo_b}"
    proxy = proxy_factory(tag_ttl="10m", tag_rules=[{"match": rule_b, "ttl": "1d"}])
    assert admin_json(proxy, "ls") == {"images": []}
    pulled_blobs(proxy, ref_a, tmp_path / "a")
    pulled_blobs(proxy, ref_b, tmp_path / "b")
    pulled_blobs(proxy, ref_b, tmp_path / "b2")

    images = admin_json(proxy, "ls")["images"]
    by_digest = {i["digest"]: i for i in images}
    assert set(by_digest) == {a.manifest_digest, b.manifest_digest}, images
    repo_a = ref_a.split("/", 1)[1].split(":")[0]
    for image, ref, pulls, rule in (
        (a, ref_a, 1, "tag_ttl (10m)"),  # no rule matches: tag_ttl
        (b, ref_b, 2, f"{rule_b} (1d)"),
    ):
        shown = by_digest[image.manifest_digest]
        assert shown["registry"] == registry.netloc
        assert shown["repository"] == ref.split("/", 1)[1].split(":")[0]
        assert shown["tags"] == [ref.rsplit(":", 1)[1]]
        assert shown["size"] == image.total_size, (shown, image.sizes)
        assert shown["blobs"] == 2 + len(image.layer_digests)
        assert shown["missing_blobs"] == 0
        assert shown["pulls"] == pulls
        assert shown["last_pulled"] is not None
        assert shown["rule"] == rule
        assert shown["rules"] == {ref.rsplit(":", 1)[1]: rule}
        assert shown["pinned"] is False

    # REGISTRY/REPO-GLOB
    only_a = admin_json(proxy, "ls", f"{registry.netloc}/{repo_a}")["images"]
    assert [i["digest"] for i in only_a] == [a.manifest_digest]
    team = repo_a.split("/")[0]
    assert len(admin_json(proxy, "ls", f"*/{team}/*")["images"]) == 2
    assert admin_json(proxy, "ls", "nothing.example/*")["images"] == []

    table = admin(proxy, "ls")
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split() == [
        "REGISTRY", "REPOSITORY", "TAGS", "DIGEST", "SIZE", "LAST", "PULLED", "PULLS", "RULE",
        "PINNED",
    ]  # fmt: skip
    row_a = [line for line in lines if repo_a in line]
    assert len(row_a) == 1 and "1.0" in row_a[0] and a.manifest_digest[:19] in row_a[0]
    assert "no cached images match" in admin(proxy, "ls", "nothing.example/*").stdout


def test_purge_removes_only_what_no_other_image_uses(
    registry: Registry, image_factory, proxy_factory, tmp_path: Path
):
    ref_a, a, ref_b, b = two_images_sharing_a_base(registry, image_factory)
    proxy = proxy_factory()
    pulled_blobs(proxy, ref_a, tmp_path / "a")
    pulled_blobs(proxy, ref_b, tmp_path / "b")
    shared = a.layer_digests[0]
    only_a = {a.manifest_digest, a.config_digest, a.layer_digests[1]}
    assert only_a | {shared} <= set(stored_blobs(proxy.cache_dir))

    result = admin_json(proxy, "purge", ref_a)
    assert result["tags_removed"] == 1
    assert set(result["blobs_removed"]) == only_a
    assert result["bytes_freed"] == a.total_size - a.sizes[shared]
    assert result["kept_shared"] == [shared]

    on_disk, in_index = set(stored_blobs(proxy.cache_dir)), indexed(proxy)
    for digest in only_a:
        assert digest not in on_disk and not blob_path(proxy.cache_dir, digest).exists()
        assert digest not in in_index
    assert shared in on_disk and shared in in_index
    assert {b.manifest_digest, b.config_digest, *b.layer_digests} <= on_disk
    assert [i["digest"] for i in admin_json(proxy, "ls")["images"]] == [b.manifest_digest]

    # the other image is still whole in the cache: every blob a HIT
    pulled_blobs(proxy, ref_b, tmp_path / "b-again")
    for digest in (b.config_digest, *b.layer_digests):
        assert proxy.results_for(digest)[-1] == "HIT", (digest, proxy.results_for(digest))
    # and the purged one comes from upstream again
    pulled_blobs(proxy, ref_a, tmp_path / "a-again")
    assert proxy.results_for(a.layer_digests[1])[-1] == "MISS"

    again = admin(proxy, "purge", ref_b.rsplit(":", 1)[0] + ":nope")
    assert again.returncode == 1 and "is not cached" in again.stderr, again.stderr


def test_purge_by_digest_and_normalised_docker_hub_names(
    registry: Registry, image_factory, proxy_factory, tmp_path: Path
):
    repo = unique("digest/app")
    ref = f"{registry.netloc}/{repo}"
    img = image_factory(f"{ref}:1", [20_000])
    proxy = proxy_factory()
    pulled_blobs(proxy, f"{ref}@{img.manifest_digest}", tmp_path / "d")
    assert [i["tags"] for i in admin_json(proxy, "ls")["images"]] == [[]]
    # a Docker Hub name is normalised as Docker does, and is simply not cached here
    hub = admin(proxy, "purge", "alpine")
    assert hub.returncode == 1
    assert "docker.io/library/alpine:latest is not cached" in hub.stderr
    result = admin_json(proxy, "purge", f"{ref}@{img.manifest_digest}")
    assert set(result["blobs_removed"]) == {img.manifest_digest, *img.blob_digests}
    assert stored_blobs(proxy.cache_dir) == {}


def test_pinned_image_survives_eviction_and_unpin_makes_it_evictable(
    registry: Registry, image_factory, proxy_factory, tmp_path: Path
):
    repo = unique("pins")
    refs = {n: f"{registry.netloc}/{repo}/{n}:1" for n in ("p", "q", "r", "s")}
    images = {n: image_factory(ref, [250_000]) for n, ref in refs.items()}
    proxy = proxy_factory(max_size="600k")  # two of the images fit, not three
    pinned = admin(proxy, "pin", refs["p"])
    assert pinned.returncode == 0 and "not cached yet" in pinned.stdout, pinned.stdout

    def held(name: str) -> set[str]:
        img = images[name]
        return {img.manifest_digest, *img.blob_digests} & set(stored_blobs(proxy.cache_dir))

    def whole(name: str) -> bool:
        img = images[name]
        return held(name) == {img.manifest_digest, *img.blob_digests}

    # A client has a blob's last byte once it is verified, a moment before the cache has
    # stored it (and evicted for it): the store is waited for.
    pulled_blobs(proxy, refs["p"], tmp_path / "p")
    pulled_blobs(proxy, refs["q"], tmp_path / "q")
    assert wait_until(lambda: whole("p") and whole("q"), timeout=10)
    pulled_blobs(proxy, refs["r"], tmp_path / "r")  # p is least recently used, but pinned
    assert wait_until(lambda: whole("r"), timeout=10)
    assert whole("p"), "the pinned image lost blobs to eviction"
    assert images["q"].layer_digests[0] not in held("q"), "q should have made room"
    listed = {i["digest"]: i["pinned"] for i in admin_json(proxy, "ls")["images"]}
    assert listed[images["p"].manifest_digest] is True
    assert admin_json(proxy, "pin")["pins"] == [
        {"ref": refs["p"], "source": "admin", "cached": True}
    ]
    # the pinned image is complete in the cache: every blob a HIT
    pulled_blobs(proxy, refs["p"], tmp_path / "p-again")
    for digest in images["p"].blob_digests:
        assert proxy.results_for(digest)[-1] == "HIT"

    # `registry-cache gc` with a tiny max_size takes everything else
    gc = admin(proxy, "gc", env={"REGISTRY_CACHE_MAX_SIZE": "1"})
    assert gc.returncode == 0, gc.stderr
    assert whole("p") and not held("r")

    unpinned = admin(proxy, "unpin", refs["p"])
    assert unpinned.returncode == 0, unpinned.stderr
    assert admin_json(proxy, "pin")["pins"] == []
    pulled_blobs(proxy, refs["s"], tmp_path / "s")
    pulled_blobs(proxy, refs["q"], tmp_path / "q-again")
    assert wait_until(lambda: whole("q"), timeout=10)
    assert images["p"].layer_digests[0] not in held("p"), "unpinned, p should be evicted first"
    assert admin(proxy, "unpin", refs["p"]).returncode == 1


def test_config_pins_are_applied_at_start(
    registry: Registry, image_factory, proxy_factory, tmp_path: Path
):
    ref = f"{registry.netloc}/{unique('cfgpin')}/app:1"
    proxy = proxy_factory(pinned=[ref])
    assert admin_json(proxy, "pin")["pins"] == [{"ref": ref, "source": "config", "cached": False}]
    refused = admin(proxy, "unpin", ref)
    assert refused.returncode == 1 and "config's `pinned` list" in refused.stderr
    image_factory(ref, [1000])
    pulled_blobs(proxy, ref, tmp_path / "x")
    refused = admin(proxy, "purge", ref)
    assert refused.returncode == 1 and "unpin it first" in refused.stderr
    # taken out of the config: gone at the next start
    proxy.stop()
    proxy.config["pinned"] = []
    proxy.config_path.write_text(yaml.safe_dump(proxy.config))
    proxy.start()
    assert admin_json(proxy, "pin")["pins"] == []


def test_refresh_picks_up_a_moved_tag_inside_tag_ttl(
    registry: Registry, image_factory, proxy_factory
):
    repo, tag = unique("refresh/app"), "stable"
    old = image_factory(f"{registry.netloc}/{repo}:{tag}", [1000])
    new = image_factory(f"{registry.netloc}/{repo}:next", [2000])
    proxy = proxy_factory(tag_ttl="1h")
    first = get_tag(proxy, registry, repo, tag)
    assert first.status == 200 and first.sha256 == old.manifest_digest

    status, _, body = registry.api(
        "PUT",
        f"/v2/{repo}/manifests/{tag}",
        body=new.manifest,
        headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"},
    )
    assert status == 201, body
    # without refresh: the old answer, trusted for tag_ttl
    cached = get_tag(proxy, registry, repo, tag)
    assert cached.cache == "HIT" and cached.sha256 == old.manifest_digest

    res = admin(proxy, "refresh", f"{registry.netloc}/{repo}:{tag}")
    assert res.returncode == 0, res.stderr
    assert "the next pull revalidates" in res.stdout
    moved = get_tag(proxy, registry, repo, tag)
    assert moved.status == 200 and moved.sha256 == new.manifest_digest
    assert moved.headers.get("docker-content-digest") == new.manifest_digest
    # and trusted for tag_ttl again
    again = get_tag(proxy, registry, repo, tag)
    assert again.cache == "HIT" and again.sha256 == new.manifest_digest

    by_digest = admin(proxy, "refresh", f"{registry.netloc}/{repo}@{new.manifest_digest}")
    assert by_digest.returncode == 2 and "refresh takes a tag" in by_digest.stderr


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A folder any user may read (pytest's are root's alone)."""
    folder = Path(tempfile.mkdtemp(prefix="rc-admin-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder)


def readable_copy(proxy: Proxy, folder: Path) -> Path:
    """What of the proxy's config names its admin socket, where any user may read it."""
    path = folder / "config.yml"
    path.write_text(yaml.safe_dump({"cache_dir": str(proxy.cache_dir)}))
    path.chmod(0o644)
    return path


def test_commands_refused_without_access_to_the_socket(
    registry: Registry, image_factory, proxy_factory, tmp_path: Path, public_dir: Path
):
    ref = f"{registry.netloc}/{unique('perm')}/app:1"
    image_factory(ref, [1000])
    proxy = proxy_factory()
    pulled_blobs(proxy, ref, tmp_path / "x")
    sock = proxy.cache_dir / "admin.sock"
    assert stat.S_ISSOCK(sock.stat().st_mode) and stat.S_IMODE(sock.stat().st_mode) == 0o660
    before = stored_blobs(proxy.cache_dir)
    public = readable_copy(proxy, public_dir)
    for args in (("ls",), ("purge", ref), ("pin", ref), ("unpin", ref), ("refresh", ref)):
        res = admin(proxy, *args, prefix=NOBODY, config=public)
        assert res.returncode == 1, (args, res.stdout, res.stderr)
        assert PERMISSION in res.stderr and str(sock) in res.stderr, res.stderr
        # a config it cannot read says the same
        res = admin(proxy, *args, prefix=NOBODY)
        assert res.returncode == 1 and PERMISSION in res.stderr, res.stderr
    assert stored_blobs(proxy.cache_dir) == before
    assert admin_json(proxy, "pin")["pins"] == []

    proxy.stop()
    gone = admin(proxy, "ls")
    assert gone.returncode == 1
    assert f"is registry-cache running? socket {sock} not found" in gone.stderr


def http_admin(
    proxy: Proxy, method: str, path: str, user: tuple[str, str] | None, body: Any = None
) -> tuple[int, dict[str, Any]]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"{proxy.url}{path}", data=data, method=method)
    if user:
        request.add_header("Authorization", basic(*user))
    try:
        with urllib.request.urlopen(request, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_http_admin_api_needs_an_admin_user(
    registry: Registry, image_factory, proxy_factory, tmp_path: Path
):
    ops, dev = ("ops", "ops-secret"), ("dev", "dev-secret")
    ref = f"{registry.netloc}/{unique('http')}/app:1"
    img = image_factory(ref, [1000])
    proxy = proxy_factory(
        users=[
            {"name": ops[0], "password_hash": hash_password(ops[1]), "admin": True},
            {"name": dev[0], "password_hash": hash_password(dev[1])},
        ]
    )
    repo = ref.split("/", 1)[1].split(":")[0]
    got = proxy.get(registry.netloc, f"/v2/{repo}/manifests/1", IMAGE_MANIFEST_ACCEPT, user=dev)
    assert got.status == 200 and got.sha256 == img.manifest_digest
    before = stored_blobs(proxy.cache_dir)

    status, answer = http_admin(proxy, "GET", "/admin/images", None)
    assert status == 401 and "admin: true" in answer["error"]
    for method, path, body in (
        ("GET", "/admin/images", None),
        ("POST", "/admin/purge", {"ref": ref}),
        ("POST", "/admin/pin", {"ref": ref}),
        ("POST", "/admin/unpin", {"ref": ref}),
        ("POST", "/admin/refresh", {"ref": ref}),
    ):
        status, answer = http_admin(proxy, method, path, dev, body)
        assert status == 403, (path, status, answer)
        assert answer["error"] == "proxy user dev is not an admin (admin: true in `users`)"
    assert stored_blobs(proxy.cache_dir) == before

    status, answer = http_admin(proxy, "GET", "/admin/images", ops)
    assert status == 200 and [i["digest"] for i in answer["images"]] == [img.manifest_digest]
    status, answer = http_admin(proxy, "POST", "/admin/pin", ops, {"ref": ref})
    assert status == 200 and answer["cached"] is True
    status, answer = http_admin(proxy, "POST", "/admin/purge", ops, {"ref": "../../etc"})
    assert status == 400 and "not an image reference" in answer["error"]
    status, answer = http_admin(proxy, "POST", "/admin/purge", ops, "not an object")
    assert status == 400


HOSTILE = [
    "../../etc/passwd",
    "REGISTRY.rc.test/../../x:1",
    "registry.rc.test:5000/a/../../b:1",
    "%2e%2e/x",
    "x@sha256:../../../../etc/passwd",
    "a@sha256:1234",
    "/etc/passwd",
    "app:bad/tag",
    "",
    "app\n:1",
    "x" * 5000,
]


def test_hostile_references_are_refused_and_nothing_is_deleted(
    registry: Registry, image_factory, proxy_factory, tmp_path: Path
):
    ref = f"{registry.netloc}/{unique('hostile')}/app:1"
    image_factory(ref, [1000])
    proxy = proxy_factory()
    pulled_blobs(proxy, ref, tmp_path / "x")
    before, files_before = stored_blobs(proxy.cache_dir), sorted(proxy.cache_dir.rglob("*"))
    for bad in HOSTILE:
        for command in ("purge", "pin", "unpin", "refresh"):
            res = admin(proxy, command, bad)
            assert res.returncode == 2, (command, bad, res.stdout, res.stderr)
            assert "not an image reference" in res.stderr, res.stderr
            assert "Traceback" not in res.stderr
            # and the service itself, asked directly on its socket
            with pytest.raises(AdminRefused) as refused:
                call(proxy.cache_dir / "admin.sock", "POST", f"/admin/{command}", {"ref": bad})
            assert refused.value.status in (400, 413), (command, bad, refused.value)
    res = admin(proxy, "ls", "bad\x01glob")
    assert res.returncode == 2 and "not a REGISTRY/REPO-GLOB" in res.stderr, res.stderr
    assert stored_blobs(proxy.cache_dir) == before
    assert sorted(proxy.cache_dir.rglob("*")) == files_before
    assert admin_json(proxy, "pin")["pins"] == []
    assert len(admin_json(proxy, "ls")["images"]) == 1

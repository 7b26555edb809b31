import pytest

from proxy_app.routes import BadRoute, RouteKind, parse_route

DIGEST = "sha256:" + "a" * 64


def test_blob_manifest_and_tag_routes() -> None:
    assert parse_route(f"/v2/library/alpine/blobs/{DIGEST}").kind is RouteKind.BLOB
    assert parse_route(f"/v2/library/alpine/manifests/{DIGEST}").kind is RouteKind.MANIFEST
    tag = parse_route("/v2/my-org/sub.team/app_x/manifests/v1.2-rc_3")
    assert (tag.kind, tag.name, tag.reference) == (
        RouteKind.TAG,
        "my-org/sub.team/app_x",
        "v1.2-rc_3",
    )


@pytest.mark.parametrize(
    "path",
    ["/v2/", "/v2/_catalog", "/v2/a/tags/list?n=10", "/token?scope=x", "/v2/a/blobs/uploads/"],
)
def test_other_paths_pass_through(path: str) -> None:
    assert parse_route(path).kind is RouteKind.OTHER


def test_other_digest_algorithms_are_not_cached() -> None:
    route = parse_route("/v2/a/blobs/sha512:" + "b" * 128)
    assert route.kind is RouteKind.BLOB and not route.cacheable


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("/v2/a/blobs/sha256:xyz", "DIGEST_INVALID"),
        ("/v2/a/blobs/sha256:" + "A" * 64, "DIGEST_INVALID"),
        ("/v2/a/blobs/notadigest", "DIGEST_INVALID"),
        ("/v2/../etc/blobs/" + DIGEST, "NAME_INVALID"),
        ("/v2/a/%2e%2e%2fb/manifests/latest", "NAME_INVALID"),
        ("/v2/a/%2E%2E/manifests/latest", "NAME_INVALID"),
        ("/v2/UPPER/manifests/latest", "NAME_INVALID"),
        ("/v2/a%2fb/manifests/latest", "NAME_INVALID"),
        ("/v2/a/manifests/" + "t" * 129, "TAG_INVALID"),
        ("/v2/a/blobs/sha256:..%2f..%2f", "NAME_INVALID"),
    ],
)
def test_bad_routes_are_refused(path: str, code: str) -> None:
    with pytest.raises(BadRoute) as err:
        parse_route(path)
    assert err.value.code == code


def test_other_routes_still_name_their_repository() -> None:
    assert parse_route("/v2/org/app/tags/list?n=5").name == "org/app"
    assert parse_route("/v2/org/app/blobs/uploads/abc").name == "org/app"
    assert parse_route("/v2/").name == ""

"""Image references for the admin commands: normalised as Docker does, garbage refused."""

from __future__ import annotations

import pytest

from proxy_app.image_ref import ImageRef, ImageRefInvalid, parse_image_ref

DIGEST = "sha256:" + "a" * 64


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("alpine", ImageRef("registry-1.docker.io", "library/alpine", "latest")),
        ("alpine:3", ImageRef("registry-1.docker.io", "library/alpine", "3")),
        ("docker.io/library/alpine:3", ImageRef("registry-1.docker.io", "library/alpine", "3")),
        ("index.docker.io/team/app", ImageRef("registry-1.docker.io", "team/app", "latest")),
        ("reg.example:5000/team/app:1.0", ImageRef("reg.example:5000", "team/app", "1.0")),
        ("registry.example:443/app:1", ImageRef("registry.example", "app", "1")),
        ("localhost/app@" + DIGEST, ImageRef("localhost", "app", None, DIGEST)),
        ("ghcr.io/org/app:1@" + DIGEST, ImageRef("ghcr.io", "org/app", None, DIGEST)),
        ("[::1]:5000/app:1", ImageRef("[::1]:5000", "app", "1")),
    ],
)
def test_references_are_normalised_like_docker(text: str, expected: ImageRef) -> None:
    assert parse_image_ref(text) == expected


def test_shown_with_docker_hub_as_docker_io() -> None:
    assert str(parse_image_ref("alpine")) == "docker.io/library/alpine:latest"
    assert str(parse_image_ref("reg.example:5000/a@" + DIGEST)) == f"reg.example:5000/a@{DIGEST}"


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "needed"),
        ("../x", "not a registry name"),
        ("reg.example/../../etc/passwd", "'..'"),
        ("reg.example/a/./b", "'.'"),
        ("/etc/passwd", "empty"),
        ("reg.example/", "empty"),
        ("%2e%2e/x", "'%'"),
        ("a b", "spaces"),
        ("a\nb", "spaces"),
        ("Alpine", "lower case"),
        ("a@sha256:zz", "sha256:<64"),
        ("a@md5:" + "a" * 32, "sha256:<64"),
        ("a:b:c", "invalid repository name"),
        ("a:" + "t" * 200, "invalid tag"),
        ("reg.example:99999/a", "port"),
        ("x" * 600, "longer than"),
        ("café", "non-ASCII"),
    ],
)
def test_garbage_is_refused_with_a_reason(text: str, why: str) -> None:
    with pytest.raises(ImageRefInvalid) as caught:
        parse_image_ref(text)
    assert why in str(caught.value)

"""How the mirror front door names the upstream: ?ns=, a path prefix, the default; and
the Bearer challenges the cache answers itself for mirror clients."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy_app.mirror import DOCKER_HUB, MirrorRequestInvalid, parse_registry, resolve
from proxy_app.tokens import parse_bearer, read_token


@pytest.mark.parametrize(
    ("raw", "host", "port", "path", "by"),
    [
        (
            "/v2/library/alpine/manifests/3?ns=docker.io",
            DOCKER_HUB,
            443,
            "/v2/library/alpine/manifests/3",
            "ns",
        ),
        (
            "/v2/org/app/blobs/sha256:ab?ns=registry.example.com%3A5000",
            "registry.example.com",
            5000,
            "/v2/org/app/blobs/sha256:ab",
            "ns",
        ),
        (
            "/v2/org/app/tags/list?n=10&ns=ghcr.io&last=b",
            "ghcr.io",
            443,
            "/v2/org/app/tags/list?n=10&last=b",
            "ns",
        ),
        ("/v2/ghcr.io/org/app/manifests/1", "ghcr.io", 443, "/v2/org/app/manifests/1", "prefix"),
        ("/v2/localhost:5000/app/manifests/1", "localhost", 5000, "/v2/app/manifests/1", "prefix"),
        ("/v2/[fd00::5]:5000/app/manifests/1", "fd00::5", 5000, "/v2/app/manifests/1", "prefix"),
        (
            "/v2/index.docker.io/library/x/manifests/1",
            DOCKER_HUB,
            443,
            "/v2/library/x/manifests/1",
            "prefix",
        ),
        (
            "/v2/library/alpine/manifests/3",
            DOCKER_HUB,
            443,
            "/v2/library/alpine/manifests/3",
            "default",
        ),
        ("/v2/_catalog", DOCKER_HUB, 443, "/v2/_catalog", "default"),
        ("/v2/", DOCKER_HUB, 443, "/v2/", "default"),
    ],
)
def test_the_upstream_is_named_by_ns_then_prefix_then_default(
    raw: str, host: str, port: int, path: str, by: str
) -> None:
    target = resolve(raw, "docker.io")
    assert (target.host, target.port, target.path, target.named_by) == (host, port, path, by)


@pytest.mark.parametrize(
    "value",
    [
        "",
        "a" * 300,
        "a..b",
        "user@host",
        "host/x",
        "host:0",
        "host:70000",
        "host:+1",
        "host:08a",
        "-bad.example",
        "bad-.example",
        "ex ample",
        "fd00::5",
        "[fd00::5",
        "h%2f",
    ],
)
def test_bad_registry_names_say_what_is_wrong(value: str) -> None:
    with pytest.raises(MirrorRequestInvalid) as e:
        parse_registry(value)
    assert str(e.value)


@given(st.text(max_size=300))
def test_any_target_resolves_or_is_refused_cleanly(raw: str) -> None:
    try:
        target = resolve("/v2/" + raw, "docker.io")
    except MirrorRequestInvalid:
        return
    assert target.path.startswith("/v2/")
    assert 0 < target.port < 65536
    # The registry's name never goes upstream as a query parameter.
    assert not any(p.startswith("ns=") for p in target.path.partition("?")[2].split("&"))


def test_bearer_challenges() -> None:
    c = parse_bearer(
        'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
        'scope="repository:library/alpine:pull"'
    )
    assert c is not None
    assert str(c.token_url) == (
        "https://auth.docker.io/token?service=registry.docker.io"
        "&scope=repository:library/alpine:pull"
    )
    assert parse_bearer('Basic realm="x"') is None
    assert parse_bearer("Bearer service=x") is None
    assert parse_bearer('Bearer realm="file:///etc/passwd"') is None
    assert parse_bearer('Bearer realm=https://r.example/t,scope="a \\"b\\""') is not None


def test_token_answers() -> None:
    token, renew = read_token(b'{"token": "abc", "expires_in": 300}')
    assert token == "abc" and renew > 0
    assert read_token(b'{"access_token": "xyz"}')[0] == "xyz"
    for bad in (b"not json", b"[]", b"{}", b'{"token": ""}'):
        with pytest.raises(Exception, match="token endpoint"):
            read_token(bad)


def test_mirror_names_config() -> None:
    from proxy_app.config import ConfigError, parse_mirror_names

    assert parse_mirror_names("cache.example.com, 10.0.0.5 [fd00::5]") == (
        "cache.example.com",
        "10.0.0.5",
        "fd00::5",
    )
    assert parse_mirror_names(["Cache.Example.com.", "cache.example.com"]) == ("cache.example.com",)
    for bad in (["bad name"], ["a..b"], [7], "x" * 300):
        with pytest.raises(ConfigError):
            parse_mirror_names(bad)

"""What goes upstream: credentials only over HTTPS, redirects only where the destination
policy allows, and error texts without the secrets a URL can carry."""

from __future__ import annotations

import dataclasses

import pytest
from yarl import URL

from proxy_app.config import Config, Credentials
from proxy_app.destinations import DestinationPolicy, DestinationRefused, host_matches
from proxy_app.upstream import Origin, Upstream, describe

CONFIG = Config(allowed_ports=frozenset({443, 5000}))


def test_describe_cuts_passwords_and_signatures() -> None:
    error = OSError(
        "407, message='Proxy Authentication Required', url='http://puser:S3cret@parent:3128'"
        " while fetching https://cdn.example/blob?X-Amz-Signature=abc123&X-Amz-Credential=k"
    )
    text = describe(error)
    assert "S3cret" not in text and "puser" not in text
    assert "abc123" not in text and "X-Amz-Credential" not in text
    assert "parent:3128" in text and "https://cdn.example/blob?" in text


def test_registry_credentials_go_over_https_only() -> None:
    upstream = Upstream(
        dataclasses.replace(
            CONFIG, auth_registries={"registry.example": Credentials("robot", "pw")}
        )
    )
    secure = upstream.request_headers(Origin("https", "registry.example", 443), {})
    assert secure["Authorization"].startswith("Basic ")
    plain = upstream.request_headers(Origin("http", "registry.example", 80), {})
    assert "Authorization" not in plain


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://127.0.0.1:5000/x", "loopback"),
        ("https://169.254.169.254/latest/meta-data/", "metadata"),
        ("http://[::1]:443/x", "loopback"),
        ("https://cdn.example:8443/x", "port 8443"),
        ("ftp://cdn.example/x", "http or https only"),
    ],
)
def test_redirects_to_refused_destinations(url: str, reason: str) -> None:
    with pytest.raises(DestinationRefused, match=reason):
        DestinationPolicy(CONFIG).check_redirect(URL(url))


def test_redirects_that_may_be_followed() -> None:
    policy = DestinationPolicy(CONFIG)
    for url in ("https://cdn.example/blob?sig=1", "https://203.0.113.9/x", "http://s3:5000/b"):
        policy.check_redirect(URL(url))  # names are checked by the resolver, later


def test_the_parent_proxy_may_be_on_loopback() -> None:
    policy = DestinationPolicy(dataclasses.replace(CONFIG, upstream_proxy="http://localhost:3129"))
    assert policy.refusal("localhost", 3129, ["127.0.0.1"]) is None
    assert policy.refusal("localhost", 3130, ["127.0.0.1"]) is not None
    assert DestinationPolicy(CONFIG).refusal("localhost", 3129, ["127.0.0.1"]) is not None


def test_ipv6_hosts_match_bracketed_globs() -> None:
    globs = ("[fd00::5]:5000", "[fd00::6]")
    assert host_matches(globs, "fd00::5", 5000)
    assert not host_matches(globs, "fd00::5", 443)
    assert host_matches(globs, "fd00::6", 443)
    # a bracket is not a character class: one-character hosts do not match
    assert not host_matches(globs, "d", 443) and not host_matches(globs, "5", 443)


def test_realm_credentials_go_only_to_the_registries_they_are_for() -> None:
    from proxy_app.config import parse_auth_registries
    from proxy_app.tokens import Challenge

    def credential(auth: object, registry: str, realm: str = "https://auth.rc.test/token") -> str:
        config = dataclasses.replace(CONFIG, auth_registries=parse_auth_registries(auth))
        upstream = Upstream(config)
        return upstream._realm_credential(
            Origin("https", registry, 443), Challenge(realm, None, None)
        )

    seed_form = "auth.rc.test:bot:s3cret"
    assert credential(seed_form, "tokenreg.rc.test").startswith("Basic ")
    assert credential(seed_form, "bad.other.example") == ""  # another domain: none
    assert credential(seed_form, "tokenreg.rc.test", "http://auth.rc.test/token") == ""
    bound = [
        {
            "host": "auth.rc.test",
            "username": "bot",
            "password": "s3cret",
            "registries": ["mirror.other.example"],
        }
    ]
    assert credential(bound, "mirror.other.example").startswith("Basic ")
    assert credential(bound, "tokenreg.rc.test") == ""  # listed registries only
    with pytest.raises(Exception, match="registries"):
        parse_auth_registries(
            [{"host": "a.example", "username": "u", "password": "p", "registries": "not-a-list"}]
        )

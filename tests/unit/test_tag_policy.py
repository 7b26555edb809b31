"""tag_policy.py: which rule a tag follows, and tag_rules as the config file gives them."""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy_app.config import ConfigError, load_config
from proxy_app.tag_policy import TagPolicy, TagRule

RULES = (
    TagRule("docker.io/library/*:latest", 60),
    TagRule("*:v*.*.*", 86400),
    TagRule("registry.internal/*", 0),
)


@pytest.mark.parametrize(
    ("registry", "repository", "tag", "ttl"),
    [
        # Docker Hub under each of its names is docker.io in a pattern
        ("registry-1.docker.io", "library/alpine", "latest", 60),
        ("index.docker.io", "library/alpine", "latest", 60),
        ("REGISTRY-1.DOCKER.IO", "library/alpine", "latest", 60),
        # not an official image, not latest: the default
        ("registry-1.docker.io", "bitnami/redis", "latest", 300),
        ("registry-1.docker.io", "library/alpine", "3.20", 300),
        # semver-looking tags anywhere, first match wins over registry.internal/*
        ("ghcr.io", "org/tool", "v1.2.3", 86400),
        ("registry.internal", "team/app", "v2.0.1", 86400),
        ("registry.internal", "team/app", "main", 0),
        # `*` crosses `/`: nested repositories
        ("registry.internal", "a/b/c", "x", 0),
        # a port is part of the registry: registry.internal/* does not cover :5000
        ("registry.internal:5000", "team/app", "main", 300),
    ],
)
def test_first_matching_rule_decides(registry: str, repository: str, tag: str, ttl: float) -> None:
    assert TagPolicy(RULES, 300).ttl_for(registry, repository, tag) == ttl


def test_describe_names_the_rule_or_tag_ttl() -> None:
    policy = TagPolicy(RULES, 300)
    assert policy.describe("registry.internal", "app", "main") == "registry.internal/* (0s)"
    assert policy.describe("ghcr.io", "o/t", "v1.0.0") == "*:v*.*.* (1d)"
    assert policy.describe("ghcr.io", "o/t", "main") == "tag_ttl (5m)"


def load(tmp_path: Path, text: str, environ: dict[str, str] | None = None):
    path = tmp_path / "config.yml"
    path.write_text(text)
    return load_config(path, environ=environ or {})


def test_rules_from_the_file(tmp_path: Path) -> None:
    cfg = load(
        tmp_path,
        "tag_rules:\n"
        '  - {match: "docker.io/library/*:latest", ttl: 1m}\n'
        '  - {match: "Registry-1.Docker.io/team/*", ttl: 2h}\n'
        '  - {match: "registry.internal/*", ttl: 0s}\n',
    )
    assert cfg.tag_rules == (
        TagRule("docker.io/library/*:latest", 60),
        TagRule("docker.io/team/*", 7200),  # the registry part lower-cased, Hub as docker.io
        TagRule("registry.internal/*", 0),
    )


def test_rules_from_the_environment_are_yaml(tmp_path: Path) -> None:
    cfg = load(tmp_path, "", {"REGISTRY_CACHE_TAG_RULES": '[{match: "*:v*.*.*", ttl: 1d}]'})
    assert cfg.tag_rules == (TagRule("*:v*.*.*", 86400),)


@pytest.mark.parametrize(
    ("rules", "message"),
    [
        ('{match: "x/*", ttl: 1m}', "expected a list of rules"),
        ('[{match: "x/*"}]', "rule 1 must have exactly match and ttl"),
        ('[{match: "x/*", ttl: 1m, cache: no}]', "rule 1 must have exactly match and ttl"),
        ('[{match: "a/*", ttl: 1m}, {match: "", ttl: 1m}]', "rule 2: match must be a glob"),
        ('[{match: "a b/*", ttl: 1m}]', "rule 1: match must be a glob without spaces"),
        ('[{match: "x/app@sha256:*", ttl: 1m}]', "names a digest"),
        ('[{match: "x/*", ttl: -1}]', "rule 1 (x/*): ttl a duration cannot be negative"),
        ('[{match: "x/*", ttl: soon}]', "is not a duration"),
        ("[x/*]", "rule 1 must have exactly match and ttl"),
    ],
)
def test_bad_rules_say_which_and_what_to_write(tmp_path: Path, rules: str, message: str) -> None:
    with pytest.raises(ConfigError, match="tag_rules") as info:
        load(tmp_path, f"tag_rules: {rules}\n")
    assert message in str(info.value)

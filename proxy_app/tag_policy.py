"""The tag policy: how long a tag's cached answer is trusted before upstream is asked again.

`tag_ttl` is one answer for every tag, and no single value suits them all: a `latest`
that moves every hour wants a minute, a release tag `v1.2.3` that never moves wants a
day (each revalidation is a request a rate-limited registry counts), and an internal
registry whose tags are rebuilt in place wants every pull checked. `tag_rules` says so
per pattern; the first rule that matches a tag decides, `tag_ttl` decides the rest.

A pattern is a glob over the reference as people write it, `registry/repository:tag`:
- `docker.io/library/*:latest`: the `latest` tag of Docker Hub's official images;
- `*:v*.*.*`: any tag that looks like a semantic version, on any registry;
- `registry.internal/*`: every tag of that registry (no `:tag` part means any tag).
Docker Hub is `docker.io` in a pattern, however the client named it
(`registry-1.docker.io`, `index.docker.io`). `*` crosses `/`, so `team/*` covers nested
repositories too. Digest references are immutable and follow no rule.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

from .registry_names import display_name


@dataclass(frozen=True)
class TagRule:
    match: str
    ttl: float  # seconds

    @property
    def pattern(self) -> str:
        """The glob matched against `registry/repository:tag`: a pattern without a tag
        part (no `:` after its last `/`) covers every tag."""
        has_tag = self.match.rfind(":") > self.match.rfind("/")
        return self.match if has_tag else f"{self.match}:*"


def reference(registry: str, repository: str, tag: str) -> str:
    """`registry/repository:tag` as a pattern sees it (Docker Hub as docker.io)."""
    return f"{display_name(registry)}/{repository}:{tag}"


class TagPolicy:
    def __init__(self, rules: Sequence[TagRule], default_ttl: float) -> None:
        self.rules = tuple(rules)
        self.default_ttl = default_ttl

    def rule_for(self, registry: str, repository: str, tag: str) -> TagRule | None:
        """The first rule whose pattern matches the tag, or None (then `tag_ttl`)."""
        ref = reference(registry, repository, tag)
        return next((r for r in self.rules if fnmatchcase(ref, r.pattern)), None)

    def ttl_for(self, registry: str, repository: str, tag: str) -> float:
        rule = self.rule_for(registry, repository, tag)
        return self.default_ttl if rule is None else rule.ttl

    def describe(self, registry: str, repository: str, tag: str) -> str:
        """What an operator reads in `registry-cache ls`: the rule, or tag_ttl."""
        rule = self.rule_for(registry, repository, tag)
        if rule is None:
            return f"tag_ttl ({format_seconds(self.default_ttl)})"
        return f"{rule.match} ({format_seconds(rule.ttl)})"


def format_seconds(seconds: float) -> str:
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"

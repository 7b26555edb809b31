"""Tag rules (issue 19, must show 3): the first rule that matches a tag sets how long its
answer is trusted; a `ttl: 0s` registry is revalidated on every pull, a `1d` rule is not,
whatever `tag_ttl` says."""

from __future__ import annotations

import pytest
from support.client import get_tag
from support.registry import Registry

pytestmark = pytest.mark.integration


def pull_tag(proxy, reg: Registry, repo: str, tag: str) -> tuple[str, str]:
    res = get_tag(proxy, reg, repo, tag)
    assert res.status == 200, res.text()
    return res.cache, res.headers.get("docker-content-digest", "")


def upstream_asked(reg: Registry, repo: str, tag: str) -> int:
    return sum(1 for r in reg.requests() if r.uri.startswith(f"/v2/{repo}/manifests/{tag}"))


def test_first_matching_rule_sets_the_ttl(make_registry, image_factory, proxy_factory):
    live = make_registry()  # rebuilt in place: every pull checked
    releases = make_registry()  # release tags never move; `edge` does
    image_factory(f"{live.netloc}/app/live:latest", [1000])
    image_factory(f"{releases.netloc}/app/rel:v1.2.3", [1000])
    image_factory(f"{releases.netloc}/app/rel:edge", [1000])
    proxy = proxy_factory(
        tag_ttl="1h",
        tag_rules=[
            {"match": f"{live.netloc}/*", "ttl": "0s"},
            {"match": "*:v*.*.*", "ttl": "1d"},
            # after the 1d rule: v1.2.3 of this registry follows that one, edge this one
            {"match": f"{releases.netloc}/*", "ttl": "0s"},
        ],
    )
    # what the pushes asked of the registries is not the cache's doing
    before = {
        name: upstream_asked(reg, repo, tag)
        for name, (reg, repo, tag) in {
            "live": (live, "app/live", "latest"),
            "v1.2.3": (releases, "app/rel", "v1.2.3"),
            "edge": (releases, "app/rel", "edge"),
        }.items()
    }
    pulls = 4
    for _ in range(pulls):
        pull_tag(proxy, live, "app/live", "latest")
        pull_tag(proxy, releases, "app/rel", "v1.2.3")
        pull_tag(proxy, releases, "app/rel", "edge")

    # 0s: the first pull fetched it, each later one asked upstream again (a HEAD)
    assert upstream_asked(live, "app/live", "latest") - before["live"] == pulls
    assert upstream_asked(releases, "app/rel", "edge") - before["edge"] == pulls
    # 1d: fetched once, then trusted; tag_ttl (1h) would have said the same, so the
    # 0s rule of its registry, listed after it, is what the first match overrides
    assert upstream_asked(releases, "app/rel", "v1.2.3") - before["v1.2.3"] == 1

    # a tag moved upstream: the 0s registry's next pull has it at once
    moved = image_factory(f"{live.netloc}/app/live:latest", [2000])
    cache, digest = pull_tag(proxy, live, "app/live", "latest")
    assert digest == moved.manifest_digest
    assert cache in ("MISS", "HIT")

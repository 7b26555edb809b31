"""The Grafana dashboard asks only for metrics the app exports."""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from proxy_app.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "dashboards" / "registry-cache.json"
ROLE_COPY = ROOT / "roles" / "registry_cache" / "files" / "grafana" / "registry-cache.json"
METRIC = re.compile(r"\bregistry_cache_[a-z0-9_]+\b")
SUFFIXES = ("_bucket", "_count", "_sum", "_total")


def exported_families() -> set[str]:
    """Family names in the app's /metrics once every kind of event has happened (the
    Docker Hub gauges appear only once Docker Hub has sent its headers)."""
    m = Metrics()
    m.request("registry-1.docker.io", "blob", "hit", "connect", "library/alpine")
    m.sent("ghcr.io", "upstream", 10, "org/app")
    m.sent("ghcr.io", "cache", 10, "org/app")
    m.upstream_error("ghcr.io", "boom", "org/app")
    m.upstream_answer("ghcr.io", 200)
    m.token("ghcr.io", "fetched")
    m.fetched("ghcr.io", 1.5)
    m.dockerhub_answer(
        "registry-1.docker.io", {"ratelimit-remaining": "76;w=21600", "ratelimit-limit": "100"}
    )
    m.evictions.inc()
    m.store_errors.inc()
    return {f.name for f in text_string_to_metric_families(m.render().decode())}


def test_dashboard_is_one_file_inside_the_role() -> None:
    assert DASHBOARD.is_symlink() and DASHBOARD.resolve() == ROLE_COPY.resolve()
    assert not ROLE_COPY.is_symlink()


def test_every_metric_of_the_dashboard_is_exported() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    families = exported_families()
    used: set[str] = set()
    for panel in dashboard["panels"]:
        assert panel["targets"], f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            for name in METRIC.findall(target["expr"]):
                base = name
                for suffix in SUFFIXES:
                    base = base.removesuffix(suffix)
                assert base in families, f"{panel['title']!r} asks for {name}, not exported"
                used.add(base)
    # the panels are all there
    for name in (
        "registry_cache_requests",
        "registry_cache_bytes",
        "registry_cache_bytes_saved",
        "registry_cache_upstream_errors",
        "registry_cache_upstream_responses",
        "registry_cache_fetch_duration_seconds",
        "registry_cache_size_bytes",
        "registry_cache_max_size_bytes",
        "registry_cache_inflight_fetches",
        "registry_cache_dockerhub_ratelimit_remaining",
    ):
        assert name in used, f"no panel shows {name}"


def test_dashboard_variables() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["DS_PROMETHEUS"]["type"] == "datasource"
    assert variables["registry"]["definition"] == (
        "label_values(registry_cache_requests_total, registry)"
    )
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))

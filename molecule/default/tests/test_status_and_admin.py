"""The operator's tools on the converged cache host, after test_pulls.py's pulls: the
admin commands as root and as someone else, the status page's JSON, the pin and the tag
rule the role configured, the Grafana dashboard it installed."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from conftest import REGISTRY, ok
from testinfra.host import Host

CLI = "/opt/registry-cache/venv/bin/registry-cache"
CONFIG = "/etc/registry-cache/config.yml"
PINNED = "public/app"  # registry_cache_pinned in molecule.yml
DASHBOARD = "/var/lib/grafana/dashboards/registry-cache.json"
DASHBOARD_SOURCE = (
    Path(__file__).parents[3] / "roles/registry_cache/files/grafana/registry-cache.json"
)


def test_ls_shows_the_pulled_images_the_pin_and_the_rule(cache: Host) -> None:
    images = json.loads(ok(cache, "%s ls --json --config %s", CLI, CONFIG))["images"]
    pinned = [i for i in images if i["repository"] == PINNED and "1" in i["tags"]]
    assert pinned, images
    image = pinned[0]
    assert image["registry"] == REGISTRY
    assert image["pinned"] is True
    assert image["pulls"] >= 2  # client1, then client2
    assert image["missing_blobs"] == 0
    assert image["rules"]["1"] == f"{REGISTRY}/public/*:1 (1d)"


def test_admin_commands_refused_to_other_users(cache: Host) -> None:
    run = cache.run(
        "setpriv --reuid=nobody --regid=nogroup --clear-groups %s ls --config %s", CLI, CONFIG
    )
    assert run.rc != 0
    assert "permission denied" in run.stderr, run.stderr


def test_status_page_json_counts_the_pulls(cache: Host) -> None:
    data = json.loads(ok(cache, "curl -fsS -H 'Accept: application/json' http://127.0.0.1:3128/"))
    row = data["registries"][REGISTRY]
    assert row["requests"] > 0
    assert row["hits"] > 0  # client2's pull came from the cache
    html = ok(cache, "curl -fsS http://127.0.0.1:3128/")
    assert REGISTRY in html and "<svg" in html


def test_grafana_dashboard_installed_as_shipped(cache: Host) -> None:
    installed = cache.file(DASHBOARD)
    assert installed.is_file and installed.mode == 0o644
    assert installed.sha256sum == hashlib.sha256(DASHBOARD_SOURCE.read_bytes()).hexdigest()

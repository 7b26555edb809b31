"""The cache host, as its operator would check it."""

from __future__ import annotations

import json
import re

from conftest import CACHE_DIR, CACHE_PORT, CACHE_USER, CLIENT_CA, ok
from testinfra.host import Host


def test_service_active_and_enabled(cache: Host) -> None:
    service = cache.service("registry-cache")
    assert service.is_running
    assert service.is_enabled
    assert ok(cache, "systemctl is-active registry-cache").strip() == "active"


def test_listens_on_3128(cache: Host) -> None:
    assert cache.socket(f"tcp://0.0.0.0:{CACHE_PORT}").is_listening


def test_ca_key_private_to_the_service_user(cache: Host) -> None:
    key = cache.file(f"{CACHE_DIR}/ca/ca.key")
    assert key.is_file
    assert key.mode == 0o600
    assert key.user == CACHE_USER
    # and the service really runs as that user
    assert ok(cache, "systemctl show registry-cache -p User --value").strip() == CACHE_USER


def test_config_not_world_readable(cache: Host) -> None:
    config = cache.file("/etc/registry-cache/config.yml")
    assert config.mode == 0o640
    assert config.user == "root"
    assert config.group == CACHE_USER
    # it holds the private repository's password: nobody else may read it
    assert cache.run("runuser -u nobody -- cat /etc/registry-cache/config.yml").rc != 0


def test_healthz(cache: Host) -> None:
    res = cache.run(
        "curl -sS -o /dev/stderr -w '%%{http_code}' http://127.0.0.1:%s/healthz", str(CACHE_PORT)
    )
    assert res.stdout == "200", res.stderr
    body = json.loads(res.stderr)
    assert body["status"] == "ok"


def test_served_ca_is_the_ca_each_client_installed(cache: Host, client: Host) -> None:
    served = ok(cache, "curl -fsS http://127.0.0.1:%s/ca.crt", str(CACHE_PORT))
    assert "BEGIN CERTIFICATE" in served
    assert served.strip() == cache.file(f"{CACHE_DIR}/ca/ca.crt").content_string.strip()
    assert client.file(CLIENT_CA).content_string.strip() == served.strip()


def test_unit_is_hardened(cache: Host) -> None:
    """systemd's own exposure score for the service: "OK" or better (issue 6)."""
    report = ok(cache, "systemd-analyze security --no-pager registry-cache.service")
    match = re.search(
        r"Overall exposure level for registry-cache\.service:\s*([\d.]+)\s+(\w+)", report
    )
    assert match, report[-500:]
    assert match.group(2) in ("SAFE", "OK"), f"exposure {match.group(1)} {match.group(2)}"

"""Issue 19: the status page (`GET /`) after real pulls from two registries, rendered by
headless Chromium, its numbers compared with /metrics and with the proxy's access log;
its JSON form; who may read it; and a hostile request that must stay text."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.error
import urllib.request
from collections import Counter
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from support.client import basic, fetch
from support.images import pulled_blobs
from support.proxy import REPO_ROOT, Proxy
from support.registry import Registry, wait_until

pytestmark = pytest.mark.integration

ARTIFACTS = REPO_ROOT / "test-artifacts"
CACHEABLE = {"blob", "manifest", "tag"}
PLURAL = {"hit": "hits", "miss": "misses", "stale": "stales"}
HOSTILE = "/<script>alert('x')</script><img/src=x/onerror=alert(1)>"


# --- reading the page, the metrics and the access log ---------------------------------


class StatusDom(HTMLParser):
    """The numbers of a rendered status page: per row (`data-window`, `data-registry`,
    `data-repository`) its cells' data-value by data-field; the script elements; the text."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: dict[tuple[str, str], dict[str, str]] = {}
        self.fields: dict[str, str] = {}  # cells outside such rows (cache, dockerhub)
        self.scripts = 0
        self.text: list[str] = []
        self._row: tuple[str, str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "script":
            self.scripts += 1
        if tag == "tr":
            self._row = None
            for key in ("data-window", "data-registry", "data-repository"):
                if key in a:
                    self._row = (key.removeprefix("data-"), a[key])
                    self.rows[self._row] = {}
        if "data-field" in a and "data-value" in a:
            target = self.rows[self._row] if self._row else self.fields
            target[a["data-field"]] = a["data-value"]

    def handle_endtag(self, tag: str) -> None:
        if tag == "tr":
            self._row = None

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.fail(
            "chromium is not installed: the status page test renders the page in headless "
            "Chromium (scripts/install-deps.sh installs Debian's chromium)"
        )
    return path


def browse(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            chromium(),
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-proxy-server",
            "--no-first-run",
            f"--user-data-dir={ARTIFACTS / '.chromium-profile'}",
            *args,
            url,
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def metric_samples(proxy: Proxy) -> list[tuple[str, dict[str, str], float]]:
    return [
        (s.name, s.labels, s.value)
        for family in text_string_to_metric_families(proxy.metrics())
        for s in family.samples
    ]


def per_registry(samples: list[tuple[str, dict[str, str], float]]) -> dict[str, Counter[str]]:
    """requests, hits, misses, stales, bytes and errors per registry label, from /metrics."""
    out: dict[str, Counter[str]] = {}
    for name, labels, value in samples:
        reg = labels.get("registry")
        if reg is None:
            continue
        c = out.setdefault(reg, Counter())
        if name == "registry_cache_requests_total":
            c["requests"] += int(value)
            if labels["kind"] in CACHEABLE and labels["result"] in ("hit", "miss", "stale"):
                c[PLURAL[labels["result"]]] += int(value)
        elif name == "registry_cache_bytes_total":
            c["bytes_" + labels["source"]] += int(value)
        elif name == "registry_cache_upstream_errors_total":
            c["errors"] += int(value)
    return out


def access_log(proxy: Proxy) -> list[dict[str, Any]]:
    lines = []
    for line in proxy.output().splitlines():
        start = line.find("{")
        if start < 0:
            continue
        try:
            record = json.loads(line[start:])
        except ValueError:
            continue
        if isinstance(record, dict) and "result" in record and "door" in record:
            lines.append(record)
    return lines


def log_per_registry(records: list[dict[str, Any]]) -> dict[str, Counter[str]]:
    out: dict[str, Counter[str]] = {}
    for r in records:
        c = out.setdefault(r["host"], Counter())
        c["requests"] += 1
        c["bytes"] += r["bytes"]
        if r["kind"] in CACHEABLE and r["result"] in ("HIT", "MISS", "STALE"):
            c[PLURAL[r["result"].lower()]] += 1
    return out


def ratio(c: Counter[str]) -> float:
    served = c["hits"] + c["misses"] + c["stales"]
    return round((c["hits"] + c["stales"]) / served, 4)


def get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(request, timeout=10) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


# --- the tests ------------------------------------------------------------------------


def test_status_page_matches_metrics_and_access_log(
    registry: Registry, make_registry, image_factory, proxy_factory, tmp_path: Path
):
    second = make_registry("scratch.rc.test")
    dead = make_registry("cdn.rc.test")
    dead.stop()  # its requests fail: upstream errors, one with a hostile path
    image_a = image_factory(f"{registry.netloc}/obs/alpha:1", [120_000, 30_000])
    image_b = image_factory(f"{second.netloc}/obs/beta:1", [80_000])
    proxy = proxy_factory(log_format="json")

    for i in range(2):  # a miss, then a hit, of every blob
        assert set(image_a.blob_digests) <= pulled_blobs(
            proxy, f"{registry.netloc}/obs/alpha:1", tmp_path / f"a{i}"
        )
    for i in range(3):
        assert set(image_b.blob_digests) <= pulled_blobs(
            proxy, f"{second.netloc}/obs/beta:1", tmp_path / f"b{i}"
        )
    hostile = fetch(proxy.port, str(proxy.ca_path), dead.hostname, dead.port, "GET", HOSTILE)
    assert hostile.status == 502, hostile.text()

    def settled() -> bool:
        logged = sum(r["requests"] for r in log_per_registry(access_log(proxy)).values())
        counted = sum(c["requests"] for c in per_registry(metric_samples(proxy)).values())
        return logged == counted and logged > 0

    wait_until(settled, timeout=10)
    samples = metric_samples(proxy)
    metrics = per_registry(samples)
    logged = log_per_registry(access_log(proxy))
    names = {registry.netloc, second.netloc, dead.netloc}
    assert set(metrics) == names, f"registry labels in /metrics: {sorted(metrics)}"
    assert set(logged) == names, f"hosts in the access log: {sorted(logged)}"
    for name in names:
        m, log = metrics[name], logged[name]
        for key in ("requests", "hits", "misses", "stales"):
            assert m[key] == log[key], f"{name} {key}: metrics {m[key]}, access log {log[key]}"
        assert m["bytes_cache"] + m["bytes_upstream"] == log["bytes"], name
    assert metrics[registry.netloc]["hits"] > 0 and metrics[registry.netloc]["misses"] > 0
    assert metrics[second.netloc]["hits"] > metrics[second.netloc]["misses"]
    assert metrics[dead.netloc]["errors"] >= 1

    # JSON: the same numbers
    status, headers, body = get(f"{proxy.url}/", {"Accept": "application/json"})
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    data = json.loads(body)
    for name in names:
        row, m = data["registries"][name], metrics[name]
        assert row["requests"] == m["requests"], (name, row, m)
        assert row["errors"] == m["errors"], (name, row, m)
        assert row["bytes_cache"] == m["bytes_cache"], (name, row, m)
        assert row["bytes_upstream"] == m["bytes_upstream"], (name, row, m)
    saved = sum(v for n, _, v in samples if n == "registry_cache_bytes_saved_total")
    assert data["last_hour"]["bytes_saved"] == saved > 0
    assert data["cache"]["max_size"] > data["cache"]["bytes"] > 0
    assert {r["registry"] + "/" + r["name"] for r in data["top_repositories"]} >= {
        f"{registry.netloc}/obs/alpha",
        f"{second.netloc}/obs/beta",
    }

    # The page as a browser renders it
    ARTIFACTS.mkdir(exist_ok=True)
    rendered = browse(f"{proxy.url}/", "--dump-dom")
    assert rendered.returncode == 0, rendered.stderr[-2000:]
    dom = StatusDom()
    dom.feed(rendered.stdout)
    assert dom.rows, f"no data rows in the rendered page:\n{rendered.stdout[:2000]}"
    for name in names:
        row, m = dom.rows[("registry", name)], metrics[name]
        assert int(row["requests"]) == m["requests"], (name, row, m)
        assert int(row["errors"]) == m["errors"], (name, row, m)
        assert int(row["bytes_cache"]) == m["bytes_cache"], (name, row, m)
        assert int(row["bytes_upstream"]) == m["bytes_upstream"], (name, row, m)
        if m["hits"] + m["misses"] + m["stales"]:
            assert float(row["hit_ratio"]) == pytest.approx(ratio(m)), (name, row, m)
            assert float(row["hit_ratio"]) == pytest.approx(ratio(logged[name])), name
    everything: Counter[str] = sum(metrics.values(), Counter())
    hour = dom.rows[("window", "hour")]
    assert float(hour["hit_ratio"]) == pytest.approx(ratio(everything))
    assert int(hour["requests"]) == everything["requests"]  # the page's own GETs are not
    assert int(hour["bytes_cache"]) == everything["bytes_cache"]
    assert int(hour["bytes_upstream"]) == everything["bytes_upstream"]
    assert int(hour["bytes_saved"]) == saved
    assert int(hour["errors"]) == everything["errors"]
    assert int(dom.fields["cache_bytes"]) == data["cache"]["bytes"]

    # The hostile path is on the page as text, and no script came with it
    assert dom.scripts == 0, "the status page has a <script> element"
    assert any("<script>alert('x')</script>" in t for t in dom.text), "hostile path not shown"
    assert "<img/src=x" not in rendered.stdout and dom.text

    shot = ARTIFACTS / "status-page.png"
    shot.unlink(missing_ok=True)
    taken = browse(f"{proxy.url}/", f"--screenshot={shot}", "--window-size=1280,1600")
    assert taken.returncode == 0 and shot.exists(), taken.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_status_page_json_and_html_by_accept(proxy_factory):
    proxy = proxy_factory()
    status, headers, body = get(f"{proxy.url}/", {"Accept": "application/json"})
    assert status == 200
    data = json.loads(body)
    assert {"last_hour", "last_day", "registries", "inflight", "cache", "dockerhub"} <= set(data)
    assert len(data["history_hour"]) == 60 and len(data["history_day"]) == 24
    status, headers, body = get(f"{proxy.url}/", {"Accept": "text/html,*/*;q=0.8"})
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert b'http-equiv="refresh"' in body and b"<svg" in body
    assert b"<script" not in body and b"http://" not in body.replace(b"/metrics", b"")


def test_status_page_refused_outside_allowed_clients(proxy_factory):
    proxy = proxy_factory(allowed_clients=["10.99.0.0/16"])
    status, _, body = get(f"{proxy.url}/")
    assert status == 403
    assert b"not in this cache's allowed_clients" in body
    assert get(f"{proxy.url}/healthz")[0] == 200  # the cache host's own health check


def test_status_page_for_admin_users_only(proxy_factory):
    from proxy_app.proxy_auth import hash_password

    proxy = proxy_factory(
        users=[
            {"name": "boss", "password_hash": hash_password("b0ss-pw"), "admin": True},
            {"name": "puller", "password_hash": hash_password("pull-pw")},
        ]
    )
    status, headers, body = get(f"{proxy.url}/")
    assert status == 401
    assert headers["WWW-Authenticate"] == 'Basic realm="registry-cache"'
    assert b"admin" in body
    status, _, body = get(f"{proxy.url}/", {"Authorization": basic("boss", "wrong")})
    assert status == 401
    status, _, body = get(f"{proxy.url}/", {"Authorization": basic("puller", "pull-pw")})
    assert status == 403
    assert b"user puller may not read the status page" in body
    status, _, body = get(f"{proxy.url}/", {"Authorization": basic("boss", "b0ss-pw")})
    assert status == 200 and b"registry-cache" in body


def test_status_page_hides_repository_names_under_verify_client_access(
    registry: Registry, image_factory, proxy_factory, tmp_path: Path
):
    """With verify_client_access a client reads only what upstream lets it read: the page
    must not tell it which repositories other clients pull. Counts stay."""
    image = image_factory(f"{registry.netloc}/secret/project-x:1", [20_000])
    proxy = proxy_factory(verify_client_access=True)
    assert set(image.blob_digests) <= pulled_blobs(
        proxy, f"{registry.netloc}/secret/project-x:1", tmp_path / "pull"
    )
    status, _, body = get(f"{proxy.url}/", {"Accept": "application/json"})
    data = json.loads(body)
    assert status == 200 and data["repositories_hidden"] is True
    assert data["top_repositories"] == []
    assert data["registries"][registry.netloc]["requests"] > 0
    status, _, page = get(f"{proxy.url}/")
    assert status == 200
    assert b"project-x" not in page and b"project-x" not in body
    assert b'id="repositories-hidden"' in page

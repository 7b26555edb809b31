"""Must show 9: bad input gets a clear 4xx or a start-up error, never a traceback,
never a file outside cache_dir."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from pathlib import Path

import pytest
import yaml
from support.client import fetch, raw_exchange
from support.net import free_port
from support.proxy import Proxy, proxy_python
from support.registry import Registry

pytestmark = pytest.mark.integration

EVIL = "rc-evil-9f3b"


def snapshot(root: Path, skip: Path) -> set[str]:
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        if Path(dirpath) == skip:
            dirnames.clear()
            continue
        for name in filenames + dirnames:
            out.add(os.path.join(dirpath, name))
    return out


@pytest.fixture
def deep_proxy(proxy_factory, tmp_path: Path) -> Proxy:
    """A proxy whose cache_dir sits three levels down, so `../` escapes stay visible."""
    cache = tmp_path / "a" / "b" / "c" / "cache"
    return proxy_factory(cache_dir=str(cache))


BAD_CONNECT = [
    b"CONNECT foo HTTP/1.1\r\nHost: foo\r\n\r\n",
    b"CONNECT :443 HTTP/1.1\r\nHost: :443\r\n\r\n",
    b"CONNECT a b\r\n\r\n",
    b"CONNECT registry.rc.test:notaport HTTP/1.1\r\n\r\n",
    b"CONNECT registry.rc.test:99999 HTTP/1.1\r\n\r\n",
    b"CONNECT [::1 HTTP/1.1\r\n\r\n",
    b"CONNECT /etc/passwd HTTP/1.1\r\n\r\n",
]


@pytest.mark.parametrize("raw", BAD_CONNECT, ids=lambda b: b.split(b"\r\n")[0].decode())
def test_malformed_connect(raw: bytes, deep_proxy: Proxy):
    resp = raw_exchange(deep_proxy.port, raw)
    assert 400 <= resp.status < 500, f"{raw!r} -> {resp.status} {resp.error} {resp.text()!r}"
    assert "Traceback" not in resp.text()
    assert "Traceback" not in deep_proxy.stderr()


def test_connect_to_port_not_allowed(deep_proxy: Proxy):
    resp = raw_exchange(deep_proxy.port, b"CONNECT registry.rc.test:22 HTTP/1.1\r\n\r\n")
    assert resp.status == 403, (resp.status, resp.text())


def bad_paths(repo: str, good: str) -> list[str]:
    hexd = good.split(":")[1]
    return [
        f"/v2/{repo}/blobs/sha256:xyz",
        f"/v2/{repo}/blobs/sha256:{hexd[:-1]}",
        f"/v2/{repo}/blobs/sha256:{hexd}0",
        f"/v2/{repo}/blobs/md5:d41d8cd98f00b204e9800998ecf8427e",
        f"/v2/{repo}/blobs/sha256:../../../../../{EVIL}",
        f"/v2/{repo}/blobs/sha256:..%2f..%2f..%2f..%2f{EVIL}",
        f"/v2/{repo}/blobs/sha256%3a%2e%2e%2f%2e%2e%2f{EVIL}",
        f"/v2/{repo}/blobs/sha256:%2e%2e%2f%2e%2e%2f%2e%2e%2f{EVIL}",
        f"/v2/../../../{EVIL}/blobs/{good}",
        f"/v2/{repo}/../../../../{EVIL}/blobs/{good}",
        f"/v2/%2e%2e%2f%2e%2e%2f%2e%2e%2f{EVIL}/blobs/{good}",
        f"/v2/{repo}%2f..%2f..%2f{EVIL}/blobs/{good}",
        f"/v2/{repo}/manifests/sha256:xyz",
        f"/v2/{repo}/manifests/..%2f..%2f..%2f{EVIL}",
        f"/v2/{repo}/manifests/sha256:..%2f..%2f{EVIL}",
        f"/v2/{repo}/manifests/../../../../{EVIL}",
        f"/v2/UPPER/Case/blobs/{good}",
    ]


def test_invalid_digests_and_traversal(registry: Registry, deep_proxy: Proxy, tmp_path: Path):
    repo = "pub/badinput"
    data = os.urandom(5000)
    good = "sha256:" + hashlib.sha256(data).hexdigest()
    registry.upload_blob(repo, data, good)
    before = snapshot(tmp_path, deep_proxy.cache_dir)
    args = (deep_proxy.port, str(deep_proxy.ca_path), registry.hostname, registry.port)
    problems = []
    for path in bad_paths(repo, good):
        for method in ("GET", "HEAD"):
            resp = fetch(*args, method, path)
            text = resp.text()
            if not 400 <= resp.status < 500:
                problems.append(f"{method} {path}: {resp.status} {text[:200]!r}")
            elif "Traceback" in text:
                problems.append(f"{method} {path}: traceback in body")
            elif method == "GET" and not text.strip():
                problems.append(f"{method} {path}: {resp.status} with an empty body")
            elif method == "GET" and "json" in resp.headers.get("content-type", ""):
                doc = json.loads(resp.body)
                if not doc.get("errors") or not doc["errors"][0].get("message"):
                    problems.append(f"{method} {path}: JSON without errors[].message: {doc}")
    assert not problems, "\n".join(problems)
    # the good one still works: the proxy is fine after all that
    ok = fetch(*args, "GET", f"/v2/{repo}/blobs/{good}")
    assert ok.status == 200 and ok.body == data
    after = snapshot(tmp_path, deep_proxy.cache_dir)
    new = after - before  # the snapshot skips cache_dir itself
    assert not new, f"files created outside cache_dir: {sorted(new)}"
    for root in (Path("/tmp"), Path("/"), Path("/etc"), registry.storage):
        assert not list(root.glob(f"{EVIL}*")), root
    assert "Traceback" not in deep_proxy.stderr()


def run_serve(tmp_path: Path, config: dict, env: dict[str, str] | None = None):
    cfg = tmp_path / "config.yml"
    cfg.write_text(yaml.safe_dump(config))
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("REGISTRY_CACHE_")}
    full_env.update(env or {})
    return subprocess.run(
        [proxy_python(), "-m", "proxy_app", "serve", "--config", str(cfg)],
        capture_output=True,
        text=True,
        timeout=30,
        env=full_env,
        cwd=tmp_path,
        check=False,
    )


@pytest.mark.parametrize(
    ("config", "env", "names"),
    [
        ({"bogus_option": 1}, {}, "bogus_option"),
        ({"tag_ttl": "banana"}, {}, "tag_ttl"),
        ({"max_size": "lots"}, {}, "max_size"),
        ({"auth_registries": "no-colons-here"}, {}, "auth_registries"),
        ({}, {"REGISTRY_CACHE_STALE_IF_ERROR": "forever"}, "stale_if_error"),
    ],
    ids=["unknown-key", "bad-duration", "bad-size", "bad-auth", "bad-env"],
)
def test_bad_config_stops_start(config: dict, env: dict, names: str, tmp_path: Path):
    base = {"listen": f"127.0.0.1:{free_port()}", "cache_dir": str(tmp_path / "cache")}
    res = run_serve(tmp_path, {**base, **config}, env)
    out = res.stdout + res.stderr
    assert res.returncode != 0, f"serve started with a bad config:\n{out}"
    assert names in out.lower(), out
    assert "Traceback" not in out, out

"""upstream_proxy: a cache behind a parent proxy sends its upstream traffic through it.

The parent is a second registry-cache, which tunnels (passthrough) to the registry: a
real CONNECT proxy that logs each tunnel. The parent is named `localhost`, which the
destination policy would refuse for anything else: the parent proxy is the admin's own
choice."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from support.client import raw_exchange
from support.images import layout_blobs, skopeo
from support.net import HOSTNAMES
from support.proxy import proxy_python
from support.registry import Registry

pytestmark = pytest.mark.integration


def test_pulls_go_through_the_parent_proxy(
    registry: Registry, image_factory, proxy_factory, tmp_path: Path
):
    ref = f"{registry.netloc}/pub/behind-parent:latest"
    img = image_factory(ref, [200_000, 30_000])
    parent = proxy_factory(intercept=[], passthrough=list(HOSTNAMES), log_level="info")
    child = proxy_factory(upstream_proxy=f"http://localhost:{parent.port}")

    res = skopeo(
        "copy",
        "--src-cert-dir",
        str(child.cert_dir),
        f"docker://{ref}",
        f"oci:{tmp_path / 'out'}:latest",
        proxy_port=child.port,
    )
    assert res.returncode == 0, res.stderr
    assert set(img.blob_digests) <= layout_blobs(tmp_path / "out")
    tunnels = parent.log_lines(f"tunnel {registry.hostname}:{registry.port}")
    assert tunnels, f"the child did not go through the parent:\n{parent.output()[-2000:]}"
    # and the child cached what it fetched through the parent
    assert child.log_lines("MISS") and not child.log_lines("STALE")


def test_passthrough_tunnels_go_through_the_parent_proxy(
    registry: Registry, image_factory, proxy_factory, pki, tmp_path: Path
):
    """A host in passthrough is tunnelled through the parent too (it used to be connected
    to directly, which fails where only the parent can reach the outside)."""
    ref = f"{registry.netloc}/pub/tunnelled:latest"
    img = image_factory(ref, [50_000])
    parent = proxy_factory(intercept=[], passthrough=list(HOSTNAMES), log_level="info")
    child = proxy_factory(
        intercept=[],
        passthrough=list(HOSTNAMES),
        upstream_proxy=f"http://localhost:{parent.port}",
        log_level="info",
    )
    res = skopeo(
        "copy",
        "--src-cert-dir",
        str(pki.cert_dir),  # a tunnel: the registry's own certificate
        f"docker://{ref}",
        f"oci:{tmp_path / 'out'}:latest",
        proxy_port=child.port,
    )
    assert res.returncode == 0, res.stderr
    assert set(img.blob_digests) <= layout_blobs(tmp_path / "out")
    target = f"tunnel {registry.hostname}:{registry.port}"
    assert child.log_lines(target), child.output()[-2000:]
    assert parent.log_lines(target), f"the tunnel did not go through the parent:\n{parent.output()}"


def test_a_parent_that_refuses_the_tunnel_gives_a_502_with_its_answer(
    registry: Registry, proxy_factory
):
    parent = proxy_factory(intercept=[], passthrough=["other.rc.test"])  # not the registry
    child = proxy_factory(
        intercept=[], passthrough=list(HOSTNAMES), upstream_proxy=f"http://127.0.0.1:{parent.port}"
    )
    connect = f"CONNECT {registry.netloc} HTTP/1.1\r\nHost: {registry.netloc}\r\n\r\n"
    resp = raw_exchange(child.port, connect.encode())
    assert resp.status == 502, resp
    assert b"parent proxy answered" in resp.body and b"403" in resp.body, resp.body


def blind_to_outside_names(tmp_path: Path) -> tuple[str, ...]:
    """A command prefix under which only `localhost` resolves (its own mount namespace,
    with /etc/hosts and /etc/nsswitch.conf of its own): a host whose DNS knows nothing
    outside, as on networks where only the parent proxy resolves outside names."""
    hosts = tmp_path / "hosts-localhost-only"
    hosts.write_text("127.0.0.1 localhost\n::1 localhost\n")
    nsswitch = tmp_path / "nsswitch-files-only"
    nsswitch.write_text("hosts: files\n")
    script = (
        f"mount --bind {hosts} /etc/hosts && mount --bind {nsswitch} /etc/nsswitch.conf"
        ' && exec "$0" "$@"'
    )
    return ("unshare", "--mount", "sh", "-c", script)


@pytest.mark.parametrize("mode", ["intercept", "passthrough"])
def test_a_name_only_the_parent_proxy_resolves(
    mode: str, registry: Registry, image_factory, proxy_factory, pki, tmp_path: Path
):
    """The cache resolves a CONNECT's host itself to check where it leads; behind a
    parent proxy, a name it cannot resolve is left to the parent instead of refused. The
    parent here runs on the cache host, which is allowed only for hosts named in intercept
    or passthrough (the test names, listed exactly); the next tests cover the others."""
    ref = f"{registry.netloc}/pub/{mode}-parent-dns:latest"
    img = image_factory(ref, [40_000])
    blind = blind_to_outside_names(tmp_path)
    dispositions = {} if mode == "intercept" else {"intercept": [], "passthrough": list(HOSTNAMES)}
    # Without a parent the same blind cache cannot reach the registry: the name is
    # really unknown to it (or this test would prove nothing).
    alone = proxy_factory(command_prefix=blind, **dispositions)
    connect = f"CONNECT {registry.netloc} HTTP/1.1\r\nHost: {registry.netloc}\r\n\r\n"
    resp = raw_exchange(alone.port, connect.encode())
    assert resp.status == 502 and b"cannot resolve" in resp.body, resp

    parent = proxy_factory(intercept=[], passthrough=list(HOSTNAMES), log_level="info")
    child = proxy_factory(
        command_prefix=blind,
        upstream_proxy=f"http://localhost:{parent.port}",
        log_level="info",
        **dispositions,
    )
    res = skopeo(
        "copy",
        "--src-cert-dir",
        str(child.cert_dir if mode == "intercept" else pki.cert_dir),
        f"docker://{ref}",
        f"oci:{tmp_path / 'out'}:latest",
        proxy_port=child.port,
    )
    assert res.returncode == 0, f"{res.stderr}\n{child.output()[-2000:]}"
    assert set(img.blob_digests) <= layout_blobs(tmp_path / "out")
    assert parent.log_lines(f"tunnel {registry.hostname}:{registry.port}"), parent.output()


def test_a_parent_on_the_cache_host_is_not_left_unknown_names(
    registry: Registry, proxy_factory, tmp_path: Path
):
    """A parent on the cache host could resolve a name the cache does not know to the
    cache host's own loopback services (a public name pointing at 127.0.0.1): such names
    are refused, not passed to it."""
    parent = proxy_factory(intercept=[], passthrough=["*"], log_level="info")
    child = proxy_factory(
        command_prefix=blind_to_outside_names(tmp_path),
        upstream_proxy=f"http://localhost:{parent.port}",
    )
    target = "points-home.outside.example:443"
    resp = raw_exchange(child.port, f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    assert resp.status == 403, resp
    assert b"does not resolve here" in resp.body and b"loopback" in resp.body, resp.body
    assert not parent.log_lines("points-home"), "the name reached the parent"


PARENT_DNS_PROBE = """
import asyncio, json, sys
from proxy_app.config import Config
from proxy_app.destinations import DestinationPolicy

async def main():
    out = {}
    for parent in sys.argv[1:]:
        policy = DestinationPolicy(Config(upstream_proxy=parent or None))
        try:
            out[parent] = await policy.resolve("nowhere.outside.example", 443)
        except Exception as e:
            out[parent] = type(e).__name__
    print(json.dumps(out))

asyncio.run(main())
"""


def test_unknown_names_go_to_a_parent_elsewhere_only(tmp_path: Path):
    """The destination policy itself, on a host that knows no outside names: left to a
    parent on another host (an empty address list: the cache never connects itself),
    refused for a parent on loopback, and an error without a parent."""
    remote, local = "http://192.0.2.1:3128", "http://127.0.0.1:3128"  # 192.0.2.1: TEST-NET
    res = subprocess.run(
        [
            *blind_to_outside_names(tmp_path),
            proxy_python(),
            "-c",
            PARENT_DNS_PROBE,
            remote,
            local,
            "",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == {remote: [], local: "DestinationRefused", "": "gaierror"}

"""Issue 6, Must show 3: the proxy is no open door into the host or the internal network.

CONNECT (intercepted or passed through) and absolute-form requests to a port not
allowed, to loopback (by address, by `localhost`, by a name in /etc/hosts, in odd
spellings), to link-local and cloud metadata addresses, and to the cache host's own
non-loopback address are refused with 403 and a reason. A canary listener on every
local address counts the connections that would have got through.
"""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from security.conftest import LOOPBACK_ALIAS, METADATA_ALIAS
from security.secsupport import NetLab, connect_head, exchange
from support.net import HOSTNAMES, free_port
from support.proxy import Proxy
from support.registry import Registry
from support.servers import AioThread

pytestmark = pytest.mark.integration

NOT_ALLOWED_PORT = 2  # in no test config's allowed_ports


@dataclass
class Canary:
    """A TCP listener on every local address (IPv4 and IPv6) that counts connections."""

    port: int
    peers: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def canary(aio: AioThread) -> Iterator[Canary]:
    can = Canary(free_port())

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        can.peers.append(str(writer.get_extra_info("peername")))
        writer.write(b"SSH-2.0-canary\r\n")
        writer.close()

    server = aio.run(asyncio.start_server(handle, None, can.port))
    yield can
    server.close()


@pytest.fixture(scope="module", params=["intercept", "passthrough"])
def guarded(
    request, module_proxy, registry: Registry, upstream_ports, canary: Canary, hostile_names
) -> Proxy:
    """A proxy whose allowed_ports admit 22, 80 and the canary's port: the destination
    policy, not the port list, has to refuse."""
    allowed = sorted({443, 22, 80, canary.port, *upstream_ports})
    if request.param == "intercept":
        return module_proxy(allowed_ports=allowed)
    return module_proxy(allowed_ports=allowed, intercept=[], passthrough=["*", *HOSTNAMES])


def targets(canary: Canary, netlab: NetLab) -> list[tuple[str, str]]:
    """(CONNECT target, what the refusal must say)."""
    c = canary.port
    return [
        (f"registry.rc.test:{NOT_ALLOWED_PORT}", "allowed_ports"),
        ("127.0.0.1:22", "loopback"),
        (f"127.0.0.1:{c}", "loopback"),
        ("169.254.169.254:80", "metadata"),
        ("[fd00:ec2::254]:80", "metadata"),
        (f"{METADATA_ALIAS}:80", "metadata"),
        (f"localhost:{c}", "loopback"),
        (f"{LOOPBACK_ALIAS}:{c}", "loopback"),
        (f"[::1]:{c}", "loopback"),
        (f"[::ffff:127.0.0.1]:{c}", "loopback"),
        (f"127.1:{c}", "loopback"),
        (f"2130706433:{c}", "loopback"),
        (f"0x7f000001:{c}", "loopback"),
        (f"0.0.0.0:{c}", "not a destination"),
        ("169.254.10.1:443", "link-local"),
        ("[fe80::1]:443", "link-local"),
        # the cache host's own (non-loopback) addresses: the proxy itself, or a local service
        (f"{netlab.inside.host_v4}:{c}", ""),
        (f"[{netlab.outside.host_v6}]:{c}", ""),
    ]


def test_connect_refused_where_it_must_not_go(
    guarded: Proxy, canary: Canary, netlab: NetLab, registry: Registry
):
    problems = []
    before = len(canary.peers)
    for target, reason in targets(canary, netlab):
        resp = exchange("127.0.0.1", guarded.port, connect_head(target))
        text = resp.text()
        if resp.status != 403:
            problems.append(f"CONNECT {target}: {resp.status} {resp.error or ''} {text[:200]!r}")
        elif reason not in text:
            problems.append(f"CONNECT {target}: 403 without saying {reason!r}: {text!r}")
    time.sleep(0.3)  # the canary counts in its own thread
    assert not problems, "\n".join(problems)
    assert len(canary.peers) == before, f"refused CONNECTs reached the canary: {canary.peers}"
    # the upstream named in intercept/passthrough (on loopback too) still works
    resp = exchange("127.0.0.1", guarded.port, connect_head(registry.netloc))
    assert resp.status == 200, (resp.status, resp.text())
    assert "Traceback" not in guarded.stderr()


def test_absolute_form_refused_where_it_must_not_go(guarded: Proxy, canary: Canary):
    c = canary.port
    problems = []
    before = len(canary.peers)
    for url, reason in [
        (f"http://registry.rc.test:{NOT_ALLOWED_PORT}/v2/", "allowed_ports"),
        (f"http://127.0.0.1:{c}/v2/", "loopback"),
        ("http://169.254.169.254/latest/meta-data/", "metadata"),
        ("http://[fd00:ec2::254]/latest/meta-data/", "metadata"),
        (f"http://{METADATA_ALIAS}/latest/meta-data/", "metadata"),
        (f"http://localhost:{c}/v2/", "loopback"),
        (f"http://{LOOPBACK_ALIAS}:{c}/v2/", "loopback"),
        (f"http://registry.rc.test@127.0.0.1:{c}/v2/", "loopback"),
        (f"http://[::1]:{c}/v2/", "loopback"),
        (f"http://2130706433:{c}/v2/", "loopback"),
    ]:
        host = url.split("/")[2]
        data = f"GET {url} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()
        resp = exchange("127.0.0.1", guarded.port, data)
        if guarded.config.get("passthrough") and reason != "allowed_ports":
            reason = "passthrough"  # passthrough hosts are never proxied as plain HTTP
        if resp.status != 403 or reason not in resp.text():
            problems.append(f"GET {url}: {resp.status} {resp.error or ''} {resp.text()[:200]!r}")
    time.sleep(0.3)
    assert not problems, "\n".join(problems)
    assert len(canary.peers) == before, f"refused requests reached the canary: {canary.peers}"


def test_a_glob_never_opens_loopback_only_an_exact_name_does(
    module_proxy, canary: Canary, hostile_names, upstream_ports
):
    """Issue 15: `*.rcsec.test` in passthrough (or intercept) does not make a name under
    it that resolves to loopback reachable; naming that host exactly does."""
    target = f"{LOOPBACK_ALIAS}:{canary.port}"
    allowed = sorted({443, canary.port, *upstream_ports})
    before = len(canary.peers)
    for dispositions in (
        {"intercept": [], "passthrough": ["*.rcsec.test"]},
        {"intercept": ["*", "*.rcsec.test"], "passthrough": []},
        {"intercept": [], "passthrough": ["loopback-alias.rcsec.*"]},
    ):
        proxy = module_proxy(allowed_ports=allowed, **dispositions)
        resp = exchange("127.0.0.1", proxy.port, connect_head(target))
        assert resp.status == 403 and "loopback" in resp.text(), (dispositions, resp.status)
    time.sleep(0.3)
    assert len(canary.peers) == before
    exact = module_proxy(allowed_ports=allowed, intercept=[], passthrough=[LOOPBACK_ALIAS])
    resp = exchange("127.0.0.1", exact.port, connect_head(target))
    assert resp.status == 200, (resp.status, resp.text())


def test_passthrough_hosts_are_never_proxied_as_plain_http(
    module_proxy, registry: Registry, upstream_ports
):
    proxy = module_proxy(intercept=[], passthrough=[registry.hostname])
    url = f"http://{registry.netloc}/v2/"
    resp = exchange(
        "127.0.0.1", proxy.port, f"GET {url} HTTP/1.1\r\nHost: {registry.netloc}\r\n\r\n".encode()
    )
    assert resp.status == 403 and "passthrough" in resp.text(), (resp.status, resp.text())
    assert not proxy.files_in_cache_blobs()


NONLOCAL_BIND_PROBE = """
import ipaddress, json, sys
from proxy_app.destinations import forbidden_reason
print(json.dumps({a: forbidden_reason(a) for a in sys.argv[1:]}))
"""


def test_own_addresses_are_told_apart_with_nonlocal_bind_on() -> None:
    """With net.ipv4.ip_nonlocal_bind=1 any address can be bound, so a bind test would
    call every destination the cache host's own; the route lookup must not."""
    setup = (
        "set -e; ip link set lo up; ip link add rc-own type bridge; ip link set rc-own up;"
        " ip addr add 10.77.0.1/24 dev rc-own; ip -6 addr add fd77::1/64 dev rc-own nodad;"
        " sysctl -qw net.ipv4.ip_nonlocal_bind=1 net.ipv6.ip_nonlocal_bind=1;"
        f' exec "{sys.executable}" -c "$0" "$@"'
    )
    out = subprocess.run(
        [
            "unshare",
            "--net",
            "sh",
            "-c",
            setup,
            NONLOCAL_BIND_PROBE,
            "10.77.0.1",
            "fd77::1",
            "10.77.0.9",
            "fd77::9",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    )
    reasons = json.loads(out.stdout)
    assert "cache host itself" in reasons["10.77.0.1"]
    assert "cache host itself" in reasons["fd77::1"]
    assert reasons["10.77.0.9"] is None and reasons["fd77::9"] is None

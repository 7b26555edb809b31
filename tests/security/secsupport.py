"""Helpers of the security tests: raw exchanges from any address, network namespaces,
skopeo with a proxy URL of our choosing, proxy users and file-tree snapshots."""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from support.client import ProtocolError, Response, read_response
from support.client import _read_head as read_head
from support.proxy import REPO_ROOT, Proxy, proxy_python

EVIL = "rc-sec-evil-5d2a"  # a name any escape from cache_dir would leave behind


def hash_password(password: str) -> str:
    """A password hash made the documented way: `registry-cache hash-password` on stdin."""
    res = subprocess.run(
        [proxy_python(), "-m", "proxy_app", "hash-password"],
        input=password + "\n",
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd=REPO_ROOT,
    )
    assert res.returncode == 0, res.stderr
    hashed = res.stdout.strip()
    assert hashed.startswith("scrypt$") and password not in hashed, hashed
    return hashed


async def aexchange(
    host: str,
    port: int,
    data: bytes,
    *,
    source: str | None = None,
    timeout: float = 10,
    method: str = "GET",
) -> Response:
    """Sends `data` as it is (optionally from a source address) and reads one response."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(
                host, port, local_addr=(source, 0) if source else None
            )
    except (OSError, TimeoutError) as e:
        return Response(0, complete=False, error=f"connect failed: {type(e).__name__}: {e}")
    try:
        writer.write(data)
        await writer.drain()
        async with asyncio.timeout(timeout):
            if not data.startswith(b"CONNECT "):
                return await read_response(reader, method)
            # A CONNECT's 200 has no body: the tunnel follows. Refusals carry a length.
            status, reason, headers = await read_head(reader)
            body = b""
            if status != 200:
                body = await reader.readexactly(int(headers.get("content-length", "0")))
            return Response(status, reason, headers, body)
    except (ProtocolError, OSError, asyncio.IncompleteReadError, TimeoutError) as e:
        return Response(0, complete=False, error=f"no HTTP response: {type(e).__name__}: {e}")
    finally:
        writer.close()


def exchange(host: str, port: int, data: bytes, **kw: Any) -> Response:
    return asyncio.run(aexchange(host, port, data, **kw))


def connect_head(target: str, headers: dict[str, str] | None = None) -> bytes:
    lines = [f"CONNECT {target} HTTP/1.1", f"Host: {target}"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def skopeo_via(
    proxy_url: str,
    *args: str,
    netns: str | None = None,
    timeout: float = 120,
) -> subprocess.CompletedProcess[str]:
    """skopeo with HTTPS_PROXY set to `proxy_url` (credentials may be in it), optionally
    run inside a network namespace."""
    proxy_vars = {"http_proxy", "https_proxy", "no_proxy", "all_proxy"}
    env = {k: v for k, v in os.environ.items() if k.lower() not in proxy_vars}
    env["HTTPS_PROXY"] = env["HTTP_PROXY"] = proxy_url
    cmd = ["skopeo", "--insecure-policy", *args]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]
    return subprocess.run(
        cmd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def pull_args(proxy: Proxy, ref: str, dest: Path, *extra: str) -> list[str]:
    return [
        "copy",
        "--src-cert-dir",
        str(proxy.cert_dir),
        "--retry-times",
        "0",
        *extra,
        f"docker://{ref}",
        f"oci:{dest}:latest",
    ]


def snapshot(root: Path, skip: Path | None = None) -> dict[str, tuple[int, int]]:
    """Every path under root (but not under skip) with its size and mtime."""
    out: dict[str, tuple[int, int]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        if skip is not None and Path(dirpath) == skip:
            dirnames.clear()
            continue
        for name in filenames + dirnames:
            path = os.path.join(dirpath, name)
            with contextlib.suppress(OSError):
                st = os.lstat(path)
                # a directory's own size and times change with its entries: only files count
                out[path] = (st.st_size, st.st_mtime_ns) if name in filenames else (0, 0)
    return out


def run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=False)
    if check and res.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {res.stderr.strip()}")
    return res


@dataclass
class Namespace:
    """One network namespace joined to the host by a veth pair."""

    name: str
    host_link: str
    host_v4: str
    client_v4: str
    host_v6: str
    client_v6: str

    def exec(self, *cmd: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", self.name, *cmd],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def http(self, host: str, port: int, data: bytes, timeout: float = 10) -> tuple[int, str]:
        """Sends raw bytes from inside the namespace; (status or 0, response text)."""
        script = (
            "import socket,sys\n"
            "s=socket.create_connection((sys.argv[1],int(sys.argv[2])),timeout=float(sys.argv[3]))\n"
            "s.sendall(sys.stdin.buffer.read())\n"
            "out=b''\n"
            "try:\n"
            "    while (d:=s.recv(65536)): out+=d\n"
            "except OSError as e: print('recv:',e,file=sys.stderr)\n"
            "sys.stdout.buffer.write(out)\n"
        )
        res = subprocess.run(
            ["ip", "netns", "exec", self.name, sys.executable, "-c", script, host, str(port), "5"],
            input=data,
            capture_output=True,
            timeout=timeout + 10,
            check=False,
        )
        text = res.stdout.decode("latin-1")
        first = text.split("\r\n", 1)[0].split(" ")
        status = int(first[1]) if len(first) > 1 and first[1].isdigit() else 0
        return status, text + res.stderr.decode(errors="replace")


@dataclass
class NetLab:
    """Two namespaces: `inside` (its address allowed by the test config) and `outside`."""

    inside: Namespace
    outside: Namespace
    made: list[str] = field(default_factory=list)

    @staticmethod
    def _free_octet() -> int:
        routes = run("ip", "-4", "route", "show", "table", "all").stdout
        start = os.getpid() % 200
        for i in range(200):
            n = (start + i) % 200 + 20
            if f"10.213.{n}." not in routes:
                return n
        raise RuntimeError("no free 10.213.x.0/29 for the test namespaces")

    @classmethod
    def create(cls) -> NetLab:
        n = cls._free_octet()
        tag = f"{os.getpid() % 100000}"
        lab = cls(
            Namespace(
                f"rcsec-in-{tag}",
                f"rcsi{tag}",
                f"10.213.{n}.1",
                f"10.213.{n}.2",
                f"fd5e:c0de:{n:x}:1::1",
                f"fd5e:c0de:{n:x}:1::2",
            ),
            Namespace(
                f"rcsec-out-{tag}",
                f"rcso{tag}",
                f"10.213.{n}.5",
                f"10.213.{n}.6",
                f"fd5e:c0de:{n:x}:2::1",
                f"fd5e:c0de:{n:x}:2::2",
            ),
        )
        try:
            for ns in (lab.inside, lab.outside):
                lab.made.append(ns.name)
                run("ip", "netns", "add", ns.name)
                run(
                    "ip",
                    "link",
                    "add",
                    ns.host_link,
                    "type",
                    "veth",
                    "peer",
                    "name",
                    "eth0",
                    "netns",
                    ns.name,
                )
                run("ip", "addr", "add", f"{ns.host_v4}/30", "dev", ns.host_link)
                run("ip", "addr", "add", f"{ns.host_v6}/64", "dev", ns.host_link, "nodad")
                run("ip", "link", "set", ns.host_link, "up")
                run("ip", "-n", ns.name, "addr", "add", f"{ns.client_v4}/30", "dev", "eth0")
                run(
                    "ip", "-n", ns.name, "addr", "add", f"{ns.client_v6}/64", "dev", "eth0", "nodad"
                )
                run("ip", "-n", ns.name, "link", "set", "eth0", "up")
                run("ip", "-n", ns.name, "link", "set", "lo", "up")
            lab.wait_ready()
        except BaseException:
            lab.destroy()
            raise
        return lab

    def wait_ready(self, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        for ns in (self.inside, self.outside):
            while True:
                res = ns.exec("ip", "-6", "addr", "show", "dev", "eth0", "tentative")
                if res.returncode == 0 and not res.stdout.strip():
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{ns.name}: addresses not ready: {res.stdout}")
                time.sleep(0.1)

    def destroy(self) -> None:
        for ns in (self.inside, self.outside):
            run("ip", "link", "del", ns.host_link, check=False)
            if ns.name in self.made:
                run("ip", "netns", "del", ns.name, check=False)

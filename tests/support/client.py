"""A raw HTTP/1.1 client that talks to the proxy: CONNECT, TLS, then exact bytes.

Raw on purpose: aiohttp and urllib normalise paths (``..``) and refuse odd
targets, and the bad-input tests must send exactly what they say.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import ssl
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


def basic(user: str, password: str) -> str:
    """An `Authorization` (or `Proxy-Authorization`) value for Basic credentials."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@dataclass
class Response:
    status: int
    reason: str = ""
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    complete: bool = True  # the body ended as its framing said it would
    error: str | None = None  # why it did not
    first_byte_at: float | None = None
    done_at: float | None = None
    received: int = 0
    sha256: str = ""

    @property
    def cache(self) -> str | None:
        return self.headers.get("x-registry-cache")

    def text(self) -> str:
        return self.body.decode(errors="replace")


class ProtocolError(Exception):
    pass


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, str, dict[str, str]]:
    raw = await reader.readuntil(b"\r\n\r\n")
    lines = raw.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/"):
        raise ProtocolError(f"bad status line {lines[0]!r}")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    return int(parts[1]), parts[2] if len(parts) > 2 else "", headers


async def read_response(
    reader: asyncio.StreamReader,
    method: str,
    *,
    keep_body: bool = True,
    on_chunk: Callable[[bytes], None] | None = None,
) -> Response:
    status, reason, headers = await _read_head(reader)
    resp = Response(status, reason, headers)
    h = hashlib.sha256()
    chunks: list[bytes] = []

    def take(data: bytes) -> None:
        if resp.first_byte_at is None and data:
            resp.first_byte_at = time.monotonic()
        resp.received += len(data)
        h.update(data)
        if keep_body:
            chunks.append(data)
        if on_chunk:
            on_chunk(data)

    try:
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            pass
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            while True:
                size_line = await reader.readuntil(b"\r\n")
                size = int(size_line.split(b";")[0].strip(), 16)
                if size == 0:
                    await reader.readuntil(b"\r\n")
                    break
                remaining = size
                while remaining:
                    data = await reader.read(min(remaining, 1 << 16))
                    if not data:
                        raise ProtocolError("connection closed inside a chunk")
                    take(data)
                    remaining -= len(data)
                if await reader.readexactly(2) != b"\r\n":
                    raise ProtocolError("bad chunk terminator")
        elif "content-length" in headers:
            remaining = int(headers["content-length"])
            while remaining:
                data = await reader.read(min(remaining, 1 << 16))
                if not data:
                    raise ProtocolError(
                        f"connection closed with {remaining} of "
                        f"{headers['content-length']} bytes missing"
                    )
                take(data)
                remaining -= len(data)
        else:
            while data := await reader.read(1 << 16):
                take(data)
    except (ProtocolError, OSError, asyncio.IncompleteReadError, ssl.SSLError, ValueError) as e:
        resp.complete = False
        resp.error = f"{type(e).__name__}: {e}"
    resp.done_at = time.monotonic()
    resp.body = b"".join(chunks)
    resp.sha256 = "sha256:" + h.hexdigest()
    return resp


class Tunnel:
    """A CONNECT tunnel through the proxy with TLS to ``host`` inside."""

    def __init__(
        self,
        proxy_port: int,
        host: str,
        port: int,
        proxy_ca: str,
        source: str | None = None,
        proxy_headers: dict[str, str] | None = None,
    ) -> None:
        self.source = source  # the client's own address (127.0.0.2: another client)
        self.proxy_headers = proxy_headers or {}  # on the CONNECT (Proxy-Authorization)
        self.proxy_port = proxy_port
        self.host = host
        self.port = port
        self.proxy_ca = proxy_ca
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def __aenter__(self) -> Tunnel:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1",
            self.proxy_port,
            local_addr=(self.source, 0) if self.source else None,
        )
        target = f"{self.host}:{self.port}"
        extra = "".join(f"{k}: {v}\r\n" for k, v in self.proxy_headers.items())
        writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n{extra}\r\n".encode())
        await writer.drain()
        status, reason, _ = await _read_head(reader)
        if status != 200:
            writer.close()
            raise ProtocolError(f"CONNECT {target} answered {status} {reason}")
        ctx = ssl.create_default_context(cafile=self.proxy_ca)
        await writer.start_tls(ctx, server_hostname=self.host)
        self.reader, self.writer = reader, writer
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self.writer is not None:
            self.writer.close()

    async def request(
        self,
        method: str,
        path: str,
        headers: dict[str, str] | None = None,
        body: bytes = b"",
        *,
        keep_body: bool = True,
        on_chunk: Callable[[bytes], None] | None = None,
    ) -> Response:
        assert self.reader is not None and self.writer is not None
        lines = [f"{method} {path} HTTP/1.1", f"Host: {self.host}:{self.port}"]
        for k, v in (headers or {}).items():
            lines.append(f"{k}: {v}")
        if body or method in {"POST", "PUT", "PATCH"}:
            lines.append(f"Content-Length: {len(body)}")
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + body)
        await self.writer.drain()
        return await read_response(self.reader, method, keep_body=keep_body, on_chunk=on_chunk)


async def afetch(
    proxy_port: int,
    proxy_ca: str,
    host: str,
    port: int,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    timeout: float = 60,
    keep_body: bool = True,
    source: str | None = None,
    proxy_headers: dict[str, str] | None = None,
) -> Response:
    tunnel = Tunnel(proxy_port, host, port, proxy_ca, source, proxy_headers)
    async with asyncio.timeout(timeout), tunnel as t:
        return await t.request(method, path, headers, body, keep_body=keep_body)


def fetch(
    proxy_port: int,
    proxy_ca: str,
    host: str,
    port: int,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
    body: bytes = b"",
    timeout: float = 60,
    proxy_headers: dict[str, str] | None = None,
) -> Response:
    """One request in its own tunnel (sync)."""
    return asyncio.run(
        afetch(
            proxy_port,
            proxy_ca,
            host,
            port,
            method,
            path,
            headers,
            body,
            timeout,
            proxy_headers=proxy_headers,
        )
    )


# What a client that takes image manifests (and no index) sends with a tag request.
IMAGE_MANIFEST_ACCEPT = {
    "Accept": "application/vnd.oci.image.manifest.v1+json, "
    "application/vnd.docker.distribution.manifest.v2+json"
}


def get_tag(
    proxy: Any, reg: Any, repo: str, tag: str, method: str = "GET", accept: str | None = None
) -> Response:
    """A tag's manifest from registry `reg` through `proxy` (a Proxy and a Registry of
    the support modules), as a client that accepts `accept` asks for it (by default,
    image manifests and no index)."""
    return fetch(
        proxy.port,
        str(proxy.ca_path),
        reg.hostname,
        reg.port,
        method,
        f"/v2/{repo}/manifests/{tag}",
        IMAGE_MANIFEST_ACCEPT if accept is None else {"Accept": accept},
    )


def raw_exchange(port: int, data: bytes, timeout: float = 10) -> Response:
    """Send bytes as they are to the proxy's listener and read one response."""

    async def run() -> Response:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(data)
            await writer.drain()
            async with asyncio.timeout(timeout):
                return await read_response(reader, "GET")
        except (ProtocolError, OSError, asyncio.IncompleteReadError, TimeoutError) as e:
            return Response(0, complete=False, error=f"no HTTP response: {type(e).__name__}: {e}")
        finally:
            writer.close()

    return asyncio.run(run())

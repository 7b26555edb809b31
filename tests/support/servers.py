"""Small TLS servers the integration tests need next to the real registries.

They run on one asyncio loop in a background thread (``AioThread``) and record what
they receive, so tests can assert which host saw which ``Authorization`` header.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import ssl
import threading
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from multidict import CIMultiDict

from .net import free_port
from .pki import Issued

T = TypeVar("T")
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailers",
    "transfer-encoding",
    "upgrade",
    "host",
}


class AioThread:
    """An event loop in a daemon thread; ``run`` executes a coroutine there."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


def server_ssl(cert: Issued) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(cert.cert_path), str(cert.key_path))
    return ctx


@dataclass
class Seen:
    """One request a test server received."""

    method: str
    path: str
    authorization: str | None
    at: float = field(default_factory=time.monotonic)


class AppServer:
    """Base: an aiohttp app served over TLS on 127.0.0.1:<port>."""

    def __init__(self, aio: AioThread, hostname: str, cert: Issued) -> None:
        self.aio = aio
        self.hostname = hostname
        self.cert = cert
        self.port = free_port()
        self.seen: list[Seen] = []
        self._runner: web.AppRunner | None = None

    @property
    def netloc(self) -> str:
        return f"{self.hostname}:{self.port}"

    def app(self) -> web.Application:  # pragma: no cover - overridden
        raise NotImplementedError

    def record(self, request: web.Request) -> None:
        self.seen.append(
            Seen(request.method, request.path_qs, request.headers.get("Authorization"))
        )

    def start(self) -> AppServer:
        async def _start() -> None:
            self._runner = web.AppRunner(self.app(), access_log=None)
            await self._runner.setup()
            site = web.TCPSite(
                self._runner, "127.0.0.1", self.port, ssl_context=server_ssl(self.cert)
            )
            await site.start()

        self.aio.run(_start())
        return self

    def stop(self) -> None:
        if self._runner is not None:
            self.aio.run(self._runner.cleanup())
            self._runner = None


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


class TokenIssuer(AppServer):
    """A token endpoint like auth.docker.io: Basic credentials in, a signed JWT out.

    The JWT carries an ``x5c`` header with a certificate that chains to the bundle the
    registry's ``auth: token`` section trusts (``rootcertbundle``).
    """

    def __init__(
        self,
        aio: AioThread,
        hostname: str,
        cert: Issued,
        signer: Issued,
        ca_path: Path,
        *,
        service: str,
        issuer: str,
        user: str,
        password: str,
    ) -> None:
        super().__init__(aio, hostname, cert)
        self.signer = signer
        self.ca_path = ca_path
        self.service = service
        self.issuer = issuer
        self.user = user
        self.password = password
        self.issued = 0

    @property
    def realm(self) -> str:
        return f"https://{self.netloc}/token"

    def registry_auth_config(self) -> dict[str, Any]:
        return {
            "realm": self.realm,
            "service": self.service,
            "issuer": self.issuer,
            "rootcertbundle": str(self.ca_path),
        }

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/token", self.token)
        return app

    async def token(self, request: web.Request) -> web.Response:
        self.record(request)
        if request.headers.get("Authorization") != _basic(self.user, self.password):
            return web.json_response(
                {"errors": [{"code": "UNAUTHORIZED", "message": "bad or missing credentials"}]},
                status=401,
                headers={"WWW-Authenticate": 'Basic realm="rc-test-auth"'},
            )
        if request.query.get("service") != self.service:
            return web.json_response({"details": "unknown service"}, status=400)
        access = []
        for scope in " ".join(request.query.getall("scope", [])).split():
            parts = scope.split(":")
            if len(parts) != 3 or parts[0] != "repository":
                continue
            actions = [a for a in parts[2].split(",") if a in {"pull", "push"}]
            access.append({"type": "repository", "name": parts[1], "actions": actions})
        now = int(time.time())
        claims = {
            "iss": self.issuer,
            "sub": self.user,
            "aud": self.service,
            "exp": now + 300,
            "nbf": now - 10,
            "iat": now,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        der = self.signer.cert.public_bytes(serialization.Encoding.DER)
        token = jwt.encode(
            claims,
            self.signer.key,
            algorithm="ES256",
            headers={"x5c": [base64.b64encode(der).decode()]},
        )
        self.issued += 1
        return web.json_response(
            {
                "token": token,
                "access_token": token,
                "expires_in": 300,
                "issued_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now)),
            }
        )


class Front(AppServer):
    """A TLS reverse proxy in front of a registry that records every request.

    - ``require_basic``: answer 401 (Basic challenge) unless these credentials come.
    - ``forward_auth``: pass the client's Authorization to the backend (token flow).
    - ``redirect_blobs_to``: answer blob GETs with a 307 to that base URL (a "CDN").
    - ``recode_blobs``: answer blob GETs with ``recode(bytes)``, a body and the
      ``Content-Encoding`` it is sent with, whatever the client accepts.
    - ``stall``: requests whose path contains it get no answer for ``stall_seconds``.
    - ``trickle``: GETs whose path contains it get their body one byte a second.
    - ``manifest_type``: manifests are answered with this Content-Type (text/html, say).
    - ``endless``: blob GETs whose path contains it get a chunked body that never ends.
    """

    def __init__(
        self,
        aio: AioThread,
        hostname: str,
        cert: Issued,
        backend: str,
        ca_path: Path,
        *,
        require_basic: tuple[str, str] | None = None,
        forward_auth: bool = True,
        redirect_blobs_to: str | None = None,
        recode_blobs: Callable[[bytes], tuple[bytes, str]] | None = None,
        stall: str | None = None,
        stall_seconds: float = 20,
        trickle: str | None = None,
        manifest_type: str | None = None,
        endless: str | None = None,
    ) -> None:
        super().__init__(aio, hostname, cert)
        self.backend = backend
        self.ca_path = ca_path
        self.require_basic = require_basic
        self.forward_auth = forward_auth
        self.redirect_blobs_to = redirect_blobs_to
        self.recode_blobs = recode_blobs
        self.stall, self.stall_seconds, self.trickle = stall, stall_seconds, trickle
        self.manifest_type = manifest_type
        self.endless = endless
        self.in_flight = 0  # requests being answered now
        self._session: aiohttp.ClientSession | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 30)
        app.router.add_route("*", "/{tail:.*}", self.handle)
        app.on_cleanup.append(self._close)
        return app

    async def _close(self, _app: web.Application) -> None:
        if self._session is not None:
            await self._session.close()

    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            ctx = ssl.create_default_context(cafile=str(self.ca_path))
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(ssl=ctx),
                auto_decompress=False,
                timeout=aiohttp.ClientTimeout(total=None, sock_read=60),
            )
        return self._session

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.in_flight += 1
        try:
            return await self._handle(request)
        finally:
            self.in_flight -= 1

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.record(request)
        if self.stall and self.stall in request.raw_path:
            await asyncio.sleep(self.stall_seconds)
        if self.endless and self.endless in request.raw_path and "/blobs/" in request.raw_path:
            resp = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
            resp.enable_chunked_encoding()
            await resp.prepare(request)
            chunk = b"\0" * (1 << 20)
            while True:  # until the client goes
                await resp.write(chunk)
        if self.require_basic and request.headers.get("Authorization") != _basic(
            *self.require_basic
        ):
            return web.json_response(
                {"errors": [{"code": "UNAUTHORIZED", "message": "authentication required"}]},
                status=401,
                headers={"WWW-Authenticate": 'Basic realm="rc-test-front"'},
            )
        path = request.raw_path
        if self.redirect_blobs_to and request.method == "GET" and "/blobs/sha256:" in path:
            digest = path.rsplit("/", 1)[1].split("?")[0]
            location = f"{self.redirect_blobs_to}/data/{digest}?sig={uuid.uuid4().hex}"
            return web.Response(status=307, headers={"Location": location})
        headers = CIMultiDict(
            (k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP
        )
        if not self.forward_auth:
            headers.pop("Authorization", None)
        body = await request.read()
        async with self.session().request(
            request.method,
            f"https://{self.backend}{path}",
            headers=headers,
            data=body or None,
            allow_redirects=False,
        ) as up:
            out_headers = CIMultiDict(
                (k, v) for k, v in up.headers.items() if k.lower() not in HOP_BY_HOP
            )
            if self.manifest_type and "/manifests/" in path and up.ok:
                out_headers["Content-Type"] = self.manifest_type
            recode = self.recode_blobs
            if recode and request.method == "GET" and "/blobs/sha256:" in path and up.ok:
                coded, coding = recode(await up.read())
                out_headers.popall("Content-Length", None)
                out_headers["Content-Encoding"] = coding
                return web.Response(status=up.status, body=coded, headers=out_headers)
            resp = web.StreamResponse(status=up.status, headers=out_headers)
            await resp.prepare(request)
            if request.method != "HEAD" and self.trickle and self.trickle in path:
                for byte in await up.read():
                    await resp.write(bytes([byte]))
                    await asyncio.sleep(1)
            elif request.method != "HEAD":
                async for chunk in up.content.iter_chunked(1 << 16):
                    await resp.write(chunk)
            await resp.write_eof()
            return resp


class Cdn(AppServer):
    """Serves blobs by digest from a lookup function, like blob storage behind a redirect."""

    def __init__(
        self, aio: AioThread, hostname: str, cert: Issued, lookup: Callable[[str], Path]
    ) -> None:
        super().__init__(aio, hostname, cert)
        self.lookup = lookup

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_route("GET", "/data/{digest}", self.data)
        app.router.add_route("HEAD", "/data/{digest}", self.data)
        return app

    async def data(self, request: web.Request) -> web.StreamResponse:
        self.record(request)
        path = self.lookup(request.match_info["digest"])
        if not path.exists():
            return web.Response(status=404, text="no such blob")
        return web.FileResponse(path, headers={"Content-Type": "application/octet-stream"})


# --------------------------------------------------------------------------------------
class ThrottledRelay:
    """A TCP relay (TLS passes through untouched) that limits the download rate (and,
    with `up_rate`, the upload rate: client -> server).

    Records, per connection, how many bytes went server -> client and when the last
    of them did, so a test can tell when an upstream transfer ended.
    """

    @dataclass
    class Conn:
        opened: float
        down: int = 0
        last_down: float = 0.0
        closed: float | None = None
        up: int = 0

    def __init__(
        self, aio: AioThread, target_port: int, rate: float, up_rate: float | None = None
    ) -> None:
        self.aio = aio
        self.target_port = target_port
        self.rate = rate
        self.up_rate = up_rate  # None: not limited
        self.port = free_port()
        self.conns: list[ThrottledRelay.Conn] = []
        self._server: asyncio.Server | None = None

    def start(self) -> ThrottledRelay:
        async def _start() -> None:
            self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)

        self.aio.run(_start())
        return self

    def stop(self) -> None:
        async def _stop() -> None:
            if self._server is not None:
                self._server.close()

        self.aio.run(_stop())

    async def _handle(self, creader: asyncio.StreamReader, cwriter: asyncio.StreamWriter) -> None:
        conn = ThrottledRelay.Conn(opened=time.monotonic())
        self.conns.append(conn)
        try:
            ureader, uwriter = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            cwriter.close()
            return

        async def up() -> None:
            ready_at = 0.0  # no credit saved up while the (pooled) connection was idle
            try:
                while data := await creader.read(1 << 16):
                    conn.up += len(data)
                    if self.up_rate:
                        ready_at = max(ready_at, time.monotonic()) + len(data) / self.up_rate
                        delay = ready_at - time.monotonic()
                        if delay > 0:
                            await asyncio.sleep(delay)
                    uwriter.write(data)
                    await uwriter.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                if uwriter.can_write_eof():
                    with contextlib.suppress(OSError):
                        uwriter.write_eof()

        async def down() -> None:
            start = time.monotonic()
            try:
                while data := await ureader.read(1 << 16):
                    conn.down += len(data)
                    due = start + conn.down / self.rate
                    delay = due - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    cwriter.write(data)
                    await cwriter.drain()
                    conn.last_down = time.monotonic()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                cwriter.close()

        await asyncio.gather(up(), down())
        uwriter.close()
        conn.closed = time.monotonic()

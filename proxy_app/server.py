"""The listener: client admission, and the first bytes of each connection, which pick
the front door.

Each client connection starts with a protocol of our own. A `CONNECT` head goes to the
CONNECT front door (connect_door.py: tunnels and TLS interception); a TLS handshake
straight away is the mirror's (mirror.py, the cache's own certificate); anything else is
HTTP for aiohttp, with the bytes read so far: `/v2/...` is the mirror front door, other
origin-form requests are the proxy's own pages (`/ca.crt`, `/healthz`, `/metrics`, `/`),
absolute-form ones are proxied for plain-HTTP registries.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, cast

from aiohttp import web
from yarl import URL

from . import __version__, status_page
from .ca import CertificateAuthority, trust_bundle
from .config import Config, ProxyUser, default_mirror_names
from .connect_door import ConnectDoor
from .connections import (
    KEEPALIVE_TIMEOUT,
    MAX_HEAD,
    TLS_HANDSHAKE,
    ConnectionSlots,
    Slot,
    TrackedServer,
    default_max_connections,
    parse_head,
    raw_response,
)
from .destinations import DestinationPolicy, DestinationRefused, host_matches, valid_host_name
from .metrics import CONTENT_TYPE, Metrics
from .mirror import MirrorDoor, is_mirror_path
from .peer_auth import peer_key
from .peer_door import PeerDoor, is_peer_path
from .proxy_auth import ProxyAuthenticator
from .registry import RegistryProxy
from .responses import CACHE_HEADER
from .upstream import Origin

log = logging.getLogger(__name__)


class ClientConnection(asyncio.Protocol):
    def __init__(self, server: ProxyServer) -> None:
        self.server = server
        self.transport: asyncio.Transport | None = None
        self.client = "-"
        self.buffer = bytearray()
        self._timer: asyncio.TimerHandle | None = None
        self.slot: Slot | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport, but behave as one
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.client = str(peer[0]) if peer else "-"
        if not self.server.client_allowed(self.client) and not is_loopback(self.client):
            self._refuse_client()
            return
        if not self.server.make_room():
            self.server.log_refusal(self.client, "the listener is at max_connections")
            self._refuse(503, "the registry cache is at max_connections; try again shortly")
            return
        self.slot = self.server.slots.take(self.client)
        if self.slot is None:
            self.server.log_refusal(self.client, "it has max_connections_per_client open")
            self._refuse(
                429, f"too many connections from {self.client} (max_connections_per_client)"
            )
            return
        self.server.waiting[self] = None
        self._timer = asyncio.get_running_loop().call_later(
            self.server.config.head_timeout, self._head_timeout
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        self.server.waiting.pop(self, None)
        if self.slot is not None:
            self.slot.release()

    def evict(self) -> None:
        """Closed to make room: it has sent nothing a request could be made of yet."""
        self.server.log_refusal(self.client, "an idle new connection was closed for room")
        self._refuse(503, "closed before a request came, to make room (max_connections)")

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _head_timeout(self) -> None:
        self._refuse(
            408, f"no complete request head within {self.server.config.head_timeout:g} seconds"
        )

    def _refuse_client(self) -> None:
        self._refuse(403, refused_client(self.client))

    def _refuse(self, status: int, message: str, extra: str = "") -> None:
        self._cancel_timer()
        self.server.waiting.pop(self, None)
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(raw_response(status, message, extra))
            self.transport.close()
        self.transport = None
        if self.slot is not None:
            self.slot.release()

    def data_received(self, data: bytes) -> None:
        if self.transport is None:
            return
        self.buffer += data
        if self.buffer[:1] == TLS_HANDSHAKE:
            # TLS straight away, not a CONNECT: a mirror client that trusts the cache for
            # its own name. The bytes read so far are the start of its ClientHello.
            transport, slot = self.transport, self.slot
            assert slot is not None
            transport.pause_reading()
            self._cancel_timer()
            self.server.waiting.pop(self, None)
            self.transport = self.slot = None
            self.server.spawn(
                self.server.mirror.tls(transport, slot, self.client, bytes(self.buffer))
            )
            return
        end = self.buffer.find(b"\r\n\r\n")
        if end > MAX_HEAD or (end < 0 and len(self.buffer) > MAX_HEAD):
            self._refuse(431, f"request head larger than {MAX_HEAD} bytes")
            return
        if end < 0:
            return
        self._cancel_timer()
        self.server.waiting.pop(self, None)  # a request came: no longer the first to go
        if self.buffer.startswith(b"CONNECT "):
            if not self.server.client_allowed(self.client):
                self._refuse_client()  # loopback outside allowed_clients: own pages only
                return
            parsed = parse_head(bytes(self.buffer[:end]))
            rest = bytes(self.buffer[end + 4 :])
            transport, slot = self.transport, self.slot
            assert slot is not None
            transport.pause_reading()
            # From here on the connection (and its slot) belongs to the CONNECT task.
            self.transport = self.slot = None
            self.server.spawn(
                self.server.connect_door.connect(transport, slot, self.client, parsed, rest)
            )
            return
        # Anything else is HTTP for aiohttp, which gets the bytes read so far.
        transport, slot = self.transport, self.slot
        assert slot is not None
        self.transport = self.slot = None
        self.server.plain_http().attach(transport, slot, bytes(self.buffer))
        self.buffer.clear()


def _client_address(client: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(client.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        return address.ipv4_mapped
    return address


def refused_client(client: str) -> str:
    """Logs a client outside allowed_clients; the answer it gets."""
    log.warning("refused client %s: not in allowed_clients", client)
    return f"client {client} is not in this cache's allowed_clients"


def is_loopback(client: str) -> bool:
    address = _client_address(client)
    return address is not None and address.is_loopback


class ProxyServer:
    def __init__(
        self,
        config: Config,
        ca: CertificateAuthority,
        registry: RegistryProxy,
        metrics: Metrics,
        health: Callable[[], Awaitable[tuple[bool, dict[str, Any]]]],
        status: Callable[[], dict[str, Any]] | None = None,
        admin: Callable[[web.BaseRequest, str], Awaitable[web.Response]] | None = None,
    ) -> None:
        self.config = config
        self.status = status
        self.admin = admin
        self.ca = ca
        self.registry = registry
        self.metrics = metrics
        self.health = health
        self.auth = ProxyAuthenticator(config.users)
        self.destinations = DestinationPolicy(config)
        self.mirror = MirrorDoor(self)
        self.connect_door = ConnectDoor(self)
        self.peer_door = PeerDoor(self, peer_key(ca.key) if config.peers else None)
        self.mirror_names = config.mirror_names or default_mirror_names(config)
        self._servers: list[asyncio.Server] = []
        self._plain: TrackedServer | None = None
        self.slots = ConnectionSlots(config.max_connections_per_client, metrics)
        self.max_connections = config.max_connections or default_max_connections()
        # Connections that have not sent a complete first request head (or TLS hello), the
        # oldest first: at max_connections a new connection takes the place of the oldest
        # of these, so a flood of silent connections cannot lock real clients (or the
        # cache's own health check) out, and clients holding connections keep them.
        self.waiting: dict[ClientConnection, None] = {}
        self._refusals_logged: dict[str, float] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # aiohttp closes a connection whose next request head is not complete this long
        # after the connection opened or the previous response ended: the head timeout.
        self.idle_timeout = min(KEEPALIVE_TIMEOUT, config.head_timeout)

    # --- lifecycle ----------------------------------------------------------------------

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._plain = TrackedServer(
            self._handle_plain, access_log=None, keepalive_timeout=self.idle_timeout
        )
        for address in self.config.listen:
            try:
                server = await loop.create_server(
                    lambda: ClientConnection(self),
                    address.host,
                    address.port,
                    reuse_address=True,
                    backlog=1024,
                )
            except OSError as e:
                if self.config.listen_is_default and ":" in address.host:
                    log.warning("not listening on %s: %s (no IPv6 here?)", address, e.strerror)
                    continue
                raise OSError(e.errno, f"cannot listen on {address}: {e.strerror}") from e
            self._servers.append(server)
            log.info("listening on %s", address)

    @property
    def ports(self) -> list[int]:
        return [s.sockets[0].getsockname()[1] for s in self._servers if s.sockets]

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._plain is not None:
            await self._plain.shutdown(timeout=5)

    def spawn(self, coroutine: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # --- policy -------------------------------------------------------------------------

    def make_room(self) -> bool:
        """Whether one more connection fits, closing the oldest waiting one if need be."""
        if self.slots.total < self.max_connections:
            return True
        if not self.waiting:
            return False
        oldest = next(iter(self.waiting))
        oldest.evict()
        return self.slots.total < self.max_connections

    def log_refusal(self, client: str, why: str) -> None:
        """Logged once a minute per client address: a flood must not flood the log."""
        now = time.monotonic()
        if self._refusals_logged.get(client, 0.0) > now:
            return
        if len(self._refusals_logged) > 10_000:
            self._refusals_logged = {c: t for c, t in self._refusals_logged.items() if t > now}
        self._refusals_logged[client] = now + 60
        log.warning("refused a connection from %s: %s (logged once a minute)", client, why)

    def client_allowed(self, client: str) -> bool:
        address = _client_address(client)
        return address is not None and any(
            address in network for network in self.config.allowed_clients
        )

    def disposition(self, host: str, port: int) -> str | None:
        """'passthrough', 'intercept', or None when neither list admits host:port."""
        if host_matches(self.config.passthrough, host, port):
            return "passthrough"
        if host_matches(self.config.intercept, host, port):
            return "intercept"
        return None

    async def proxy_user(self, header: str | None) -> tuple[bool, ProxyUser | None]:
        if not self.auth.enabled:
            return True, None
        user = await self.auth.authenticate(header)
        return user is not None, user

    # --- plain HTTP: the proxy's pages and absolute-form proxying ------------------------

    def plain_http(self) -> TrackedServer:
        assert self._plain is not None
        return self._plain

    async def _handle_plain(self, request: web.BaseRequest) -> web.StreamResponse:
        client = request.remote or "-"
        target = request.raw_path
        if is_peer_path(target):
            return await self.peer_door.handle(request)
        if is_mirror_path(target):
            return await self.mirror.handle(request)
        if target == "/admin" or target.startswith("/admin/"):
            return await self._admin(request, client)
        if target.startswith("/"):
            return await self._own_page(request)
        if not self.client_allowed(client):
            # The cache host itself may read the cache's own pages (its health check runs
            # there) even when allowed_clients leaves loopback out, but not use the proxy.
            return web.Response(
                status=403, text=refused_client(client) + "\n", headers={CACHE_HEADER: "PASS"}
            )
        if request.method == "CONNECT":
            return web.Response(
                status=400,
                text="CONNECT must be the first request on a connection\n",
                headers={CACHE_HEADER: "PASS"},
            )
        ok, user = await self.proxy_user(request.headers.get("Proxy-Authorization"))
        if not ok:
            return web.Response(
                status=407,
                text="proxy authentication required\n",
                headers={
                    "Proxy-Authenticate": 'Basic realm="registry-cache"',
                    CACHE_HEADER: "PASS",
                },
            )
        try:
            url = URL(target, encoded=True)
        except ValueError:
            url = URL()
        if url.scheme != "http" or not url.host:
            return web.Response(
                status=400,
                text="absolute-form requests must be http://host/path\n",
                headers={CACHE_HEADER: "PASS"},
            )
        host, port = url.host.lower(), url.explicit_port or 80
        if not (valid_host_name(host) or _client_address(host) is not None):
            return web.Response(
                status=400,
                text=f"{host[:100]!r} is not a valid host name\n",
                headers={CACHE_HEADER: "PASS"},
            )
        if port != 80 and port not in self.config.allowed_ports:
            return web.Response(
                status=403,
                text=f"port {port} is not allowed (allowed_ports)\n",
                headers={CACHE_HEADER: "PASS"},
            )
        disposition = self.disposition(host, port)
        if disposition != "intercept":
            why = (
                "is in passthrough: tunnelled with CONNECT only, never proxied as plain HTTP"
                if disposition == "passthrough"
                else "is not in intercept"
            )
            return web.Response(
                status=403, text=f"{host}:{port} {why}\n", headers={CACHE_HEADER: "PASS"}
            )
        try:
            await self.destinations.resolve(host, port)
        except DestinationRefused as e:
            return web.Response(status=403, text=f"{e}\n", headers={CACHE_HEADER: "PASS"})
        except OSError as e:
            return web.Response(
                status=502, text=f"cannot resolve {host}: {e}\n", headers={CACHE_HEADER: "PASS"}
            )
        path = url.raw_path_qs or "/"
        origin = Origin("http", host, port)
        return await self.registry.serve(request, origin, client, user, path)

    async def _admin(self, request: web.BaseRequest, client: str) -> web.StreamResponse:
        """The admin API (admin.py) for loopback clients that authenticate (Authorization:
        Basic) as a proxy user with `admin: true`; the admin socket is the usual way."""
        headers = {CACHE_HEADER: "PASS"}

        def refuse(status: int, message: str, **extra: str) -> web.Response:
            log.warning("admin API refused to %s: %s", client, message)
            return web.json_response(
                {"error": message}, status=status, headers={**headers, **extra}
            )

        if self.admin is None:
            return refuse(404, "no admin API here")
        if not is_loopback(client):
            return refuse(
                403,
                "the admin API answers loopback clients only; on the cache host, run "
                "registry-cache ls|purge|pin|unpin|refresh as root or the service user",
            )
        if not any(u.admin for u in self.config.users):
            return refuse(
                403,
                "the admin API on the listener needs a proxy user with admin: true in `users`; "
                "or use the admin socket (registry-cache ls, as root or the service user)",
            )
        user = await self.auth.authenticate(request.headers.get("Authorization"))
        if user is None:
            return refuse(
                401,
                "send Authorization: Basic with a proxy user that has admin: true",
                **{"WWW-Authenticate": 'Basic realm="registry-cache admin"'},
            )
        if not user.admin:
            return refuse(403, f"proxy user {user.name} is not an admin (admin: true in `users`)")
        response = await self.admin(request, f"user {user.name} from {client}")
        response.headers.update(headers)
        return response

    async def _own_page(self, request: web.BaseRequest) -> web.StreamResponse:
        path = request.path
        headers = {CACHE_HEADER: "PASS"}
        if request.method not in ("GET", "HEAD"):
            return web.Response(
                status=405, text="only GET here\n", headers={**headers, "Allow": "GET, HEAD"}
            )
        if path == "/ca.crt":
            return web.Response(
                body=self.ca.cert_pem,
                content_type="application/x-pem-file",
                headers={
                    **headers,
                    "Content-Disposition": 'attachment; filename="registry-cache-ca.crt"',
                },
            )
        if path == "/ca-bundle.crt":
            # During a CA rotation: the current CA and the staged or previous one.
            bundle = trust_bundle(self.config.ca_dir)
            return web.Response(body=bundle, content_type="application/x-pem-file", headers=headers)
        if path == "/healthz":
            healthy, details = await self.health()
            return web.Response(
                status=200 if healthy else 503,
                text=json.dumps(details),
                content_type="application/json",
                headers=headers,
            )
        if path == "/metrics":
            return web.Response(
                body=self.metrics.render(), headers={**headers, "Content-Type": CONTENT_TYPE}
            )
        if path == "/":
            return await self._status_page(request, headers)
        return web.Response(
            status=404,
            text="not found: this proxy serves /, /ca.crt, /healthz, /metrics\n",
            headers=headers,
        )

    async def _status_page(
        self, request: web.BaseRequest, headers: dict[str, str]
    ) -> web.StreamResponse:
        """The status page, for allowed clients only (loopback too only when allowed), and
        when proxy `users` are configured, for admin users only (`Authorization: Basic`,
        which a browser asks for after the 401)."""
        headers = {**headers, "Cache-Control": "no-store"}
        client = request.remote or "-"
        if not self.client_allowed(client):
            return web.Response(status=403, text=refused_client(client) + "\n", headers=headers)
        user = None
        if self.auth.enabled:
            user = await self.auth.authenticate(request.headers.get("Authorization"))
            if user is None:
                return web.Response(
                    status=401,
                    text="the status page is for the admin users of this cache: log in with "
                    "the name and password of a `users` entry that has admin: true\n",
                    headers={**headers, "WWW-Authenticate": 'Basic realm="registry-cache"'},
                )
            if not user.admin:
                return web.Response(
                    status=403,
                    text=f"user {user.name} may not read the status page: it is for users "
                    "with admin: true in the cache's `users`\n",
                    headers=headers,
                )
        if self.status is None:
            return web.Response(
                text=f"registry-cache {__version__}: a caching proxy for container registries; "
                "set HTTPS_PROXY to this address and trust /ca.crt\n",
                headers=headers,
            )
        data = self.status()
        if self.config.verify_client_access and user is None:
            data = status_page.without_repositories(data)
        if _wants_json(request.headers.get("Accept", "")):
            return web.json_response(data, headers=headers)
        return web.Response(
            text=status_page.render(data), content_type="text/html", headers=headers
        )


def _wants_json(accept: str) -> bool:
    """JSON when the client asks for it and not for HTML (a browser asks for HTML)."""
    types = {part.split(";", 1)[0].strip().lower() for part in accept.split(",")}
    return "application/json" in types and "text/html" not in types

"""The listener: client admission, CONNECT, TLS interception and the proxy's own pages.

Each client connection starts with a protocol of our own that reads the first request
head. A CONNECT is answered here: the connection is then either tunnelled as bytes
(`passthrough` hosts) or TLS is terminated with a leaf for the host and an aiohttp
HTTP/1.1 handler is attached to the TLS transport. Any other request is handed, with
the bytes read so far, to aiohttp: origin-form requests are the proxy's own pages,
absolute-form ones are proxied for plain-HTTP registries.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import json
import logging
import re
import ssl
from collections import Counter
from collections.abc import Awaitable, Callable
from typing import Any, cast

from aiohttp import web
from yarl import URL

from . import __version__
from .ca import CertificateAuthority, trust_bundle
from .config import Config, ProxyUser, default_mirror_names
from .destinations import DestinationPolicy, DestinationRefused, host_matches, valid_host_name
from .exchange import Exchange
from .metrics import CONTENT_TYPE, Metrics
from .mirror import MirrorDoor, is_mirror_path
from .proxy_auth import ProxyAuthenticator
from .registry import RegistryProxy
from .responses import CACHE_HEADER
from .upstream import Origin, basic_auth, describe

log = logging.getLogger(__name__)

MAX_HEAD = 16 << 10  # a CONNECT head is a few hundred bytes; this bounds a hostile one
TLS_HANDSHAKE_TIMEOUT = 30.0
KEEPALIVE_TIMEOUT = 75.0
_CONNECT_TARGET = re.compile(
    r"(?:\[(?P<v6>[0-9a-fA-F:.]+)\]|(?P<host>[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252}[A-Za-z0-9])?))"
    r":(?P<port>[0-9]{1,5})"
)
_STATUS_TEXT = {
    400: "Bad Request",
    403: "Forbidden",
    407: "Proxy Authentication Required",
    431: "Request Header Fields Too Large",
    502: "Bad Gateway",
    408: "Request Timeout",
    429: "Too Many Requests",
}


def _raw_response(status: int, message: str, extra: str = "") -> bytes:
    body = (message + "\n").encode()
    return (
        f"HTTP/1.1 {status} {_STATUS_TEXT.get(status, 'Error')}\r\n"
        f"Content-Type: text/plain; charset=utf-8\r\nContent-Length: {len(body)}\r\n"
        f"{CACHE_HEADER}: PASS\r\nConnection: close\r\n{extra}\r\n"
    ).encode() + body


def _parse_head(head: bytes) -> tuple[list[str], dict[str, str]] | None:
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:
        return None
    lines = text.split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            return None
        headers[name.strip().lower()] = value.strip()
    return lines[0].split(" "), headers


class Slot:
    """One client connection counted against its address's limit; released once."""

    def __init__(self, slots: ConnectionSlots, client: str) -> None:
        self._slots, self.client, self._held = slots, client, True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._slots.give_back(self.client)


class ConnectionSlots:
    """Open connections per client address, bounded so that one client (or a slowloris)
    cannot take every connection the proxy can hold."""

    def __init__(self, limit: int, metrics: Metrics) -> None:
        self.limit = limit
        self._open: Counter[str] = Counter()
        self._metrics = metrics

    def take(self, client: str) -> Slot | None:
        if self._open[client] >= self.limit:
            return None
        self._open[client] += 1
        self._metrics.connections.inc()
        return Slot(self, client)

    def give_back(self, client: str) -> None:
        self._open[client] -= 1
        if self._open[client] <= 0:
            del self._open[client]
        self._metrics.connections.dec()


class TrackedServer(web.Server):
    """aiohttp's low-level HTTP server, giving a connection's slot back when it closes."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.slots: dict[Any, Slot] = {}

    def attach(self, transport: asyncio.Transport, slot: Slot, data: bytes = b"") -> None:
        """Hands a connection (and the bytes already read from it) to a new handler."""
        handler = self()
        self.slots[handler] = slot
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if data:
            handler.data_received(data)

    def connection_lost(self, handler: Any, exc: BaseException | None = None) -> None:
        super().connection_lost(handler, exc)
        slot = self.slots.pop(handler, None)
        if slot is not None:
            slot.release()


class _Pipe(asyncio.Protocol):
    """One direction of a byte tunnel, with flow control towards the other side. Until it
    has a peer, what arrives (bytes, EOF, close) is kept and handed on by `attach`."""

    def __init__(self, peer: asyncio.Transport | None = None, slot: Slot | None = None) -> None:
        self.peer = peer
        self.slot = slot
        self.transport: asyncio.Transport | None = None
        self._early = bytearray()
        self._early_eof = self._early_lost = False
        self.got_eof = False  # this side has finished sending

    def attach(self, peer: asyncio.Transport) -> None:
        self.peer = peer
        if self._early:
            peer.write(bytes(self._early))
            self._early.clear()
        if self._early_lost:
            peer.close()
        elif self._early_eof and peer.can_write_eof():
            peer.write_eof()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self.peer is not None:
            self.peer.write(data)
        else:
            self._early += data

    def eof_received(self) -> bool:
        self.got_eof = True
        if self.peer is None:
            self._early_eof = True
            return True
        partner = self.peer.get_protocol()
        if isinstance(partner, _Pipe) and partner.got_eof:
            # Both ends have finished sending: nothing more can flow either way, so the
            # tunnel ends here (else its two sockets and the client's slot stay forever).
            self.peer.close()
            return False
        if self.peer.can_write_eof():
            self.peer.write_eof()
            return True
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.peer is not None:
            self.peer.close()
        else:
            self._early_lost = True
        if self.slot is not None:
            self.slot.release()

    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.resume_reading()


class _ParentAnswer(asyncio.Protocol):
    """Reads a parent proxy's answer to our CONNECT, before the tunnel takes the connection
    over (with whatever came right behind the answer)."""

    def __init__(self) -> None:
        self.received = bytearray()
        self.answered: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        self.received += data
        if self.answered.done():
            return
        if b"\r\n\r\n" in self.received:
            self.answered.set_result(bytes(self.received))
        elif len(self.received) > MAX_HEAD:
            self.answered.set_exception(OSError("the parent proxy's answer has no end"))

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.answered.done():
            self.answered.set_exception(ConnectionError("the parent proxy closed the connection"))


async def _tunnel_via_parent(
    parent_url: str, host: str, port: int, pipe: _Pipe
) -> asyncio.Transport:
    """A connection to host:port through the parent proxy (upstream_proxy), handed to
    `pipe`; raises OSError when the parent cannot be reached or refuses."""
    parent = URL(parent_url)
    if parent.scheme != "http" or not parent.host:
        raise OSError(f"tunnels go through an http:// parent proxy only, not {parent.scheme}://")
    answer = _ParentAnswer()
    loop = asyncio.get_running_loop()
    upstream, _ = await asyncio.wait_for(
        loop.create_connection(lambda: answer, parent.host, parent.port or 80), timeout=30
    )
    target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    head = f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n"
    if parent.user is not None:
        head += f"Proxy-Authorization: {basic_auth(parent.user, parent.password or '')}\r\n"
    upstream.write(f"{head}\r\n".encode())
    try:
        received = await asyncio.wait_for(answer.answered, timeout=30)
    except BaseException:
        upstream.abort()
        raise
    status_line, _, _ = received.partition(b"\r\n")
    parts = status_line.split(b" ", 2)
    if len(parts) < 2 or parts[1] != b"200":
        upstream.abort()
        shown = status_line[:100].decode("latin-1")
        raise OSError(f"the parent proxy answered the CONNECT with {shown!r}")
    upstream.set_protocol(pipe)
    pipe.connection_made(upstream)
    # Everything after the answer's head, including what arrived while this resumed.
    rest = bytes(answer.received).partition(b"\r\n\r\n")[2]
    if rest:
        pipe.data_received(rest)
    return cast(asyncio.Transport, upstream)


TLS_HANDSHAKE = b"\x16"  # the first byte of a TLS record carrying a handshake


def _feed(protocol: asyncio.BaseProtocol, data: bytes) -> None:
    """Gives bytes already read from a socket to the protocol now on it (start_tls's)."""
    # asyncio's and uvloop's TLS protocols take bytes as a buffered protocol does (uvloop's
    # is not a subclass of asyncio.BufferedProtocol, so its methods are what counts).
    get_buffer = getattr(protocol, "get_buffer", None)
    if get_buffer is None:
        protocol.data_received(data)  # type: ignore[attr-defined]
        return
    view = memoryview(data)
    while view:
        buffer = get_buffer(len(view))
        n = min(len(buffer), len(view))
        buffer[:n] = view[:n]
        protocol.buffer_updated(n)  # type: ignore[attr-defined]
        view = view[n:]


class _Holding(asyncio.Protocol):
    """Stands in while TLS is set up: bytes that arrive before the HTTP handler is
    attached (a client's request right behind its handshake) are kept, not lost."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.eof = False

    def data_received(self, data: bytes) -> None:
        self.data += data

    def eof_received(self) -> bool:
        self.eof = True
        return False

    def hand_over(self, transport: asyncio.Transport, server: TrackedServer, slot: Slot) -> None:
        server.attach(transport, slot, bytes(self.data))
        if self.eof and isinstance(transport.get_protocol(), asyncio.Protocol):
            transport.get_protocol().eof_received()  # type: ignore[attr-defined]


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
        self.slot = self.server.slots.take(self.client)
        if self.slot is None:
            log.warning("refused a connection from %s: it has too many open", self.client)
            self._refuse(
                429, f"too many connections from {self.client} (max_connections_per_client)"
            )
            return
        self._timer = asyncio.get_running_loop().call_later(
            self.server.config.head_timeout, self._head_timeout
        )

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        if self.slot is not None:
            self.slot.release()

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
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(_raw_response(status, message, extra))
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
            self.transport = self.slot = None
            self.server.spawn(self.server.own_tls(transport, slot, self.client, bytes(self.buffer)))
            return
        end = self.buffer.find(b"\r\n\r\n")
        if end > MAX_HEAD or (end < 0 and len(self.buffer) > MAX_HEAD):
            self._refuse(431, f"request head larger than {MAX_HEAD} bytes")
            return
        if end < 0:
            return
        self._cancel_timer()
        if self.buffer.startswith(b"CONNECT "):
            if not self.server.client_allowed(self.client):
                self._refuse_client()  # loopback outside allowed_clients: own pages only
                return
            parsed = _parse_head(bytes(self.buffer[:end]))
            rest = bytes(self.buffer[end + 4 :])
            transport, slot = self.transport, self.slot
            assert slot is not None
            transport.pause_reading()
            # From here on the connection (and its slot) belongs to the CONNECT task.
            self.transport = self.slot = None
            self.server.spawn(self.server.connect(transport, slot, self.client, parsed, rest))
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
    ) -> None:
        self.config = config
        self.ca = ca
        self.registry = registry
        self.metrics = metrics
        self.health = health
        self.auth = ProxyAuthenticator(config.users)
        self.destinations = DestinationPolicy(config)
        self.mirror = MirrorDoor(self)
        self.mirror_names = config.mirror_names or default_mirror_names(config)
        self._servers: list[asyncio.Server] = []
        self._plain: TrackedServer | None = None
        self.slots = ConnectionSlots(config.max_connections_per_client, metrics)
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

    # --- CONNECT ------------------------------------------------------------------------

    async def connect(
        self,
        transport: asyncio.Transport,
        slot: Slot,
        client: str,
        parsed: tuple[list[str], dict[str, str]] | None,
        rest: bytes,
    ) -> None:
        handed_over = False
        try:
            handed_over = await self._connect(transport, slot, client, parsed, rest)
        except (ConnectionError, OSError, ssl.SSLError, TimeoutError) as e:
            log.info("CONNECT from %s ended: %s", client, e)
            transport.abort()
        except Exception:
            # A bug of ours: the connection must still end, or it would sit paused forever.
            log.exception("internal error on a CONNECT from %s", client)
            transport.abort()
        finally:
            if not handed_over:
                slot.release()

    async def _connect(
        self,
        transport: asyncio.Transport,
        slot: Slot,
        client: str,
        parsed: tuple[list[str], dict[str, str]] | None,
        rest: bytes,
    ) -> bool:
        """Serves a CONNECT; True once the connection (and its slot) has a new owner."""

        def refuse(status: int, message: str, extra: str = "") -> bool:
            log.info("CONNECT from %s refused (%d): %s", client, status, message)
            self.metrics.requests.labels("connect", "denied", "connect").inc()
            transport.write(_raw_response(status, message, extra))
            transport.close()
            return False

        if parsed is None or len(parsed[0]) != 3 or not parsed[0][2].startswith("HTTP/1."):
            return refuse(
                400, "malformed CONNECT request line; expected CONNECT host:port HTTP/1.1"
            )
        target, headers = parsed[0][1], parsed[1]
        m = _CONNECT_TARGET.fullmatch(target)
        port = int(m.group("port")) if m else 0
        if m is None or not 0 < port < 65536:
            return refuse(400, f"CONNECT target {target[:100]!r} is not host:port")
        host = (m.group("v6") or m.group("host")).lower()
        if m.group("v6"):
            try:
                host = str(ipaddress.IPv6Address(host))
            except ValueError:
                return refuse(400, f"CONNECT target {target[:100]!r} has an invalid IPv6 address")
        elif not valid_host_name(host):
            return refuse(400, f"CONNECT target {target[:100]!r} is not a valid host name")
        ok, user = await self.proxy_user(headers.get("proxy-authorization"))
        if not ok:
            return refuse(
                407,
                "proxy authentication required: give a user and password in the proxy URL",
                'Proxy-Authenticate: Basic realm="registry-cache"\r\n',
            )
        if port not in self.config.allowed_ports:
            return refuse(403, f"CONNECT to port {port} is not allowed (allowed_ports)")
        disposition = self.disposition(host, port)
        if disposition is None:
            return refuse(403, f"{host}:{port} is neither in intercept nor in passthrough")
        if disposition == "intercept" and not self.ca.permits(host):
            return refuse(403, f"{host} is outside the CA's name constraints (ca_name_constraints)")
        loop = asyncio.get_running_loop()
        try:
            addresses = await asyncio.wait_for(self.destinations.resolve(host, port), timeout=30)
        except DestinationRefused as e:
            return refuse(403, str(e))
        except (OSError, TimeoutError) as e:
            return refuse(502, f"cannot resolve {host}: {e}")
        if disposition == "passthrough":
            from_upstream = _Pipe()
            try:
                if self.config.upstream_proxy:
                    upstream = await _tunnel_via_parent(
                        self.config.upstream_proxy, host, port, from_upstream
                    )
                else:
                    upstream, _ = await asyncio.wait_for(
                        loop.create_connection(lambda: from_upstream, addresses[0], port),
                        timeout=30,
                    )
            except (OSError, TimeoutError) as e:
                return refuse(502, f"cannot reach {host}:{port}: {describe(e)}")
            transport.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
            from_upstream.attach(transport)
            if rest:
                upstream.write(rest)
            transport.set_protocol(_Pipe(upstream, slot))
            transport.resume_reading()
            self.metrics.requests.labels("tunnel", "pass", "connect").inc()
            log.info("%s tunnel %s:%d", client, host, port)
            return True
        if rest:
            return refuse(400, "data sent before the CONNECT was answered; wait for the 200")
        transport.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        holding = _Holding()
        try:
            tls = await loop.start_tls(
                transport,
                holding,
                self.ca.server_context(host),
                server_side=True,
                ssl_handshake_timeout=min(TLS_HANDSHAKE_TIMEOUT, self.config.head_timeout),
            )
        except (ssl.SSLError, ConnectionError, OSError, TimeoutError) as e:
            # A client that does not trust the CA fails here: say so plainly in the log.
            log.warning(
                "TLS handshake with %s for %s failed: %s (does it trust the CA?)", client, host, e
            )
            transport.abort()
            return False
        if tls is None:
            transport.abort()
            return False
        origin = Origin("https", host, port)
        handler_server = TrackedServer(
            functools.partial(self._handle_intercepted, origin, client, user),
            access_log=None,
            keepalive_timeout=self.idle_timeout,
        )
        holding.hand_over(tls, handler_server, slot)
        return True

    async def own_tls(
        self, transport: asyncio.Transport, slot: Slot, client: str, hello: bytes
    ) -> None:
        """TLS for the cache's own names (mirror_names), whatever the client's SNI; inside,
        the same HTTP as on the plain listener: the mirror front door and the own pages."""
        loop = asyncio.get_running_loop()
        holding = _Holding()
        try:
            context = self.ca.own_context(self.mirror_names)
        except ValueError as e:
            log.error("cannot answer TLS from %s: %s", client, e)
            transport.abort()
            slot.release()
            return
        starting = asyncio.ensure_future(
            loop.start_tls(
                transport,
                holding,
                context,
                server_side=True,
                ssl_handshake_timeout=min(TLS_HANDSHAKE_TIMEOUT, self.config.head_timeout),
            )
        )
        # start_tls puts its TLS protocol on the transport and schedules its start; the
        # ClientHello bytes already read are handed to it right behind that start.
        await asyncio.sleep(0)
        loop.call_soon(_feed, transport.get_protocol(), hello)
        try:
            tls = await starting
        except (ssl.SSLError, ConnectionError, OSError, TimeoutError) as e:
            log.warning("TLS handshake with %s (mirror) failed: %s", client, e)
            transport.abort()
            slot.release()
            return
        if tls is None:
            transport.abort()
            slot.release()
            return
        holding.hand_over(tls, self.plain_http(), slot)

    async def _handle_intercepted(
        self, origin: Origin, client: str, user: ProxyUser | None, request: web.BaseRequest
    ) -> web.StreamResponse:
        ex = Exchange(
            client,
            request.method,
            origin.netloc,
            request.raw_path,
            user=user.name if user else None,
        )
        try:
            return await self.registry.handle(request, origin, ex, user)
        finally:
            ex.log(self.config.log_format)

    # --- plain HTTP: the proxy's pages and absolute-form proxying ------------------------

    def plain_http(self) -> TrackedServer:
        assert self._plain is not None
        return self._plain

    async def _handle_plain(self, request: web.BaseRequest) -> web.StreamResponse:
        client = request.remote or "-"
        target = request.raw_path
        if is_mirror_path(target):
            return await self.mirror.handle(request)
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
        if self.disposition(host, port) is None:
            return web.Response(
                status=403,
                text=f"{host}:{port} is not in intercept\n",
                headers={CACHE_HEADER: "PASS"},
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
        ex = Exchange(client, request.method, origin.netloc, path, user=user.name if user else None)
        try:
            return await self.registry.handle(request, origin, ex, user)
        finally:
            ex.log(self.config.log_format)

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
            return web.Response(
                text=f"registry-cache {__version__}: a caching proxy for container registries; "
                "set HTTPS_PROXY to this address and trust /ca.crt\n",
                headers=headers,
            )
        return web.Response(
            status=404,
            text="not found: this proxy serves /, /ca.crt, /healthz, /metrics\n",
            headers=headers,
        )

"""The CONNECT front door: a Docker host's HTTPS_PROXY.

A `CONNECT host:port` from an allowed client is answered with 200; then the connection
is either tunnelled as bytes (`passthrough` hosts, through the parent proxy when there is
one) or TLS is terminated with a leaf for the host, minted by the cache's CA, and the
HTTP/1.1 requests inside go to the registry dispatch (registry.py) as if this were
https://host. The destination checks (ports, intercept, resolved addresses, the CA's
name constraints) come first.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import logging
import re
import ssl
from typing import TYPE_CHECKING, cast

from aiohttp import web
from yarl import URL

from .config import ProxyUser
from .connections import MAX_HEAD, TLS_HANDSHAKE_TIMEOUT, Holding, Slot, TrackedServer, raw_response
from .destinations import DestinationRefused, valid_host_name
from .upstream import Origin, basic_auth, describe

if TYPE_CHECKING:
    from .server import ProxyServer

log = logging.getLogger(__name__)

CONNECT_TARGET = re.compile(
    r"(?:\[(?P<v6>[0-9a-fA-F:.]+)\]|(?P<host>[A-Za-z0-9](?:[A-Za-z0-9.-]{0,252}[A-Za-z0-9])?))"
    r":(?P<port>[0-9]{1,5})"
)


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


class ConnectDoor:
    def __init__(self, server: ProxyServer) -> None:
        self.server = server
        self.config = server.config
        self.ca = server.ca
        self.metrics = server.metrics
        self.destinations = server.destinations
        self.registry = server.registry

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
        host = ""  # known once the request line parsed: the registry of the metrics

        def refuse(status: int, message: str, extra: str = "") -> bool:
            log.info("CONNECT from %s refused (%d): %s", client, status, message)
            self.metrics.request(host, "connect", "denied", "connect")
            transport.write(raw_response(status, message, extra))
            transport.close()
            return False

        if parsed is None or len(parsed[0]) != 3 or not parsed[0][2].startswith("HTTP/1."):
            return refuse(
                400, "malformed CONNECT request line; expected CONNECT host:port HTTP/1.1"
            )
        target, headers = parsed[0][1], parsed[1]
        m = CONNECT_TARGET.fullmatch(target)
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
        ok, user = await self.server.proxy_user(headers.get("proxy-authorization"))
        if not ok:
            return refuse(
                407,
                "proxy authentication required: give a user and password in the proxy URL",
                'Proxy-Authenticate: Basic realm="registry-cache"\r\n',
            )
        if port not in self.config.allowed_ports:
            return refuse(403, f"CONNECT to port {port} is not allowed (allowed_ports)")
        disposition = self.server.disposition(host, port)
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
            self.metrics.request(host, "tunnel", "pass", "connect")
            log.info("%s tunnel %s:%d", client, host, port)
            return True
        if rest:
            return refuse(400, "data sent before the CONNECT was answered; wait for the 200")
        transport.write(b"HTTP/1.1 200 Connection Established\r\n\r\n")
        holding = Holding()
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
            keepalive_timeout=self.server.idle_timeout,
        )
        holding.hand_over(tls, handler_server, slot)
        return True

    async def _handle_intercepted(
        self, origin: Origin, client: str, user: ProxyUser | None, request: web.BaseRequest
    ) -> web.StreamResponse:
        return await self.registry.serve(request, origin, client, user, request.raw_path)

"""Client connections as the listener hands them on: a slot per connection, counted
against its client address; aiohttp's HTTP handler attached to a transport with the bytes
already read; TLS started on a connection whose first bytes were already read; the
refusals written before any HTTP handler exists.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
from collections import Counter
from typing import Any

from aiohttp import web

from .metrics import Metrics
from .responses import CACHE_HEADER
from .upstream_share import client_key

MAX_HEAD = 16 << 10  # a CONNECT head is a few hundred bytes; this bounds a hostile one
TLS_HANDSHAKE_TIMEOUT = 30.0
KEEPALIVE_TIMEOUT = 75.0

_STATUS_TEXT = {
    400: "Bad Request",
    403: "Forbidden",
    407: "Proxy Authentication Required",
    431: "Request Header Fields Too Large",
    502: "Bad Gateway",
    408: "Request Timeout",
    503: "Service Unavailable",
    429: "Too Many Requests",
}


def raw_response(status: int, message: str, extra: str = "") -> bytes:
    body = (message + "\n").encode()
    return (
        f"HTTP/1.1 {status} {_STATUS_TEXT.get(status, 'Error')}\r\n"
        f"Content-Type: text/plain; charset=utf-8\r\nContent-Length: {len(body)}\r\n"
        f"{CACHE_HEADER}: PASS\r\nConnection: close\r\n{extra}\r\n"
    ).encode() + body


def parse_head(head: bytes) -> tuple[list[str], dict[str, str]] | None:
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
    """Open connections per client (an address; an IPv6 client's /64, which it holds
    whole), bounded so that one client (or a slowloris) cannot take every connection the
    proxy can hold; and how many are open in all (max_connections is the listener's)."""

    def __init__(self, limit: int, metrics: Metrics) -> None:
        self.limit = limit
        self._open: Counter[str] = Counter()
        self._metrics = metrics
        self.total = 0

    def take(self, client: str) -> Slot | None:
        key = client_key(client)
        if self._open[key] >= self.limit:
            return None
        self._open[key] += 1
        self.total += 1
        self._metrics.connections.inc()
        return Slot(self, key)

    def give_back(self, client: str) -> None:
        self._open[client] -= 1
        if self._open[client] <= 0:
            del self._open[client]
        self.total -= 1
        self._metrics.connections.dec()


def default_max_connections() -> int:
    """From the descriptor limit (raised to its hard limit at start): each client
    connection may need an upstream one too, and the store and index need some."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    return max(64, (soft - 128) // 2)


def raise_descriptor_limit() -> None:
    """The soft descriptor limit up to the hard one (a server's, not a shell's, share)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < wanted:
        # Where it cannot be raised it stays, and max_connections follows it.
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


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


TLS_HANDSHAKE = b"\x16"  # the first byte of a TLS record carrying a handshake


def feed_read_bytes(protocol: asyncio.BaseProtocol, data: bytes) -> None:
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


class Holding(asyncio.Protocol):
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
